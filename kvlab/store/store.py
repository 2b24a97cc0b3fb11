"""A content-addressed store of ``.kv`` files under the cache directory.

An entry's key is the SHA-256 of what determines its contents (model fingerprint, text hash, policy and parameters,
ratio, budget, query-awareness, quantization), so the same request finds the same file. Files live at
``<root>/<key[:2]>/<key>.kv``. Writes are atomic; two processes writing one key both leave a complete file and the
last rename wins. "Last used" is the file's mtime, set on every ``get``: atime is unreliable on noatime and
relatime mounts. A store the process cannot write (read-only mount, no permission) still serves reads: the
last-used update is skipped; writes and removals raise StoreWriteError, one line naming the cause.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvlab.cache.quant import QuantizationParams
from kvlab.errors import CacheFileError, CacheMismatchError, KvlabError, ParameterError, UnknownCacheEntryError
from kvlab.fileio import TEMP_SUFFIX, atomic_write, fsync_directory
from kvlab.models.convert import cache_root
from kvlab.store.format import FILE_SUFFIX, read_meta
from kvlab.store.meta import CacheMeta

STALE_TEMP_SECONDS = 3600
_KEY = re.compile(r"[0-9a-f]{64}")
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class StoreWriteError(KvlabError, OSError):
    """The store cannot be written: ``reason`` is ``"read_only"`` (read-only file system or no permission),
    ``"full"`` (no space left) or ``"error"``."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __str__(self) -> str:
        return str(self.args[0])


def write_error(error: OSError, root: Path, doing: str) -> StoreWriteError:
    """The StoreWriteError for an OSError raised while ``doing`` something to the store at ``root``."""
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StoreWriteError(f"cannot {doing}: the cache store {root} is read-only ({error.strerror}); it serves "
                               f"reads only; point KVLAB_CACHE_DIR (or --store) at a writable folder", "read_only")
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreWriteError(f"cannot {doing}: no space left for the cache store {root} ({error.strerror}); free "
                               f"space, e.g. `kvlab cache gc --max-size 2GB`", "full")
    return StoreWriteError(f"cannot {doing} in the cache store {root} ({error.strerror or error})", "error")


def parse_size(text: str, *, require_unit: bool = False) -> int:
    """``'2GB'`` → 2_000_000_000 bytes; KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024; bare numbers are
    bytes, unless ``require_unit`` (command-line sizes: ``2`` is far more likely to mean 2 GB than 2 bytes), where
    only ``0`` may go without one. Units are case-insensitive. Raises ParameterError."""
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if match is None or match.group(2).lower() not in SIZE_UNITS:
        raise ParameterError(f"cannot read size {text!r}: give a number of bytes or a number with one of the units "
                             f"KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. 2GB, 512MiB)")
    if require_unit and not match.group(2) and float(match.group(1)) != 0:
        raise ParameterError(f"size {text!r} has no unit: write it with one, e.g. {match.group(1)}GB or "
                             f"{match.group(1)}MiB (or {match.group(1)}B if you mean bytes)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def key_for(*, model_fingerprint: str, text_sha256: str, policy: str, policy_params: dict, ratio: float | None,
            budget_tokens: int | None, query_aware: bool, quantization: QuantizationParams | dict | None) -> str:
    """SHA-256 hex of the canonical JSON of the inputs (parameters sorted by name)."""
    if isinstance(quantization, QuantizationParams):
        quantization = quantization.to_dict()
    identity = {"model_fingerprint": model_fingerprint, "text_sha256": text_sha256, "policy": policy,
                "policy_params": policy_params, "ratio": ratio, "budget_tokens": budget_tokens,
                "query_aware": query_aware, "quantization": quantization}
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def key_for_meta(meta: CacheMeta) -> str:
    return key_for(model_fingerprint=meta.model_fingerprint, text_sha256=meta.text_sha256, policy=meta.policy,
                   policy_params=meta.policy_params, ratio=meta.ratio, budget_tokens=meta.budget_tokens,
                   query_aware=meta.query_aware, quantization=meta.quantization)


def check_key(key: str, meta: CacheMeta) -> None:
    """Raise CacheMismatchError unless ``meta`` is what ``key`` was derived from (text, model, policy and parameters,
    ratio, budget, quantization): a file copied or renamed under another entry's key is never served as it."""
    actual = key_for_meta(meta)
    if actual != key:
        raise CacheMismatchError(f"the cache stored under key {key[:12]}… is not that entry: its metadata "
                                 f"({meta.model}, {meta.policy}, text {meta.text_sha256[:12]}…) belongs under key "
                                 f"{actual[:12]}… (the file was copied or renamed); remove it with `kvlab cache rm "
                                 f"{key[:12]}` and compress the document again")


@dataclass
class StoreEntry:
    """One stored file: ``last_used`` is seconds since the epoch; ``meta`` is None (and ``problem`` says why) when
    the file's header cannot be read."""

    key: str
    path: Path
    size_bytes: int
    last_used: float
    meta: CacheMeta | None
    problem: str | None = None

    def summary(self) -> dict:
        """A short description for listings."""
        if self.meta is None:
            return {"key": self.key, "size_bytes": self.size_bytes, "problem": self.problem}
        meta = self.meta
        return {"key": self.key, "size_bytes": self.size_bytes, "model": meta.model, "policy": meta.policy,
                "ratio": meta.ratio, "budget_tokens": meta.budget_tokens, "context_tokens": meta.context_tokens,
                "query_aware": meta.query_aware,
                "quantization": None if meta.quantization is None else meta.quantization.scheme,
                "created_at": meta.created_at}


class CacheStore:
    """Files under ``root`` (default ``cache_root() / "kv"``, i.e. ``$KVLAB_CACHE_DIR/kv``)."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else cache_root() / "kv"

    def path_for(self, key: str) -> Path:
        _check_key(key)
        return self.root / key[:2] / f"{key}{FILE_SUFFIX}"

    def get(self, key: str) -> Path | None:
        """The entry's path (and mark it used now), or None."""
        path = self.path_for(key)
        try:
            os.utime(path)
        except (FileNotFoundError, NotADirectoryError):  # no entry (or the store root is not a folder yet)
            return None
        except OSError:  # a read-only store: serve the entry without recording its use
            return path if path.is_file() else None
        return path

    def put(self, key: str, source: Path | str | Callable[[Path], object]) -> Path:
        """Store a file under ``key``, atomically. ``source`` is a ``.kv`` file to copy in, or a function that
        writes one at the path it is given (e.g. ``lambda path: save_cache(path, cache, meta)``).

        The file's metadata is verified and must hash to ``key`` (see ``key_for_meta``); raises CacheFileError or
        ParameterError, leaving the store unchanged.
        """
        target = self.path_for(key)

        if not callable(source):
            read_meta(source)  # refuse a missing or broken source with its own one-line error, before copying

        def write(temp: Path) -> None:
            if callable(source):
                source(temp)
            else:
                shutil.copyfile(source, temp)
            actual = key_for_meta(read_meta(temp))
            if actual != key:
                raise ParameterError(f"the file's metadata hashes to key {actual[:12]}…, not {key[:12]}…; "
                                     f"store it under key_for_meta(meta)")

        try:
            atomic_write(target, write)
        except StoreWriteError:
            raise
        except OSError as error:
            raise write_error(error, self.root, "store a cache") from None
        return target

    def list(self) -> list[StoreEntry]:
        """Every entry, most recently used first; reads only the files' headers."""
        entries = [self._entry(path) for path in self.root.glob(f"??/*{FILE_SUFFIX}")
                   if _KEY.fullmatch(path.stem) and path.parent.name == path.stem[:2]]
        found = [entry for entry in entries if entry is not None]
        return sorted(found, key=lambda entry: entry.last_used, reverse=True)

    def remove(self, key_or_prefix: str) -> StoreEntry:
        """Delete the one entry whose key starts with ``key_or_prefix``; raises on no match or several."""
        entry = self.find(key_or_prefix)
        self._delete(entry.path)
        return entry

    def remove_key(self, key: str) -> None:
        """Delete the entry stored under exactly ``key`` (no prefix matching; nothing happens if it is absent)."""
        self._delete(self.path_for(key))

    def find(self, key_or_prefix: str) -> StoreEntry:
        """The one entry whose key starts with ``key_or_prefix``; raises on no match or several."""
        prefix = key_or_prefix.strip().lower()
        if not prefix:
            raise ParameterError("give a cache key or a prefix of one (see the store listing)")
        matches = [entry for entry in self.list() if entry.key.startswith(prefix)]
        if not matches:
            raise UnknownCacheEntryError(f"no cache entry has a key starting with {prefix!r}; list the store to "
                                         f"see the keys")
        if len(matches) > 1:
            shown = ", ".join(entry.key[:12] for entry in matches[:5])
            raise ParameterError(f"{len(matches)} cache entries start with {prefix!r} ({shown}"
                                 f"{', …' if len(matches) > 5 else ''}); give more characters of the key")
        return matches[0]

    def gc(self, max_bytes: int, *, dry_run: bool = False) -> builtins.list[StoreEntry]:  # ``list``: the method
        """Delete least recently used entries until at most ``max_bytes`` remain, and temporary files older than an
        hour (left by interrupted writes); returns the deleted entries. ``dry_run`` deletes nothing and returns
        the entries that would go."""
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ParameterError(f"max_bytes must be an integer >= 0 (got {max_bytes!r})")
        now = time.time()
        for temp in [] if dry_run else self.root.glob(f"??/*{TEMP_SUFFIX}"):
            try:
                if now - temp.stat().st_mtime > STALE_TEMP_SECONDS:
                    temp.unlink()
            except FileNotFoundError:  # another process finished or removed it
                pass
            except OSError as error:
                raise write_error(error, self.root, "remove stale temporary files") from None
        entries = sorted(self.list(), key=lambda entry: entry.last_used)
        total = sum(entry.size_bytes for entry in entries)
        removed = []
        for entry in entries:
            if total <= max_bytes:
                break
            if not dry_run:
                self._delete(entry.path)
            total -= entry.size_bytes
            removed.append(entry)
        return removed

    def total_bytes(self) -> int:
        """Bytes of all entries (temporary files excluded); stats the files without reading them."""
        total = 0
        for path in self.root.glob(f"??/*{FILE_SUFFIX}"):
            try:
                total += path.stat().st_size
            except FileNotFoundError:  # removed by another process meanwhile
                pass
        return total

    def _entry(self, path: Path) -> StoreEntry | None:
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed between the listing and the stat
            return None
        try:
            meta, problem = read_meta(path), None
        except CacheFileError as error:
            meta, problem = None, str(error)
        return StoreEntry(path.stem, path, stat.st_size, stat.st_mtime, meta, problem)

    def _delete(self, path: Path) -> None:
        # Shard directories stay (at most 256): removing an empty one could race with a put that just made it.
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            raise write_error(error, self.root, f"remove {path.stem[:12]}") from None
        fsync_directory(path.parent)


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ParameterError(f"a cache key is 64 lowercase hex characters (got {key!r}); compute it with key_for")
