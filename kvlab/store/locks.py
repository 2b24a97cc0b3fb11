"""Per-entry reader/writer locks between processes, so `cache rm` and `cache gc` never delete a file that another
process is loading or writing.

Each entry ``<root>/<key[:2]>/<key>.kv`` has a lock file ``<key>.lock`` beside it, locked with filelock's
``ReadWriteLock`` (SQLite transactions on the lock file, so shared and exclusive holds work across processes and
between threads of one process). Loads take the lock shared; ``put`` takes it exclusive while it writes and renames;
``remove`` and ``gc`` take it exclusive without waiting and skip (and report) an entry that is in use.

Lock files are removed with their entry, under the exclusive hold (filelock advises leaving them in place, since a
process that opened one just before it was unlinked would hold a lock nobody else can reach). Both filelock and
``hold`` detect that case by comparing the path's inode with the one locked, and ``hold`` then starts again on the
file now at the path, so removal is safe and lock files do not pile up. Limits: these are advisory locks (a process that
deletes files by hand is not stopped) and SQLite locking is unreliable on some network file systems (NFS).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import ReadWriteLock, Timeout

LOCK_SUFFIX = ".lock"
WRITE_WAIT_S = 60.0  # how long a write waits for readers of the same entry (a load of a large cache takes seconds)


class Busy(Exception):
    """The lock is held in a conflicting mode by another process or thread (raised only when not waiting)."""


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


@contextlib.contextmanager
def hold(lock_path: Path, *, exclusive: bool, wait_s: float) -> Iterator[None]:
    """Hold ``lock_path`` shared or exclusive; wait up to ``wait_s`` seconds (0: not at all), else raise Busy.

    The lock file is created when absent (its folder must exist). OSError from creating it propagates."""
    deadline = time.monotonic() + wait_s
    while True:
        before = _inode(lock_path)
        lock = ReadWriteLock(lock_path, is_singleton=False)
        acquire = lock.acquire_write if exclusive else lock.acquire_read
        try:
            acquire(timeout=max(deadline - time.monotonic(), 0.0))
        except Timeout:
            lock.close()
            raise Busy(str(lock_path)) from None
        except OSError as error:
            lock.close()
            if error.errno is not None:  # a real failure (read-only store, no space, ...)
                raise
            continue  # filelock found the file unlinked or replaced while acquiring: lock the one there now
        except BaseException:
            lock.close()
            raise
        after = _inode(lock_path)
        if after is not None and before == after:
            break
        # created just now, or unlinked (and maybe recreated) meanwhile: lock the file the path names now
        lock.release()
        lock.close()
    try:
        yield
    finally:
        lock.release()
        lock.close()
