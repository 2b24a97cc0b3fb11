"""A cache held quantized in memory decodes exactly like the dequantized cache, holds fewer bytes, quantizes new
tokens a group at a time, and forks independently."""

import pytest
import torch

from kvlab.cache.kvcache import KVCache
from kvlab.cache.quant import QuantizationParams, dequantize_cache, quantize_cache
from kvlab.cache.quantized import QuantizedLayerCache, from_stored, quantize_in_memory
from kvlab.engine import Engine
from kvlab.engine.runner import ModelRunner
from kvlab.policies import make_policy


def random_ids(count: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 250, (count,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_gemma3"])
def caches(request):
    loaded = request.getfixturevalue(request.param)
    engine = Engine(loaded, chunk_tokens=64)
    result = engine.prefill(random_ids(300, 0), make_policy("adakv").observation_request())
    ragged, _, _ = engine.compress(result, make_policy("adakv"), ratio=0.5)
    return engine, {"plain": result.cache, "ragged": ragged}


@pytest.mark.parametrize("scheme", ["int8", "int4", "int2"])
@pytest.mark.parametrize("kind", ["plain", "ragged"])
@pytest.mark.parametrize("residual", [8, 0])  # 0 (quantize_tail): each head's partial last group quantized too
def test_decodes_like_the_dequantized_cache(caches, scheme, kind, residual):
    engine, by_kind = caches
    cache = by_kind[kind]
    tail = residual == 0
    params = QuantizationParams(scheme, group_size=16, residual_tokens=residual, quantize_tail=tail)
    file_form = dequantize_cache(quantize_cache(cache, scheme, 16, residual, tail))  # every layer through the codes
    # held in memory, sliding layers stay as they are here (their own scheme is tested on its own)
    reference = KVCache([restored if restored.spec.kind == "full" else original.fork()
                         for restored, original in zip(file_form.layers, cache.layers)], cache.num_tokens)
    # the residual in the compute dtype (fp32), so that nothing but the codes differs from the reference
    held = quantize_in_memory(cache, params, sliding=False, held_residual=torch.float32)
    assert all(isinstance(layer, QuantizedLayerCache) == (layer.spec.kind == "full") for layer in held.layers)
    assert held.held_bytes < reference.held_bytes
    new = random_ids(40, 1)
    expected = ModelRunner(engine.model, reference.fork()).feed(new, logits_to_keep=40)
    actual = ModelRunner(engine.model, held.fork()).feed(new, logits_to_keep=40)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    loaded = from_stored(quantize_cache(cache, scheme, 16, residual, tail), torch.float32)  # a .kv payload as it is
    torch.testing.assert_close(ModelRunner(engine.model, loaded).feed(new, logits_to_keep=40),
                               ModelRunner(engine.model, file_form.fork()).feed(new, logits_to_keep=40),
                               atol=1e-4, rtol=1e-4)


def test_the_residual_is_held_at_16_bits_and_decodes_as_the_fp32_one_within_bf16_rounding(caches):
    """By default an fp32 model's residual (the newest tokens, unquantized) is held in bfloat16: it holds half the
    residual bytes, new tokens go in at 16 bits too, and the logits stay within bf16 rounding of an fp32
    residual's (while int4 codes alone move them far more)."""
    engine, by_kind = caches
    cache = by_kind["plain"]
    params = QuantizationParams("int4", group_size=16, residual_tokens=8)
    wide = quantize_in_memory(cache, params, sliding=False, held_residual=torch.float32)
    held = quantize_in_memory(cache, params, sliding=False)
    pairs = [(a, b) for a, b in zip(held.layers, wide.layers) if isinstance(a, QuantizedLayerCache)]
    assert pairs and all(a.residual.keys.dtype == torch.bfloat16 and a.dtype == torch.float32 for a, _ in pairs)
    assert sum(b.held_bytes - a.held_bytes for a, b in pairs) == sum(b.residual.held_bytes // 2 for _, b in pairs)
    new = random_ids(40, 1)
    narrow = ModelRunner(engine.model, held.fork())
    logits = narrow.feed(new, logits_to_keep=40)
    assert all(layer.residual.keys.dtype == torch.bfloat16 for layer in narrow.cache.layers
               if isinstance(layer, QuantizedLayerCache))
    expected = ModelRunner(engine.model, wide.fork()).feed(new, logits_to_keep=40)
    unquantized = ModelRunner(engine.model, cache.fork()).feed(new, logits_to_keep=40)
    drift = (logits - expected).abs().mean()
    assert 0 < drift < (expected - unquantized).abs().mean() / 2


def test_new_tokens_are_quantized_a_group_at_a_time(caches):
    engine, by_kind = caches
    params = QuantizationParams("int4", group_size=16, residual_tokens=8)
    held = quantize_in_memory(by_kind["plain"], params)
    runner = ModelRunner(engine.model, held)
    full = [layer for layer in held.layers if isinstance(layer, QuantizedLayerCache)]
    before = [layer.code_slots for layer in full]
    for token in random_ids(37, 2).tolist():
        runner.feed(torch.tensor([token]))
        for layer in full:
            assert layer.code_slots % 16 == 0
            assert layer.residual.slots < params.residual_tokens + params.group_size
    after = [layer.code_slots for layer in full]
    assert all(b > a for a, b in zip(before, after))
    assert held.num_tokens == 337


def test_forks_do_not_see_each_other(caches):
    engine, by_kind = caches
    held = quantize_in_memory(by_kind["ragged"], QuantizationParams("int4", group_size=16, residual_tokens=8))
    first, second = held.fork(), held.fork()
    ModelRunner(engine.model, first).feed(random_ids(30, 3))
    logits_a = ModelRunner(engine.model, second).feed(random_ids(5, 4))
    logits_b = ModelRunner(engine.model, held.fork()).feed(random_ids(5, 4))
    assert torch.equal(logits_a, logits_b)  # the first fork's 30 tokens never reached the others
    assert held.num_tokens == 300 and first.num_tokens == 330


def test_dense_round_trip_keeps_every_token(caches):
    _, by_kind = caches
    cache = by_kind["ragged"]
    held = quantize_in_memory(cache, QuantizationParams("int8"))
    for original, layer in zip(cache.layers, held.layers):
        dense = layer.dense()
        assert sorted(dense.positions[dense.valid].tolist()) == sorted(original.positions[original.valid].tolist())
