"""The content-addressed store: keys, put/get/list/remove, LRU garbage collection, stale temporary files, concurrent
writers, and human sizes. Entries are small synthetic caches, so these tests take milliseconds each."""

import os
import threading
import time

import pytest
import torch

from kvlab.cache.kvcache import PADDING_POSITION, KVCache, LayerCache
from kvlab.cache.layout import LayerSpec
from kvlab.cache.quant import QuantizationParams
from kvlab.errors import CorruptCacheError, MissingCacheFileError, ParameterError, UnknownCacheEntryError
from kvlab.store import CacheMeta, CacheStore, key_for, key_for_meta, load_cache, parse_size, save_cache

SPEC = LayerSpec("full", 2, 4, 8)


def small_cache(tokens=40, seed=0) -> KVCache:
    generator = torch.Generator().manual_seed(seed)
    layer = LayerCache(SPEC, torch.randn((2, tokens, 8), generator=generator),
                       torch.randn((2, tokens, 8), generator=generator), torch.arange(tokens).expand(2, tokens).clone())
    return KVCache([layer], tokens)


def small_meta(cache: KVCache, text_seed=0, **changes) -> CacheMeta:
    fields = dict(model="tiny", model_fingerprint="0123456789abcdef", tokenizer_fingerprint="fedcba9876543210",
                  policy="snapkv", policy_params={"window_tokens": 32, "kernel_size": 7}, ratio=0.5,
                  budget_tokens=20, query_aware=False, context_tokens=cache.num_tokens, num_tokens=cache.num_tokens,
                  layout=(SPEC,), dtype="float32", quantization=None, text_sha256=f"{text_seed:064x}")
    fields.update(changes)
    return CacheMeta(**fields)


def put_entry(store: CacheStore, text_seed=0, tokens=40, **changes):
    cache = small_cache(tokens, seed=text_seed)
    meta = small_meta(cache, text_seed, **changes)
    key = key_for_meta(meta)
    return key, store.put(key, lambda path: save_cache(path, cache, meta))


@pytest.fixture
def store(tmp_path):
    return CacheStore(tmp_path / "kv")


def test_default_root_follows_kvlab_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path / "cache"))
    assert CacheStore().root == tmp_path / "cache" / "kv"


KEY_BASE = dict(model_fingerprint="0123456789abcdef", text_sha256="0" * 64, policy="snapkv", policy_params={},
                ratio=0.5, budget_tokens=None, query_aware=False, quantization=None)


def test_key_is_stable_and_covers_every_input():
    base = dict(model_fingerprint="0123456789abcdef", text_sha256="0" * 64, policy="snapkv",
                policy_params={"window_tokens": 32, "kernel_size": 7}, ratio=0.5, budget_tokens=None,
                query_aware=False, quantization=None)
    key = key_for(**base)
    assert len(key) == 64 and key == key_for(**dict(base, policy_params={"kernel_size": 7, "window_tokens": 32}))
    changes = dict(model_fingerprint="1123456789abcdef", text_sha256="1" * 64, policy="h2o",
                   policy_params={"window_tokens": 16, "kernel_size": 7}, ratio=0.75, budget_tokens=64,
                   query_aware=True, quantization=QuantizationParams("int4"))
    keys = {key_for(**dict(base, **{name: value})) for name, value in changes.items()}
    assert len(keys | {key}) == len(changes) + 1
    assert key_for(**dict(base, quantization=QuantizationParams("int4"))) == key_for(
        **dict(base, quantization={"scheme": "int4", "group_size": 32, "residual_tokens": 32}))


@pytest.mark.parametrize("quantize_tail", [False, True])
def test_a_quantized_file_loads_with_the_tail_rule_it_was_made_with(tmp_path, quantize_tail):
    """Files without ``quantize_tail`` (all files made before it existed) hold no such key and keep a partial last
    key group in full precision; they load that way, under the store key they were written with. A file made with
    it says so and loads with it."""
    from kvlab.cache.quant import dequantize_cache, quantize_cache
    from kvlab.store.format import load_cache

    cache = small_cache(tokens=45)
    quantized = quantize_cache(cache, "int4", 8, 0, quantize_tail=quantize_tail)
    data = quantized.params.to_dict()
    assert ("quantize_tail" in data) == quantize_tail
    assert key_for(**dict(KEY_BASE, quantization=quantized.params)) == key_for(**dict(KEY_BASE, quantization=data))
    meta = small_meta(cache, quantization=quantized.params)
    save_cache(tmp_path / "c.kv", quantized, meta)
    loaded = load_cache(tmp_path / "c.kv")
    assert loaded.meta.quantization == quantized.params
    held, expected = loaded.cache.dense().layers[0], dequantize_cache(quantized).layers[0]
    assert held.slots == (48 if quantize_tail else 45)  # a partial last group: its missing rows are padding
    real = held.positions[0] != PADDING_POSITION
    assert torch.equal(held.positions[:, real], expected.positions)
    # without the tail rule the partial last group is the residual, held at 16 bits (bf16 rounding, 2**-8)
    tolerance = {} if quantize_tail else {"rtol": 2 ** -8, "atol": 1e-6}
    torch.testing.assert_close(held.keys[:, real], expected.keys, **tolerance)


def test_put_get_list_and_load(store):
    key, path = put_entry(store)
    assert path == store.root / key[:2] / f"{key}.kv"
    assert store.get(key) == path
    assert store.get("f" * 64) is None
    (entry,) = store.list()
    assert (entry.key, entry.path, entry.size_bytes) == (key, path, path.stat().st_size)
    assert entry.meta.policy == "snapkv" and entry.problem is None
    assert entry.summary()["context_tokens"] == 40
    assert store.total_bytes() == path.stat().st_size
    assert torch.equal(load_cache(store.get(key)).cache.layers[0].keys, small_cache().layers[0].keys)


def test_put_copies_a_file_and_refuses_bad_sources(store, tmp_path):
    cache = small_cache()
    meta = small_meta(cache)
    source = tmp_path / "made-elsewhere.kv"
    save_cache(source, cache, meta)
    key = key_for_meta(meta)
    assert store.put(key, source).read_bytes() == source.read_bytes()
    with pytest.raises(ParameterError, match="hashes to key"):
        store.put("e" * 64, source)
    (tmp_path / "broken.kv").write_bytes(source.read_bytes()[:100])
    with pytest.raises(CorruptCacheError):
        store.put("e" * 64, tmp_path / "broken.kv")
    with pytest.raises(MissingCacheFileError):
        store.put("e" * 64, tmp_path / "absent.kv")
    with pytest.raises(ParameterError, match="64 lowercase hex"):
        store.get("not-a-key")
    # no temporary files left, and no lock files of the refused keys
    assert sorted(p.name for p in store.root.rglob("*") if p.is_file()) == [f"{key}.kv", f"{key}.lock"]


def test_get_marks_an_entry_used(store):
    key, path = put_entry(store)
    os.utime(path, (1_000_000, 1_000_000))
    assert store.list()[0].last_used == 1_000_000
    store.get(key)
    assert abs(store.list()[0].last_used - time.time()) < 60


def test_gc_removes_least_recently_used_first(store):
    paths = {}
    for seed in range(3):
        key, path = put_entry(store, text_seed=seed)
        os.utime(path, (1_000_000 + seed, 1_000_000 + seed))
        paths[seed] = (key, path)
    store.get(paths[0][0])  # the oldest becomes the most recent
    size = paths[0][1].stat().st_size
    removed = store.gc(max_bytes=2 * size).removed
    assert [entry.key for entry in removed] == [paths[1][0]]
    assert store.total_bytes() == 2 * size
    assert store.gc(max_bytes=2 * size).removed == []
    removed = store.gc(max_bytes=0).removed
    assert [entry.key for entry in removed] == [paths[2][0], paths[0][0]]
    assert store.list() == [] and store.total_bytes() == 0
    assert [p for p in store.root.rglob("*") if p.is_file()] == []  # lock files go with their entries
    with pytest.raises(ParameterError):
        store.gc(max_bytes=-1)


def test_gc_removes_stale_temporary_files(store):
    key, path = put_entry(store)
    stale = path.with_name(f"{path.name}.123-abcd.tmp")
    fresh = path.with_name(f"{path.name}.456-ef01.tmp")
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"being written")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert store.gc(max_bytes=10**9).removed == []
    assert not stale.exists() and fresh.exists() and path.exists()
    assert store.total_bytes() == path.stat().st_size  # temporary files are not entries


def test_remove_by_unique_prefix(store):
    key, path = put_entry(store)
    # two more entries under hand-made keys sharing a prefix
    for suffix in ("0", "1"):
        twin = store.root / "ab" / f"ab{suffix * 62}.kv"
        twin.parent.mkdir(parents=True, exist_ok=True)
        twin.write_bytes(path.read_bytes())
    with pytest.raises(ParameterError, match="2 cache entries start with 'ab'"):
        store.remove("ab")
    with pytest.raises(UnknownCacheEntryError, match="no cache entry"):
        store.remove("zz")
    with pytest.raises(ParameterError):
        store.remove("  ")
    assert store.remove("ab0").key == "ab" + "0" * 62
    assert store.remove(key[:10].upper()).key == key
    assert [entry.key for entry in store.list()] == ["ab" + "1" * 62]


def test_list_reports_unreadable_entries(store):
    key, path = put_entry(store)
    path.write_bytes(path.read_bytes()[:50])
    (entry,) = store.list()
    assert entry.meta is None and "truncated or corrupted" in entry.problem
    assert entry.summary()["problem"] == entry.problem


def test_concurrent_writers_of_one_key(store):
    """Writers of one key race; each rename is atomic, so the entry is always one writer's complete file."""
    cache = small_cache()
    metas = [small_meta(cache, extra={"writer": index}) for index in range(8)]  # extra is not part of the key
    key = key_for_meta(metas[0])
    assert {key_for_meta(meta) for meta in metas} == {key}
    errors = []

    def writer(meta):
        try:
            for _ in range(5):
                store.put(key, lambda path: save_cache(path, cache, meta))
                load_cache(store.get(key))  # readers never see a torn file
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(meta,)) for meta in metas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    loaded = load_cache(store.get(key))
    assert loaded.meta.extra["writer"] in range(8)
    assert sorted(p.name for p in store.root.rglob("*") if p.is_file()) == [f"{key}.kv", f"{key}.lock"]


@pytest.mark.parametrize("text,expected", [
    ("2GB", 2_000_000_000), ("2 GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5kb", 1500), ("10KiB", 10240),
    ("123", 123), ("0", 0), ("7B", 7), ("3TB", 3 * 10**12), (" 1 mb ", 10**6),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "2 gigabytes", "1e9", "2GB2", "two", None, 5])
def test_parse_size_refuses(text):
    with pytest.raises(ParameterError, match="KiB"):
        parse_size(text)
