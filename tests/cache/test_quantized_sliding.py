"""Sliding-window layers held quantized per token: each token's codes stay within half a step, streaming equals
quantizing the window at once, decoding stays close to the fp cache, the window's bytes stay bounded past the
window, forks are independent, and ``dense`` gives the fp layer back with its positions."""

import math

import pytest
import torch

from kvlab.cache.kvcache import MIN_SPARE_SLOTS, KVCache, LayerCache
from kvlab.cache.layout import LayerSpec
from kvlab.cache.quant import QuantizationParams, packed_width
from kvlab.cache.quantized import QuantizedLayerCache, quantization_of, quantize_in_memory
from kvlab.cache.quantized_sliding import QuantizedSlidingLayerCache
from kvlab.engine import Engine
from kvlab.engine.runner import ModelRunner
from kvlab.policies import make_policy

SPEC = LayerSpec("sliding", kv_heads=2, query_heads=4, head_dim=20, window_tokens=9)


def random_ids(count: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 250, (count,), generator=torch.Generator().manual_seed(seed))


def random_rows(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (SPEC.kv_heads, count, SPEC.head_dim)
    return torch.randn(shape, generator=generator) * 3, torch.randn(shape, generator=generator)


def plain_layer(count: int, seed: int) -> LayerCache:
    keys, values = random_rows(count, seed)
    return LayerCache(SPEC, keys, values, torch.arange(count).expand(SPEC.kv_heads, count).clone())


def sliding_only(cache: KVCache, params: QuantizationParams) -> KVCache:
    """Sliding layers quantized, full layers as they are: differences come from the sliding layers alone."""
    return KVCache([QuantizedSlidingLayerCache.from_layer(layer, params) if layer.spec.kind == "sliding"
                    else layer.fork() for layer in cache.layers], cache.num_tokens)


def kl_and_agreement(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    expected, actual = torch.log_softmax(reference, dim=-1), torch.log_softmax(other, dim=-1)
    kl = float((expected.exp() * (expected - actual)).sum(dim=-1).mean())
    return kl, float((reference.argmax(dim=-1) == other.argmax(dim=-1)).float().mean())


@pytest.fixture(scope="module")
def prefilled(tiny_gemma3):
    """The tiny Gemma 3 (window 16: sliding layers keep 15 slots) after 300 tokens, plain fp32 cache."""
    engine = Engine(tiny_gemma3, chunk_tokens=64)
    result = engine.prefill(random_ids(300, 0), make_policy("full").observation_request())
    return engine, result.cache


# -- the layer on its own ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["int8", "int4", "int2"])
@pytest.mark.parametrize("group_size", [8, 64])  # 8 leaves a last group of 4 of the 20 channels; 64 > head_dim
def test_each_token_is_within_half_a_step_of_its_group(scheme, group_size):
    source = plain_layer(12, seed=1)
    layer = QuantizedSlidingLayerCache.from_layer(source, QuantizationParams(scheme, group_size, residual_tokens=3))
    assert layer.code_slots == 9 and layer.residual.slots == 3
    dense = layer.dense()
    assert not dense.quantized and torch.equal(dense.positions, source.positions)
    levels = 2 ** QuantizationParams(scheme).bits - 1
    group = min(group_size, SPEC.head_dim)
    for original, restored in ((source.keys, dense.keys), (source.values, dense.values)):
        assert torch.equal(restored[:, 9:], original[:, 9:])  # the residual is exact
        for start in range(0, SPEC.head_dim, group):
            block = original[:, :9, start:start + group]
            step = (block.amax(dim=-1) - block.amin(dim=-1)) / levels  # per token: its own range only
            error = (restored[:, :9, start:start + group] - block).abs().amax(dim=-1)
            assert bool((error <= step * 0.5 * 1.01 + 1e-3).all()), (scheme, group_size, start)


@pytest.mark.parametrize("residual_tokens", [0, 3])
def test_streaming_equals_quantizing_the_window_at_once(residual_tokens):
    """Rows are quantized one token at a time and never again, so a layer grown step by step holds exactly what
    quantizing its current window in one go gives."""
    params = QuantizationParams("int4", group_size=8, residual_tokens=residual_tokens)
    plain = plain_layer(5, seed=2)
    held = QuantizedSlidingLayerCache.from_layer(plain, params)
    plain = plain.fork()
    position = 5
    for step, count in enumerate([1, 1, 4, 1, 12, 1, 1, 3, 1, 1]):
        keys, values = random_rows(count, seed=10 + step)
        positions = torch.arange(position, position + count)
        for layer in (plain, held):
            layer.append(keys, values, positions)
            layer.settle()
        position += count
        assert held.slots == plain.slots == min(position, SPEC.retained_tokens)
        assert held.residual.slots == min(residual_tokens, held.slots)
        expected = QuantizedSlidingLayerCache.from_layer(plain, params).dense()
        actual = held.dense()
        assert torch.equal(actual.positions, plain.positions)
        assert torch.equal(actual.keys, expected.keys) and torch.equal(actual.values, expected.values)


def test_forks_and_clones_keep_their_own_rows():
    params = QuantizationParams("int8", group_size=8, residual_tokens=2)
    held = QuantizedSlidingLayerCache.from_layer(plain_layer(8, seed=3), params)
    before = held.dense()
    fork, clone = held.fork(), held.clone()
    for step, layer in enumerate((fork, clone, held)):
        keys, values = random_rows(3, seed=20 + step)
        layer.append(keys, values, torch.arange(8, 11))
        layer.settle()
    fork_dense, clone_dense, held_dense = fork.dense(), clone.dense(), held.dense()
    for dense in (fork_dense, clone_dense, held_dense):
        assert torch.equal(dense.positions[0], torch.arange(3, 11))  # 8 retained: the window moved by 3
        assert torch.equal(dense.keys[:, :3], before.keys[:, 3:6])  # the shared code rows are untouched
    assert not torch.equal(fork_dense.keys[:, 5:], held_dense.keys[:, 5:])
    assert not torch.equal(clone_dense.keys[:, 5:], held_dense.keys[:, 5:])


def test_refuses_full_layers_and_non_finite_values():
    with pytest.raises(ValueError, match="sliding"):
        QuantizedSlidingLayerCache.from_layer(
            LayerCache(LayerSpec("full", 1, 1, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4),
                       torch.arange(2)[None]), QuantizationParams("int8"))
    layer = plain_layer(6, seed=4)
    layer.keys[0, 0, 0] = float("nan")
    with pytest.raises(Exception, match="NaN"):
        QuantizedSlidingLayerCache.from_layer(layer, QuantizationParams("int8", residual_tokens=0))


# -- through the model ---------------------------------------------------------------------------------------------
def test_int8_decodes_close_to_the_fp_cache_and_int4_within_bounds(prefilled):
    """40 new tokens in one pass (longer than the 16-token window) on the fp cache and on the same cache with
    only its sliding layers quantized (residual 0: every window token is codes)."""
    engine, cache = prefilled
    new = random_ids(40, 1)
    reference = ModelRunner(engine.model, cache.fork()).feed(new, logits_to_keep=40)
    logits = {scheme: ModelRunner(engine.model, sliding_only(cache, QuantizationParams(scheme, residual_tokens=0)))
              .feed(new, logits_to_keep=40) for scheme in ("int8", "int4")}
    torch.testing.assert_close(logits["int8"], reference, atol=0.1, rtol=0)  # logits span about +-13
    kl8, agree8 = kl_and_agreement(reference, logits["int8"])
    kl4, agree4 = kl_and_agreement(reference, logits["int4"])
    assert kl8 < 1e-5 and agree8 == 1.0
    assert kl8 < kl4 < 5e-3 and agree4 >= 0.9


def test_decodes_exactly_like_its_own_dense_form(prefilled):
    """Attention reads the codes through the scratch buffers; ``dense`` through fresh tensors: same tokens."""
    engine, cache = prefilled
    held = quantize_in_memory(cache, QuantizationParams("int4", group_size=16, residual_tokens=4),
                              held_residual=torch.float32)  # the new tokens held as the dense form holds them
    assert [type(layer) for layer in held.layers] == [QuantizedSlidingLayerCache, QuantizedLayerCache] * 2
    new = random_ids(20, 5)
    expected = ModelRunner(engine.model, held.dense()).feed(new, logits_to_keep=20)
    actual = ModelRunner(engine.model, held.fork()).feed(new, logits_to_keep=20)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("residual_tokens", [0, 4])
def test_long_decode_keeps_the_window_bytes_bounded(prefilled, residual_tokens):
    engine, cache = prefilled
    held = quantize_in_memory(cache, QuantizationParams("int4", residual_tokens=residual_tokens))
    runner = ModelRunner(engine.model, held)
    sliding = [index for index, layer in enumerate(held.layers) if layer.spec.kind == "sliding"]
    held_bytes = [held.layers[index].held_bytes for index in sliding]
    spec = held.layers[sliding[0]].spec
    code_row = spec.kv_heads * (2 * packed_width(spec.head_dim, 4) + 2 * 2 * 2 * math.ceil(spec.head_dim / 32))
    fp_row = spec.kv_heads * spec.head_dim * 2 * 4
    most_allocated = ((spec.window_tokens + MIN_SPARE_SLOTS) * code_row
                      + (residual_tokens + 1 + MIN_SPARE_SLOTS) * fp_row)
    for token in random_ids(60, 6).tolist():  # four windows past the prefill
        runner.step(token)
        for index, before in zip(sliding, held_bytes):
            layer = held.layers[index]
            assert layer.held_bytes == before  # the window's codes and the residual, not growing
            assert layer.allocated_bytes <= most_allocated
            assert torch.equal(layer.positions[0], torch.arange(held.num_tokens - 15, held.num_tokens))
            assert layer.residual.slots == residual_tokens
    assert held.num_tokens == 360


def test_forks_do_not_see_each_other(prefilled):
    engine, cache = prefilled
    held = quantize_in_memory(cache, QuantizationParams("int4", group_size=16, residual_tokens=2))
    first, second = held.fork(), held.fork()
    ModelRunner(engine.model, first).feed(random_ids(30, 3))
    logits_a = ModelRunner(engine.model, second).feed(random_ids(5, 4))
    logits_b = ModelRunner(engine.model, held.fork()).feed(random_ids(5, 4))
    assert torch.equal(logits_a, logits_b)  # the first fork's 30 tokens never reached the others
    assert held.num_tokens == 300 and first.num_tokens == 330
    assert torch.equal(held.layers[0].positions[0], torch.arange(285, 300))


def test_dense_gives_the_fp_window_with_its_positions(prefilled):
    engine, cache = prefilled
    held = quantize_in_memory(cache, QuantizationParams("int8", residual_tokens=4))
    dense = held.dense()
    for original, layer in zip(cache.layers, dense.layers):
        assert not layer.quantized
        assert torch.equal(layer.positions, original.positions)
        scale = float(original.keys.abs().max())
        torch.testing.assert_close(layer.keys, original.keys, atol=scale / 100, rtol=0)
    runner = ModelRunner(engine.model, held)
    for token in random_ids(7, 7).tolist():
        runner.step(token)
    dense = held.dense()
    assert dense.num_tokens == 307
    for layer in dense.layers:
        expected = torch.arange(292, 307) if layer.spec.kind == "sliding" else torch.arange(307)
        assert torch.equal(layer.positions[0], expected)


@pytest.mark.parametrize("residual_tokens", [0, 4])
def test_held_bytes_count_codes_scales_and_residual(prefilled, residual_tokens):
    """Exact bytes; at int4 with the whole window in codes they are 0.3125 of the same slots at fp16."""
    _, cache = prefilled
    held = quantize_in_memory(cache, QuantizationParams("int4", residual_tokens=residual_tokens))
    for layer in held.layers:
        if layer.spec.kind != "sliding":
            continue
        heads, dim, slots = layer.spec.kv_heads, layer.spec.head_dim, layer.slots
        codes = slots - residual_tokens
        per_row = 2 * packed_width(dim, 4) + 2 * 2 * 2 * math.ceil(dim / 32)  # key+value codes, fp16 scale+zero
        assert layer.held_bytes == heads * (codes * per_row + residual_tokens * dim * 2 * 4)
        assert layer.live_bytes == layer.held_bytes
        fp16 = slots * heads * dim * 2 * 2
        if residual_tokens == 0:
            assert layer.held_bytes <= 0.35 * fp16
    assert held.held_bytes == sum(layer.held_bytes for layer in held.layers)


def test_opting_out_and_quantizing_twice(prefilled):
    _, cache = prefilled
    params = QuantizationParams("int8")
    kept = quantize_in_memory(cache, params, sliding=False)
    assert [layer.quantized for layer in kept.layers] == [False, True, False, True]
    assert kept.layers[0].held_bytes == cache.layers[0].held_bytes
    held = quantize_in_memory(cache, params)
    again = quantize_in_memory(held, params)  # already quantized layers are shared, not encoded twice
    assert again.layers[0].storages()[0] is held.layers[0].storages()[0]
    assert quantization_of(held) == params
    only_sliding = KVCache([held.layers[0], held.layers[2]], held.num_tokens)
    assert quantization_of(only_sliding) == params
