"""Issue 14 on the store: a file copied under another entry's key is never served as that entry, a cancelled
compression writes nothing, and a store the process cannot write serves reads and refuses writes in one line."""

from __future__ import annotations

import errno
import pathlib
import shutil

import pytest

from kvlab.engine import Engine
from kvlab.errors import CacheMismatchError
from kvlab.policies import make_policy
from kvlab.store import CacheStore
from kvlab.store.documents import compress_document, open_document
from kvlab.store.store import StoreWriteError, check_key


class Stop(Exception):
    pass


@pytest.fixture
def store(tmp_path):
    return CacheStore(tmp_path / "kv")


@pytest.fixture(scope="module")
def small_chunks(tiny_llama):
    return Engine(tiny_llama, chunk_tokens=16)


def test_a_file_under_another_key_is_refused_and_recomputed(llama, store):
    policy = make_policy("snapkv")
    first = compress_document(llama, "the pass key is 1111. " * 20, policy, ratio=0.5, store=store)
    second = compress_document(llama, "the pass key is 2222. " * 20, policy, ratio=0.5, store=store)
    shutil.copyfile(second.path, first.path)  # a valid .kv, but another document's
    with pytest.raises(CacheMismatchError, match="copied or renamed"):
        open_document(llama, first.key[:10], store=store)
    again = compress_document(llama, "the pass key is 1111. " * 20, policy, ratio=0.5, store=store)
    assert not again.from_store  # recomputed, not served as the other document
    open_document(llama, first.key, store=store)  # and the entry is right again
    check_key(first.key, open_document(llama, str(first.path)).meta)


@pytest.mark.parametrize("cancel_at", [2, "commit"])
def test_a_cancelled_compression_writes_nothing(small_chunks, store, cancel_at):
    calls = []

    def check():
        calls.append(1)
        if cancel_at == "commit" and store.root.exists() and list(store.root.glob("??/*.tmp")):
            raise Stop  # the file is written but not yet renamed into place
        if cancel_at != "commit" and len(calls) >= cancel_at:
            raise Stop

    with pytest.raises(Stop):
        compress_document(small_chunks, "word " * 200, make_policy("snapkv"), ratio=0.5, store=store, check=check)
    assert store.list() == [] and list(store.root.glob("**/*.tmp")) == []
    assert len(calls) >= 2  # checked between prefill chunks, not only once
    # the hook is gone: the same engine prefills normally afterwards
    assert not compress_document(small_chunks, "word " * 200, make_policy("snapkv"), ratio=0.5, store=store).from_store


@pytest.fixture
def read_only(store, monkeypatch):
    """The store as a read-only mount shows it (tests run as root, so chmod would not stop writes)."""
    root = str(store.root)
    real_utime, real_unlink, real_mkdir = __import__("os").utime, pathlib.Path.unlink, pathlib.Path.mkdir

    def refuse(path) -> None:
        if str(path).startswith(root):
            raise OSError(errno.EROFS, "Read-only file system", str(path))

    def utime(path, *args, **kwargs):
        refuse(path)
        return real_utime(path, *args, **kwargs)

    def unlink(self, *args, **kwargs):
        refuse(self)
        return real_unlink(self, *args, **kwargs)

    def mkdir(self, *args, **kwargs):
        refuse(self)
        return real_mkdir(self, *args, **kwargs)

    def enable():
        monkeypatch.setattr("os.utime", utime)
        monkeypatch.setattr(pathlib.Path, "unlink", unlink)
        monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)

    return enable


def test_a_read_only_store_serves_reads_and_refuses_writes(llama, store, read_only):
    document = compress_document(llama, "the pass key is 3333. " * 20, make_policy("snapkv"), ratio=0.5,
                                 store=store)
    read_only()
    assert store.get(document.key) == document.path  # the last-used update fails and is skipped
    assert compress_document(llama, "the pass key is 3333. " * 20, make_policy("snapkv"), ratio=0.5,
                             store=store).from_store
    open_document(llama, document.key, store=store)
    with pytest.raises(StoreWriteError, match="read-only") as raised:
        compress_document(llama, "another text " * 20, make_policy("snapkv"), ratio=0.5, store=store)
    assert raised.value.reason == "read_only"
    with pytest.raises(StoreWriteError, match="read-only"):
        store.remove(document.key[:8])
    with pytest.raises(StoreWriteError, match="read-only"):
        store.gc(0)
    assert document.path.exists()


@pytest.mark.parametrize("argv", [["cache", "rm", "PREFIX"], ["cache", "gc", "--max-size", "0"]])
def test_cache_rm_and_gc_on_a_read_only_store_end_in_one_line(llama, store, read_only, monkeypatch, capsys, argv):
    from kvlab.cli import main

    document = compress_document(llama, "the pass key is 4444. " * 20, make_policy("snapkv"), ratio=0.5,
                                 store=store)
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(store.root.parent))  # the CLI's store, $KVLAB_CACHE_DIR/kv
    read_only()
    code = main([part.replace("PREFIX", document.key[:8]) for part in argv])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "read-only" in error and "Traceback" not in error


# -- locks between processes: `cache rm|gc` never delete what another process loads or writes ----------------------
HOLDER = """
import sys, time
from pathlib import Path
from kvlab.store import CacheStore
store, key, mode = CacheStore(sys.argv[1]), sys.argv[2], sys.argv[3]
if mode == "read":
    with store.reading(key) as path:
        print("held", path is not None, flush=True)
        sys.stdin.readline()
else:  # write: a put that stops between writing its temporary file and renaming it
    def write(temporary):
        Path(temporary).write_bytes(Path(sys.argv[4]).read_bytes())
        print("held", True, flush=True)
        sys.stdin.readline()
    store.put(key, write)
print("released", flush=True)
"""


@pytest.fixture
def holder(store):
    """``holder(key, mode)`` starts a process holding the entry (``"read"``: loading it; ``"write"``: writing it)
    until the test ends or ``release`` is called."""
    import subprocess
    import sys

    started = []

    def start(key: str, mode: str, source: str = "") -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLDER, str(store.root), key, mode, source],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout is not None and process.stdout.readline().startswith("held")
        return process

    yield start
    for process in started:
        release(process)


def release(process) -> None:
    if process.poll() is None:
        process.communicate("\n", timeout=60)
    assert process.returncode == 0


def test_gc_and_rm_skip_an_entry_another_process_is_loading(llama, store, holder, monkeypatch, capsys):
    """Defect: `cache gc` and `cache rm` deleted files other processes were loading. Now they skip them and say so."""
    from kvlab.cli import main
    from kvlab.store.store import EntryInUseError

    document = compress_document(llama, "the pass key is 5151. " * 20, make_policy("snapkv"), ratio=0.5, store=store)
    process = holder(document.key, "read")
    report = store.gc(0)
    assert report.removed == [] and [entry.key for entry in report.in_use] == [document.key]
    with pytest.raises(EntryInUseError, match="another process is loading or writing it"):
        store.remove(document.key[:10])
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(store.root.parent))
    assert main(["cache", "gc", "--max-size", "0"]) == 0
    assert "1 in use were skipped" in capsys.readouterr().out
    assert main(["cache", "rm", document.key[:10]]) == 2
    assert "another process" in capsys.readouterr().err
    assert document.path.exists()
    release(process)
    assert [entry.key for entry in store.gc(0).removed] == [document.key]
    assert [path for path in store.root.rglob("*") if path.is_file()] == []  # the lock file went too


def test_gc_does_not_touch_a_file_another_process_is_writing(llama, store, holder, tmp_path):
    import os
    import time

    document = compress_document(llama, "the pass key is 5252. " * 20, make_policy("snapkv"), ratio=0.5, store=store)
    source = tmp_path / "copy.kv"
    shutil.copyfile(document.path, source)
    process = holder(document.key, "write", str(source))  # rewriting the entry: its temporary file is complete
    temporary = next(store.root.glob("??/*.tmp"))
    os.utime(temporary, (time.time() - 7200, time.time() - 7200))  # looks abandoned, but its writer holds the lock
    report = store.gc(0)
    assert report.removed == [] and len(report.in_use) == 1
    assert temporary.exists() and document.path.exists()
    release(process)
    assert open_document(llama, document.key, store=store).meta.context_tokens == document.context_tokens
    assert list(store.root.glob("??/*.tmp")) == []


CHURN = """
import sys, time
from kvlab.store import CacheStore, load_cache
from kvlab.store.store import EntryInUseError
store, key, role, source = CacheStore(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
deadline, counts = time.monotonic() + float(sys.argv[5]), {"stored": 0, "loaded": 0, "removed": 0, "skipped": 0}
while time.monotonic() < deadline:
    if role == "writer":
        path = store.put(key, source)
        counts["stored"] += 1
        with store.reading(key) as path:
            if path is not None:
                load_cache(path)  # verifies every checksum: a torn or half-deleted file would raise
                counts["loaded"] += 1
    else:
        report = store.gc(0)
        counts["removed"] += len(report.removed)
        counts["skipped"] += len(report.in_use)
        try:
            store.remove_key(key)
        except EntryInUseError:
            counts["skipped"] += 1
print(counts, flush=True)
"""


def test_concurrent_writers_readers_and_gc_never_fail(llama, store, tmp_path):
    """Two processes store and load one key while a third collects garbage: every put and load succeeds, and what
    is left is one valid file or none (no temporary files, no stray lock files)."""
    import ast
    import subprocess
    import sys

    document = compress_document(llama, "the pass key is 5353. " * 20, make_policy("snapkv"), ratio=0.5, store=store)
    source = tmp_path / "source.kv"
    shutil.copyfile(document.path, source)
    processes = [subprocess.Popen([sys.executable, "-c", CHURN, str(store.root), document.key, role, str(source), "4"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for role in ("writer", "writer", "gc")]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-2000:]
        results.append(ast.literal_eval(out.strip().splitlines()[-1]))
    assert all(result["stored"] > 0 and result["loaded"] > 0 for result in results[:2]), results
    assert results[2]["removed"] > 0, results  # the collector did run between the writes
    left = [path for path in store.root.rglob("*") if path.is_file()]
    assert {path.suffix for path in left} <= {".kv", ".lock"} and len(left) in (0, 2), left
    if left:
        open_document(llama, document.key, store=store)


# -- keys: the budget, not the ratio ---------------------------------------------------------------------------------
def test_a_ratio_that_keeps_the_same_budget_finds_the_same_file(llama, store):
    """Defect: a ratio of 0.50001 made a new file of the same cache. Keys hold the resolved budget, not the ratio."""
    policy = make_policy("snapkv")
    text = "the pass key is 6161. " * 20
    first = compress_document(llama, text, policy, ratio=0.5, store=store)
    again = compress_document(llama, text, policy, ratio=0.50001, store=store)
    assert again.from_store and again.key == first.key and len(store.list()) == 1
    by_budget = compress_document(llama, text, policy, budget_tokens=first.meta.budget_tokens, store=store)
    assert by_budget.from_store and by_budget.key == first.key
    assert not compress_document(llama, text, policy, ratio=0.75, store=store).from_store  # another budget


def test_files_keyed_with_their_ratio_before_stay_readable(llama, store):
    from kvlab.store.store import key_for

    document = compress_document(llama, "the pass key is 6262. " * 20, make_policy("snapkv"), ratio=0.5, store=store)
    meta = document.meta
    legacy = key_for(model_fingerprint=meta.model_fingerprint, text_sha256=meta.text_sha256, policy=meta.policy,
                     policy_params=meta.policy_params, ratio=meta.ratio, budget_tokens=meta.budget_tokens,
                     query_aware=False, quantization=meta.quantization)
    assert legacy != document.key
    store.put(legacy, document.path)  # as an older kvlab stored it
    store.remove_key(document.key)
    assert open_document(llama, legacy[:12], store=store).meta.budget_tokens == meta.budget_tokens


def test_admit_refuses_before_the_prefill_and_before_the_commit(small_chunks, store):
    seen = []

    def admit(new_bytes: int) -> None:
        seen.append(new_bytes)
        if new_bytes > 0:
            raise Stop

    with pytest.raises(Stop):
        compress_document(small_chunks, "word " * 100, make_policy("snapkv"), ratio=0.5, store=store, admit=admit)
    assert seen[0] == 0 and seen[1] > 1000
    assert [path for path in store.root.rglob("*") if path.is_file()] == []  # no entry, temporary or lock file


def test_a_cache_opened_by_its_store_path_is_read_under_the_entry_lock(llama, store, monkeypatch, tmp_path):
    """`kvlab ask --cache ROOT/ab/abcd….kv` used to load without the entry's lock, so `cache gc` could delete the
    file mid-load; now a store file named by its path is read like one named by its key (a file elsewhere is not
    locked, and is still read)."""
    import kvlab.store.documents as documents
    from kvlab.store.store import entry_of

    document = compress_document(llama, "the pass key is 6161. " * 20, make_policy("snapkv"), ratio=0.5, store=store)
    found_store, found_key = entry_of(document.path)
    assert found_key == document.key and found_store.root.resolve() == store.root.resolve()
    seen = {}
    real_open = documents._open

    def open_while_collecting(engine, path, key, kv_quant):
        seen["gc"] = store.gc(0)  # another `kvlab cache gc` during the load
        seen["key"] = key
        return real_open(engine, path, key, kv_quant)

    monkeypatch.setattr(documents, "_open", open_while_collecting)
    loaded = documents.open_document(llama, str(document.path))
    assert seen["key"] == document.key and seen["gc"].removed == [] and len(seen["gc"].in_use) == 1
    assert loaded.meta.context_tokens == document.context_tokens and document.path.exists()
    copy = tmp_path / "copy.kv"
    shutil.copyfile(document.path, copy)
    assert entry_of(copy) is None
    documents.open_document(llama, str(copy))
    assert seen["key"] is None
