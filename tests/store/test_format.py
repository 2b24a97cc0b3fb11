"""The .kv file round-trips exactly (plain caches), reproduces the dequantized cache (quantized ones), and the engine
continues from a loaded cache exactly as from the in-memory one."""

import dataclasses
import json
import os

import pytest
import safetensors
import torch

from kvlab.cache.kvcache import KVCache, LayerCache
from kvlab.cache.quant import dequantize_cache, quantize_cache
from kvlab.cache.quantized import QuantizedLayerCache
from kvlab.engine import SamplingConfig
from kvlab.errors import ParameterError
from kvlab.models.fingerprint import tokenizer_fingerprint
from kvlab.store import FORMAT_VERSION, CacheMeta, load_cache, read_meta, save_cache


def assert_same_cache(actual: KVCache, expected: KVCache):
    assert actual.num_tokens == expected.num_tokens
    assert len(actual.layers) == len(expected.layers)
    for a, e in zip(actual.layers, expected.layers):
        assert a.spec == e.spec
        assert torch.equal(a.positions, e.positions)
        assert a.keys.dtype == e.keys.dtype and torch.equal(a.keys, e.keys)
        assert a.values.dtype == e.values.dtype and torch.equal(a.values, e.values)


def assert_same_tokens(actual: KVCache, expected: KVCache):
    """Same tokens per head with the same keys and values, whatever the slot order and padding. A layer held
    quantized keeps its residual (the tokens that fill no key group) at ``residual_dtype``: those rows must equal
    the expected ones rounded to it, exactly."""
    assert actual.num_tokens == expected.num_tokens
    for held, e in zip(actual.layers, expected.layers):
        a, e = held.dense(), e.dense()
        for head in range(a.spec.kv_heads):
            found, wanted = a.positions[head], e.positions[head]
            a_order, e_order = found[found >= 0].argsort(), wanted[wanted >= 0].argsort()
            positions = wanted[wanted >= 0][e_order]
            assert torch.equal(found[found >= 0][a_order], positions)
            keys, values = e.keys[head][wanted >= 0][e_order], e.values[head][wanted >= 0][e_order]
            if isinstance(held, QuantizedLayerCache):
                rows = torch.isin(positions, held.residual.positions[head])
                narrow = held.residual.keys.dtype
                keys[rows], values[rows] = keys[rows].to(narrow).to(keys.dtype), values[rows].to(narrow).to(keys.dtype)
            assert torch.equal(a.keys[head][found >= 0][a_order], keys)
            assert torch.equal(a.values[head][found >= 0][a_order], values)


@pytest.mark.parametrize("fixture", ["llama_snapkv", "llama_adakv", "gemma_snapkv"])
def test_plain_round_trip_is_exact(fixture, request, tmp_path):
    run = request.getfixturevalue(fixture)
    if fixture == "llama_adakv":
        assert any(layer.is_ragged for layer in run.cache.layers)
    if fixture == "gemma_snapkv":
        assert {layer.spec.kind for layer in run.cache.layers} == {"full", "sliding"}
    path = tmp_path / "doc.kv"
    written = save_cache(path, run.cache, run.meta(), run.result.last_logits)
    loaded = load_cache(path, expected_model_fingerprint=run.engine.loaded.fingerprint,
                        expected_tokenizer_fingerprint=tokenizer_fingerprint(run.engine.tokenizer))
    assert written == path.stat().st_size == loaded.file_bytes
    assert_same_cache(loaded.cache, run.cache)
    assert torch.equal(loaded.last_logits, run.result.last_logits)
    assert loaded.meta == dataclasses.replace(run.meta(), payload_sha256=loaded.meta.payload_sha256,
                                              created_at=loaded.meta.created_at)
    assert len(loaded.meta.payload_sha256) == 64
    assert read_meta(path) == loaded.meta


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("fixture", ["llama_adakv", "gemma_snapkv"])
def test_quantized_round_trip(scheme, fixture, request, tmp_path):
    run = request.getfixturevalue(fixture)
    quantized = quantize_cache(run.cache, scheme, group_size=16, residual_tokens=8)
    path = tmp_path / "doc.kv"
    save_cache(path, quantized, run.meta(quantized))
    loaded = load_cache(path)
    assert loaded.meta.quantization == quantized.params
    assert loaded.last_logits is None
    # full-attention layers stay quantized in memory (nothing expanded); their tokens equal the dequantized file's
    assert all(layer.quantized == (layer.spec.kind == "full") for layer in loaded.cache.layers)
    assert loaded.cache.held_bytes < dequantize_cache(quantized).held_bytes
    assert_same_tokens(loaded.cache, dequantize_cache(quantized))
    plain = tmp_path / "plain.kv"
    save_cache(plain, run.cache, run.meta())
    assert path.stat().st_size < plain.stat().st_size


def test_bf16_cache_round_trip(llama_snapkv, tmp_path):
    run = llama_snapkv
    cache = KVCache([LayerCache(layer.spec, layer.keys.bfloat16(), layer.values.bfloat16(), layer.positions)
                     for layer in run.cache.layers], run.cache.num_tokens)
    meta = run.meta(cache)
    assert meta.dtype == "bfloat16"
    save_cache(tmp_path / "bf16.kv", cache, meta)
    assert_same_cache(load_cache(tmp_path / "bf16.kv").cache, cache)


def test_engine_continues_identically(llama_snapkv, tmp_path):
    run = llama_snapkv
    suffix = torch.randint(3, 259, (12,), generator=torch.Generator().manual_seed(7))
    save_cache(tmp_path / "doc.kv", run.cache, run.meta(), run.result.last_logits)
    loaded = load_cache(tmp_path / "doc.kv")
    sampling = SamplingConfig()
    expected = run.engine.continue_and_decode(run.cache.clone(), suffix, None, max_new_tokens=8, sampling=sampling)
    actual = run.engine.continue_and_decode(loaded.cache, suffix, None, max_new_tokens=8, sampling=sampling)
    assert len(expected.token_ids) == 8
    assert actual.token_ids == expected.token_ids
    # the stored last logits answer straight away, without a suffix
    loaded = load_cache(tmp_path / "doc.kv")
    expected = run.engine.continue_and_decode(run.cache.clone(), None, run.result.last_logits, max_new_tokens=8,
                                              sampling=sampling)
    actual = run.engine.continue_and_decode(loaded.cache, None, loaded.last_logits, max_new_tokens=8,
                                            sampling=sampling)
    assert actual.token_ids == expected.token_ids


def test_file_layout_is_plain_safetensors(llama_snapkv, tmp_path):
    path = tmp_path / "doc.kv"
    save_cache(path, llama_snapkv.cache, llama_snapkv.meta(), llama_snapkv.result.last_logits)
    with safetensors.safe_open(path, "pt") as handle:
        names = set(handle.keys())
        metadata = handle.metadata()
    assert set(metadata) == {"kvlab"}
    stored = json.loads(metadata["kvlab"])
    assert stored["format_version"] == FORMAT_VERSION
    assert {"model_fingerprint", "tokenizer_fingerprint", "payload_sha256", "meta_sha256", "layout"} <= set(stored)
    assert names == {"last_logits"} | {f"layer.{i}.{n}" for i in range(2) for n in ("keys", "values", "positions")}


def test_save_refuses_metadata_for_another_cache(llama_snapkv, gemma_snapkv, tmp_path):
    with pytest.raises(ParameterError, match="layout"):
        save_cache(tmp_path / "x.kv", llama_snapkv.cache, gemma_snapkv.meta())
    meta = dataclasses.replace(llama_snapkv.meta(), num_tokens=999)
    with pytest.raises(ParameterError, match="num_tokens"):
        save_cache(tmp_path / "x.kv", llama_snapkv.cache, meta)
    quantized = quantize_cache(llama_snapkv.cache, "int8")
    with pytest.raises(ParameterError, match="quantization"):
        save_cache(tmp_path / "x.kv", quantized, llama_snapkv.meta())
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic(llama_snapkv, tmp_path, monkeypatch):
    path = tmp_path / "doc.kv"
    save_cache(path, llama_snapkv.cache, llama_snapkv.meta())
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_cache(path, llama_snapkv.cache, llama_snapkv.meta(note="second"))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["doc.kv"]  # the temporary file is gone too


@pytest.mark.parametrize("field,value", [
    ("ratio", 1.0), ("ratio", "0.5"), ("budget_tokens", -1), ("budget_tokens", True), ("query_aware", 1),
    ("num_tokens", 10), ("dtype", "int8"), ("text_sha256", "abc"), ("model_fingerprint", "XYZ"),
    ("created_at", "yesterday"), ("created_at", "2025-01-01T00:00:00"), ("policy", ""), ("extra", {"x": object()}),
    ("layout", ()),
])
def test_meta_validates_every_field(llama_snapkv, field, value):
    with pytest.raises(ParameterError, match=field):
        dataclasses.replace(llama_snapkv.meta(), **{field: value})


def test_meta_json_round_trip(llama_snapkv):
    meta = llama_snapkv.meta(note="kept", numbers=[1, 2])
    assert CacheMeta.from_json(meta.to_json()) == meta


def test_files_written_before_layouts_carried_rope_theta_still_load(llama_snapkv):
    import dataclasses

    from kvlab.store.meta import CacheMeta

    data = dataclasses.asdict(llama_snapkv.meta())
    data["layout"] = list(data["layout"])
    for entry in data["layout"]:
        assert entry.pop("rope_theta") is not None  # tiny Llama uses standard RoPE
    data["quantization"] = None
    meta = CacheMeta.from_dict(data)
    assert all(spec.rope_theta is None for spec in meta.layout)
    assert list(meta.layout) == list(llama_snapkv.engine.layout)  # the base takes no part in the layout check
