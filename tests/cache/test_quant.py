"""KIVI-style quantization: error bound per element, per-channel keys and per-token values, the residual window,
ragged and sliding layers, byte accounting at SmolLM2-like shapes, and parameter errors."""

import pytest
import torch

from kvlab.cache.kvcache import PADDING_POSITION, KVCache, LayerCache, pack_heads
from kvlab.cache.layout import LayerSpec
from kvlab.cache.quant import QuantizationParams, dequantize_cache, quantize_cache
from kvlab.engine import Engine
from kvlab.engine.runner import ModelRunner
from kvlab.errors import ParameterError
from kvlab.policies import make_policy


def random_layer(heads=3, tokens=100, dim=16, seed=0, dtype=torch.float32, kind="full") -> LayerCache:
    generator = torch.Generator().manual_seed(seed)
    spec = LayerSpec(kind, heads, heads * 2, dim, window_tokens=None if kind == "full" else tokens + 1)
    keys = torch.randn((heads, tokens, dim), generator=generator) * 3 + 1
    values = torch.randn((heads, tokens, dim), generator=generator)
    positions = torch.arange(tokens).expand(heads, tokens).clone()
    return LayerCache(spec, keys.to(dtype), values.to(dtype), positions)


def ragged_layer(counts=(40, 97, 0), total=120, dim=16, seed=0) -> LayerCache:
    generator = torch.Generator().manual_seed(seed)
    spec = LayerSpec("full", len(counts), len(counts), dim)
    keys, values, positions = [], [], []
    for count in counts:
        keys.append(torch.randn((count, dim), generator=generator))
        values.append(torch.randn((count, dim), generator=generator))
        positions.append(torch.randperm(total, generator=generator)[:count].sort().values)
    return pack_heads(spec, keys, values, positions)


def element_bounds(quantized_layer, params, slots):
    """(H, S, D) allowed |error| of keys and values at each valid slot: scale / 2 for the oldest q_h valid tokens of
    head h (q_h a multiple of the group size, leaving at least residual_tokens), 0 (exact) for the rest."""
    layer = quantized_layer
    heads, dim, group = layer.positions.shape[0], layer.spec.head_dim, params.group_size
    key_bound = torch.zeros((heads, slots, dim))
    value_bound = torch.zeros((heads, slots, dim))
    for head in range(heads):
        valid_slots = (layer.positions[head] != PADDING_POSITION).nonzero().flatten().tolist()
        quantized = max(len(valid_slots) - params.residual_tokens, 0) // group * group
        if params.quantize_tail:  # no residual: the partial last group is quantized too
            quantized = len(valid_slots)
        for rank, slot in enumerate(valid_slots[:quantized]):
            key_bound[head, slot] = layer.key_scales[head, rank // group].float() / 2
            per_channel = layer.value_scales[head, rank].float().repeat_interleave(group)[:dim]
            value_bound[head, slot] = per_channel / 2
    return key_bound, value_bound


def assert_round_trip(cache: KVCache, scheme: str, group_size=32, residual_tokens=32, extra_tolerance=0.0,
                      quantize_tail=False):
    quantized = quantize_cache(cache, scheme, group_size, residual_tokens, quantize_tail)
    restored = dequantize_cache(quantized)
    assert restored.num_tokens == cache.num_tokens
    assert len(restored.layers) == len(cache.layers)
    for original, back, q_layer in zip(cache.layers, restored.layers, quantized.layers):
        assert back.spec == original.spec
        assert torch.equal(back.positions, original.positions)
        assert back.keys.shape == original.keys.shape and back.keys.dtype == original.keys.dtype
        assert back.values.shape == original.values.shape and back.values.dtype == original.values.dtype
        key_bound, value_bound = element_bounds(q_layer, quantized.params, original.keys.shape[1])
        valid = original.valid[..., None]
        for name, bound in (("keys", key_bound), ("values", value_bound)):
            x, x_back = getattr(original, name).float(), getattr(back, name).float()
            error = (x - x_back).abs() * valid
            allowed = bound * (1 + 1e-4) + 1e-6 + extra_tolerance * x.abs()
            assert bool((error <= allowed).all()), f"{name}: worst excess {float((error - allowed).max())}"
            exact = valid & (bound == 0)
            assert torch.equal(x_back[exact.expand_as(x)], x[exact.expand_as(x)]), f"{name} residual changed"
    return quantized, restored


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dim,group", [(16, 32), (64, 32), (48, 32), (15, 4)])
def test_error_within_half_a_scale(scheme, dim, group):
    cache = KVCache([random_layer(dim=dim, tokens=150), random_layer(dim=dim, tokens=150, seed=1)], 150)
    quantized, restored = assert_round_trip(cache, scheme, group, 32)
    # the bound is not vacuous: the oldest tokens really were quantized, and coarsely enough to see at 4 bits
    error = (restored.layers[0].keys - cache.layers[0].keys).abs()
    assert float(error[:, :64].max()) > 0
    if scheme == "int4":
        assert float(error[:, :64].max()) > 0.01


def test_keys_per_channel_values_per_token():
    """An outlier channel in the keys and an outlier token in the values must not coarsen the other channels or
    tokens, which is why KIVI picks these axes."""
    layer = random_layer(heads=1, tokens=96, dim=16)
    layer.keys[..., 0] *= 1000.0
    layer.values[:, 5] *= 1000.0
    quantized, restored = assert_round_trip(KVCache([layer], 96), "int8", 32, 0)
    key_error = (restored.layers[0].keys - layer.keys).abs()
    value_error = (restored.layers[0].values - layer.values).abs()
    assert float(key_error[..., 1:].max()) < 0.05 < float(key_error[..., 0].max())
    assert float(value_error[:, [4, 6]].max()) < 0.05 < float(value_error[:, 5].max())


def test_residual_window_is_exact_and_partial_groups_stay_full_precision():
    layer = random_layer(tokens=100)
    quantized, restored = assert_round_trip(KVCache([layer], 100), "int4", 32, 32)
    # 100 - 32 = 68 tokens could be quantized; whole groups of 32 take 64, so tokens 64..99 stay exact
    assert quantized.layers[0].key_codes.shape == (3, 64, 8)
    assert torch.equal(restored.layers[0].keys[:, 64:], layer.keys[:, 64:])
    assert torch.equal(restored.layers[0].values[:, 64:], layer.values[:, 64:])
    assert not torch.equal(restored.layers[0].keys[:, 63], layer.keys[:, 63])


def test_zero_residual_quantizes_every_full_group():
    layer = random_layer(tokens=96)
    quantized, restored = assert_round_trip(KVCache([layer], 96), "int8", 32, 0)
    assert quantized.layers[0].residual_keys.shape == (3, 0, 16)
    assert not torch.equal(restored.layers[0].keys[:, -1], layer.keys[:, -1])


def test_zero_residual_quantizes_a_partial_last_group_over_its_real_rows():
    """120 tokens in groups of 32: the last group holds 24 tokens. With no residual they are quantized too (nothing
    stays fp32), their range is taken over those 24 rows only (the padding rows would drag it to 0), and the layer
    holds fewer bytes than keeping them in full precision."""
    base = random_layer(tokens=120)
    # keys well away from 0: a padding row counted in the range would show in the zero point
    layer = LayerCache(base.spec, base.keys + 10.0, base.values, base.positions)
    quantized, restored = assert_round_trip(KVCache([layer], 120), "int4", 32, 0, quantize_tail=True)
    stored = quantized.layers[0]
    assert quantized.params.quantize_tail
    assert stored.key_codes.shape == (3, 128, 8) and stored.residual_keys.shape == (3, 0, 16)
    tail_min = layer.keys[:, 96:].amin(dim=1)
    assert bool((stored.key_zeros[:, 3].float() <= tail_min).all())
    assert bool((stored.key_zeros[:, 3].float() > tail_min - 0.05).all())
    assert not torch.equal(restored.layers[0].keys[:, -1], layer.keys[:, -1])
    kept_tail = quantize_cache(KVCache([layer], 120), "int4", 32, 0, quantize_tail=False)
    assert kept_tail.layers[0].residual_keys.shape == (3, 24, 16)
    assert quantized.nbytes < kept_tail.nbytes


def test_zero_residual_on_a_ragged_layer_pads_each_heads_last_group():
    layer = ragged_layer(counts=(40, 97, 0))
    quantized, restored = assert_round_trip(KVCache([layer], 120), "int4", 8, 0, quantize_tail=True)
    assert quantized.layers[0].key_codes.shape[1] == 104 and quantized.layers[0].residual_keys.shape[1] == 0
    assert torch.equal(restored.layers[0].positions, layer.positions)


def test_ragged_layer_round_trip():
    layer = ragged_layer()
    assert layer.is_ragged
    quantized, restored = assert_round_trip(KVCache([layer], 120), "int4", 8, 16)
    assert torch.equal(restored.layers[0].positions, layer.positions)
    assert torch.equal(quantized.layers[0].positions, layer.positions)


def test_padding_in_the_middle_of_a_head():
    """After decoding on a ragged cache, new tokens land after the padding; the kept order must survive."""
    layer = ragged_layer(counts=(70, 50, 60))
    positions = torch.cat([layer.positions, torch.full((3, 1), 120)], dim=1)
    grown = LayerCache(layer.spec, torch.cat([layer.keys, torch.randn(3, 1, 16)], 1),
                       torch.cat([layer.values, torch.randn(3, 1, 16)], 1), positions)
    assert_round_trip(KVCache([grown], 121), "int8", 16, 4)


def test_sliding_layer_and_empty_layer():
    sliding = random_layer(tokens=15, kind="sliding")
    empty = LayerCache(LayerSpec("full", 3, 6, 16), torch.zeros(3, 0, 16), torch.zeros(3, 0, 16),
                       torch.zeros(3, 0, dtype=torch.long))
    assert_round_trip(KVCache([sliding, empty], 15), "int4", 4, 4)


def test_dtype_is_restored():
    cache = KVCache([random_layer(dtype=torch.bfloat16)], 100)
    quantized, restored = assert_round_trip(cache, "int8", 32, 32, extra_tolerance=2 ** -8)
    assert quantized.dtype == torch.bfloat16
    assert quantized.layers[0].residual_keys.dtype == torch.bfloat16
    assert quantized.layers[0].key_scales.dtype == torch.float16


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gemma3"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_real_caches(model_name, scheme, request):
    loaded = request.getfixturevalue(model_name)
    ids = torch.randint(3, 259, (140,), generator=torch.Generator().manual_seed(0))
    cache = Engine(loaded).prefill(ids).cache
    assert_round_trip(cache, scheme, 32, 32)


def test_adakv_cache_round_trip(tiny_llama):
    engine = Engine(tiny_llama)
    ids = torch.randint(3, 259, (200,), generator=torch.Generator().manual_seed(0))
    policy = make_policy("adakv")
    cache, _, _ = engine.compress(engine.prefill(ids, policy.observation_request()), policy, ratio=0.5)
    assert any(layer.is_ragged for layer in cache.layers)
    assert_round_trip(cache, "int4", 16, 8)


def test_logits_degrade_with_fewer_bits(tiny_llama):
    """The next-token logits after a question, on a dequantized cache: int8 stays close to the full cache (the
    random tiny model has peaked, noise-sensitive logits, so we compare logits rather than long generations) and
    int4 is clearly coarser."""
    ids = torch.randint(3, 259, (160,), generator=torch.Generator().manual_seed(0))
    suffix = torch.randint(3, 259, (8,), generator=torch.Generator().manual_seed(10))
    cache = Engine(tiny_llama).prefill(ids).cache
    reference = ModelRunner(tiny_llama.model, cache.clone()).feed(suffix)[-1]
    error = {}
    for scheme in ("int8", "int4"):
        restored = dequantize_cache(quantize_cache(cache, scheme))
        logits = ModelRunner(tiny_llama.model, restored).feed(suffix)[-1]
        error[scheme] = float((logits - reference).abs().max())
    assert 0 < error["int8"] < 0.1 * float(reference.std())
    assert error["int4"] > 4 * error["int8"]


def smollm2_like_cache(dtype, tokens=2000) -> KVCache:
    """One layer shaped like SmolLM2-135M's (3 KV heads of dim 64); every layer is the same, so ratios hold."""
    return KVCache([random_layer(heads=3, tokens=tokens, dim=64, dtype=dtype)], tokens)


@pytest.mark.parametrize("scheme,fp16_ratio,fp32_ratio", [("int8", 0.5730, 0.2985), ("int4", 0.3290, 0.1765)])
def test_bytes_at_smollm2_shapes(scheme, fp16_ratio, fp32_ratio):
    """2000 tokens, group 32, residual 32: 1952 tokens quantized (61 groups), 48 kept in the cache dtype."""
    bits = 8 if scheme == "int8" else 4
    for dtype, ratio in ((torch.float16, fp16_ratio), (torch.float32, fp32_ratio)):
        cache = smollm2_like_cache(dtype)
        quantized = quantize_cache(cache, scheme)
        codes = 2 * 3 * 1952 * 64 * bits // 8
        scales_and_zeros = 2 * (3 * 61 * 64 + 3 * 1952 * 2) * 2  # fp16: keys per channel, values per token
        residual = 2 * 3 * 48 * 64 * cache.layers[0].keys.element_size()
        assert quantized.payload_bytes == codes
        assert quantized.overhead_bytes == scales_and_zeros
        assert quantized.residual_bytes == residual
        assert quantized.nbytes == codes + scales_and_zeros + residual
        layer = quantized.layers[0]
        assert quantized.nbytes == sum(t.nbytes for t in (
            layer.key_codes, layer.value_codes, layer.key_scales, layer.key_zeros, layer.value_scales,
            layer.value_zeros, layer.residual_keys, layer.residual_values))  # positions are not KV bytes
        assert quantized.nbytes / cache.live_bytes == pytest.approx(ratio, abs=1e-4)
    # int4 is a quarter of fp16 in its codes; scales, zeros and the residual add the rest
    if scheme == "int4":
        assert quantized.payload_bytes / (2 * 3 * 1952 * 64 * 2) == 0.25


@pytest.mark.parametrize("kwargs,match", [
    ({"scheme": "int3"}, "int8, int4, int2"),
    ({"scheme": "fp8"}, "int8, int4, int2"),
    ({"scheme": "int8", "group_size": 0}, "positive integer"),
    ({"scheme": "int8", "group_size": -4}, "positive integer"),
    ({"scheme": "int8", "group_size": 1.5}, "positive integer"),
    ({"scheme": "int8", "group_size": True}, "positive integer"),
    ({"scheme": "int8", "residual_tokens": -1}, ">= 0"),
    ({"scheme": "int4", "residual_tokens": 0, "quantize_tail": "yes"}, "true or false"),
    ({"scheme": "int4", "quantize_tail": True}, "needs residual_tokens=0"),
])
def test_bad_parameters(kwargs, match):
    cache = KVCache([random_layer()], 100)
    with pytest.raises(ParameterError, match=match):
        quantize_cache(cache, **kwargs)
    with pytest.raises(ParameterError, match=match):
        QuantizationParams(**kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e6])
def test_values_that_cannot_be_quantized(bad):
    layer = random_layer()
    layer.keys[0, 3, 2] = bad
    with pytest.raises(ParameterError):
        quantize_cache(KVCache([layer], 100), "int8")
