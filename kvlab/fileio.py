"""Atomic file writes: write a temporary file next to the target, fsync it, rename it over the target, fsync the
directory. A reader sees the old file or the new one, never a torn one; two writers of one path each rename a
complete file, so the last one wins and both results are valid. A crash leaves at most a ``*.tmp`` file behind
(``CacheStore.gc`` removes those once they are an hour old)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def temp_path_for(path: Path) -> Path:
    """A unique sibling of ``path``: ``<name>.<pid>-<random>.tmp`` (same directory, so the rename is atomic)."""
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def atomic_write(path: Path, write: Callable[[Path], object]) -> int:
    """Call ``write(temp_path)`` to create the file, then make it durable and move it to ``path``; returns its size
    in bytes. The temporary file is removed if anything fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(path)
    try:
        write(temp)
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return size


def atomic_write_bytes(path: Path, data: bytes) -> int:
    """Write ``data`` to ``path`` atomically; returns the bytes written."""
    return atomic_write(path, lambda temp: temp.write_bytes(data))


def fsync_directory(directory: Path) -> None:
    """Persist a rename; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> int:
    """Write ``text`` as UTF-8 to ``path`` atomically; returns the bytes written."""
    return atomic_write_bytes(path, text.encode("utf-8"))
