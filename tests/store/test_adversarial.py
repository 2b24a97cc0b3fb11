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
