"""A content-addressed store of ``.kv`` files under the cache directory.

An entry's key is the SHA-256 of what determines its contents (model fingerprint, text hash, policy and parameters,
budget in tokens, query-awareness, quantization), so the same request finds the same file. The eviction ratio is not
part of it: the budget it resolves to is what determines the cache (so a ratio of 0.50001 finds the 0.5 file when
both keep the same tokens); files written before, keyed with their ratio too, stay readable under their keys.

Files live at ``<root>/<key[:2]>/<key>.kv``. Writes are atomic; two processes writing one key both leave a complete
file and the last rename wins. Per-entry locks between processes (``locks.py``) let ``reading`` hold an entry
while it is loaded and ``put`` hold it while it is written; ``remove`` and ``gc`` never delete an entry held that
way: they skip it and say so. "Last used" is the file's mtime, set on every ``get``: atime is unreliable on noatime
and relatime mounts. A store the process cannot write (read-only mount, no permission) still serves reads (without
locks when no lock file can be created there: nothing in it can be deleted by this process either); writes and
removals raise StoreWriteError, one line naming the cause.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kvlab import units
from kvlab.cache.quant import QuantizationParams
from kvlab.errors import CacheFileError, CacheMismatchError, KvlabError, ParameterError, UnknownCacheEntryError
from kvlab.fileio import TEMP_SUFFIX, atomic_write, fsync_directory
from kvlab.models.convert import cache_root
from kvlab.store.format import FILE_SUFFIX, read_meta
from kvlab.store.locks import LOCK_SUFFIX, WRITE_WAIT_S, Busy, hold
from kvlab.store.meta import CacheMeta

STALE_TEMP_SECONDS = 3600
_KEY = re.compile(r"[0-9a-f]{64}")
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)
SIZE_UNITS = {"": 1, "b": 1, **{unit.lower(): size for unit, size in units.SIZE_UNITS.items()}}  # case-insensitive


class StoreWriteError(KvlabError, OSError):
    """The store cannot be written: ``reason`` is ``"read_only"`` (read-only file system or no permission),
    ``"full"`` (no space left) or ``"error"``."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __str__(self) -> str:
        return str(self.args[0])


class EntryInUseError(KvlabError):
    """Another process (or thread) is loading or writing the entry, so it is not removed now."""


def in_use_error(key: str, doing: str) -> EntryInUseError:
    return EntryInUseError(f"cannot {doing} {key[:12]}…: another process is loading or writing it; try again when "
                           f"it has finished")


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


def keyed_policy_params(policy_params: dict, streamed_chunk_tokens: int | None) -> dict:
    """The policy parameters a key hashes: a document compressed while streaming (``engine.streaming``) is another
    cache than one compressed after a full prefill, so its chunk size joins them."""
    if streamed_chunk_tokens is None:
        return policy_params
    return {**policy_params, "streamed_chunk_tokens": int(streamed_chunk_tokens)}


def _streamed_chunk(meta: CacheMeta) -> int | None:
    streamed = meta.extra.get("streamed")
    return streamed.get("chunk_tokens") if isinstance(streamed, dict) else None


def key_for_meta(meta: CacheMeta) -> str:
    """The key ``meta``'s file is stored under: its budget, not its ratio (see the module docstring)."""
    return key_for(model_fingerprint=meta.model_fingerprint, text_sha256=meta.text_sha256, policy=meta.policy,
                   policy_params=keyed_policy_params(meta.policy_params, _streamed_chunk(meta)), ratio=None,
                   budget_tokens=meta.budget_tokens,
                   query_aware=meta.query_aware, quantization=meta.quantization)


def keys_for_meta(meta: CacheMeta) -> tuple[str, ...]:
    """Every key ``meta``'s file may be stored under: ``key_for_meta``, and the key with the ratio that files written
    before issue 14 were stored under. Both describe the same cache: the budget, not the ratio, determines it."""
    legacy = key_for(model_fingerprint=meta.model_fingerprint, text_sha256=meta.text_sha256, policy=meta.policy,
                     policy_params=keyed_policy_params(meta.policy_params, _streamed_chunk(meta)), ratio=meta.ratio,
                     budget_tokens=meta.budget_tokens,
                     query_aware=meta.query_aware, quantization=meta.quantization)
    return (key_for_meta(meta), legacy)


def check_key(key: str, meta: CacheMeta) -> None:
    """Raise CacheMismatchError unless ``meta`` is what ``key`` was derived from (text, model, policy and parameters,
    budget, quantization): a file copied or renamed under another entry's key is never served as it."""
    actual = key_for_meta(meta)
    if key not in keys_for_meta(meta):
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


@dataclass
class GcReport:
    """What ``gc`` did: entries ``removed`` (or that would be, with ``dry_run``) and entries it left because
    another process was loading or writing them (``in_use``)."""

    removed: list[StoreEntry] = field(default_factory=list)
    in_use: list[StoreEntry] = field(default_factory=list)

    @property
    def removed_bytes(self) -> int:
        return sum(entry.size_bytes for entry in self.removed)


class CacheStore:
    """Files under ``root`` (default ``cache_root() / "kv"``, i.e. ``$KVLAB_CACHE_DIR/kv``)."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else cache_root() / "kv"

    def path_for(self, key: str) -> Path:
        _check_key(key)
        return self.root / key[:2] / f"{key}{FILE_SUFFIX}"

    def lock_path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{LOCK_SUFFIX}"

    def get(self, key: str) -> Path | None:
        """The entry's path (and mark it used now), or None. Nothing stops another process from removing the file
        right after: to read it, use ``reading``."""
        path = self.path_for(key)
        try:
            os.utime(path)
        except (FileNotFoundError, NotADirectoryError):  # no entry (or the store root is not a folder yet)
            return None
        except OSError:  # a read-only store: serve the entry without recording its use
            return path if path.is_file() else None
        return path

    @contextlib.contextmanager
    def reading(self, key: str, wait_s: float = WRITE_WAIT_S) -> Iterator[Path | None]:
        """The entry's path, marked used, while a shared lock keeps ``remove`` and ``gc`` (of any process) from
        deleting it; None when there is no entry. Waits up to ``wait_s`` for a write of the same key to finish,
        then raises EntryInUseError."""
        path = self.path_for(key)
        if not path.is_file():
            yield None
            return
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(hold(self.lock_path(key), exclusive=False, wait_s=wait_s))
            except Busy:
                raise in_use_error(key, "read") from None
            except OSError:  # a read-only store: no lock file can be made, and this process cannot delete anything
                pass
            yield self.get(key)  # None when it was removed before the lock was taken

    def put(self, key: str, source: Path | str | Callable[[Path], object]) -> Path:
        """Store a file under ``key``, atomically, holding the entry's lock exclusively (waiting for readers of a
        previous file under the key). ``source`` is a ``.kv`` file to copy in, or a function that writes one at the
        path it is given (e.g. ``lambda path: save_cache(path, cache, meta)``).

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
            meta = read_meta(temp)
            if key not in keys_for_meta(meta):
                actual = key_for_meta(meta)
                raise ParameterError(f"the file's metadata hashes to key {actual[:12]}…, not {key[:12]}…; "
                                     f"store it under key_for_meta(meta)")

        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with hold(self.lock_path(key), exclusive=True, wait_s=WRITE_WAIT_S):
                try:
                    atomic_write(target, write)
                finally:
                    if not target.exists():  # nothing was stored: no lock file is left behind either
                        self.lock_path(key).unlink(missing_ok=True)
        except Busy:
            raise in_use_error(key, "store") from None
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
        """Delete the one entry whose key starts with ``key_or_prefix``; raises on no match or several, and
        EntryInUseError while another process loads or writes it."""
        entry = self.find(key_or_prefix)
        if not self._delete(entry.key):
            raise in_use_error(entry.key, "remove")
        return entry

    def remove_key(self, key: str) -> None:
        """Delete the entry stored under exactly ``key`` (no prefix matching; nothing happens if it is absent);
        EntryInUseError while another process loads or writes it."""
        if not self._delete(self.path_for(key).stem):
            raise in_use_error(key, "remove")

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

    def gc(self, max_bytes: int, *, dry_run: bool = False) -> GcReport:
        """Delete least recently used entries until at most ``max_bytes`` remain, temporary files older than an hour
        (left by interrupted writes) and lock files without an entry. Entries another process is loading or
        writing are skipped and reported (``GcReport.in_use``); ``dry_run`` deletes nothing and reports what would
        go."""
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ParameterError(f"max_bytes must be an integer >= 0 (got {max_bytes!r})")
        if not dry_run:
            self._sweep()
        entries = sorted(self.list(), key=lambda entry: entry.last_used)
        total = sum(entry.size_bytes for entry in entries)
        report = GcReport()
        for entry in entries:
            if total <= max_bytes:
                break
            if not dry_run and not self._delete(entry.key):
                report.in_use.append(entry)
                continue
            total -= entry.size_bytes
            report.removed.append(entry)
        return report

    def usage(self) -> tuple[int, int]:
        """(entries, bytes) of the store, temporary files excluded; stats the files without reading them."""
        count = total = 0
        for path in self.root.glob(f"??/*{FILE_SUFFIX}"):
            try:
                total += path.stat().st_size
                count += 1
            except FileNotFoundError:  # removed by another process meanwhile
                pass
        return count, total

    def total_bytes(self) -> int:
        """Bytes of all entries (temporary files excluded); stats the files without reading them."""
        return self.usage()[1]

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

    def _sweep(self) -> None:
        """Remove temporary files older than an hour and lock files without an entry, unless their entry's lock is
        held (a write in progress)."""
        now = time.time()
        for temp in self.root.glob(f"??/*{TEMP_SUFFIX}"):
            key = temp.name[:64]
            try:
                stale = _KEY.fullmatch(key) is not None and now - temp.stat().st_mtime > STALE_TEMP_SECONDS
            except FileNotFoundError:  # another process finished or removed it
                continue
            if stale:
                self._delete(key, temp)  # the temporary file only; skipped while its writer holds the lock
        for lock in self.root.glob(f"??/*{LOCK_SUFFIX}"):
            if _KEY.fullmatch(lock.stem) and not self.path_for(lock.stem).exists():
                self._delete(lock.stem, lock)

    def _delete(self, key: str, *files: Path) -> bool:
        """Delete ``files`` (default: the entry under ``key``) holding the entry's lock exclusively, then the lock
        file if no entry is left; False, deleting nothing, while another process holds the lock."""
        # Shard directories stay (at most 256): removing an empty one could race with a put that just made it.
        path = self.path_for(key)
        if not path.parent.is_dir():
            return True
        try:
            with hold(self.lock_path(key), exclusive=True, wait_s=0):
                for victim in files or (path,):
                    victim.unlink(missing_ok=True)
                if not path.exists():
                    self.lock_path(key).unlink(missing_ok=True)  # safe while held: see locks.py
        except Busy:
            return False
        except OSError as error:
            raise write_error(error, self.root, f"remove {key[:12]}") from None
        fsync_directory(path.parent)
        return True


def entry_of(path: Path | str) -> tuple[CacheStore, str] | None:
    """The store and key of a file that sits where a store keeps an entry (``ROOT/ab/abcd….kv``), else None: a
    cache opened by its path is then read under the entry's lock too, so `cache rm|gc` cannot delete it mid-load."""
    path = Path(path).expanduser().absolute()
    key = path.name[:-len(FILE_SUFFIX)] if path.name.endswith(FILE_SUFFIX) else ""
    if not _KEY.fullmatch(key) or path.parent.name != key[:2]:
        return None
    return CacheStore(path.parent.parent), key


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ParameterError(f"a cache key is 64 lowercase hex characters (got {key!r}); compute it with key_for")
