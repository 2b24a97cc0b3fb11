"""Weight-only int8 quantization of the linear layers (kvlab.models.weights): kernels, conversion, fidelity."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kvlab.errors import ParameterError
from kvlab.models.weights import (
    INT8PACK_MAX_ROWS,
    WEIGHT_SCHEMES,
    Int8WeightLinear,
    quantize_int8_per_channel,
    quantize_weights,
    weight_fidelity,
)

HAS_INT8PACK = hasattr(torch.ops.aten, "_weight_int8pack_mm")


def _linear(in_features=64, out_features=48, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) * 0.1)
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=generator))
    return linear


def _ids(length=48, seed=1):
    return torch.randint(3, 259, (1, length), generator=torch.Generator().manual_seed(seed))


def test_per_channel_codes_are_symmetric_and_within_half_a_scale():
    weight = _linear(bias=False).weight.detach()
    weight[3] = 0.0  # an all-zero row must not divide by zero
    codes, scales = quantize_int8_per_channel(weight)
    assert codes.dtype == torch.int8 and codes.shape == weight.shape and scales.shape == (weight.shape[0],)
    assert int(codes.abs().max()) <= 127 and int(codes.min()) >= -127
    error = (codes.float() * scales[:, None] - weight).abs()
    assert bool((error <= scales[:, None] / 2 + 1e-7).all())
    assert bool((codes[3] == 0).all())
    assert torch.equal(scales.bfloat16().float(), scales)  # scales are exactly representable in bf16


def test_dequant_path_matches_f_linear_with_dequantized_weight():
    linear = _linear()
    module = Int8WeightLinear.from_linear(linear)
    module.kernel = "dequant"
    x = torch.randn(2, 5, 64)
    assert module.choose_kernel(x) == "dequant"
    expected = F.linear(x, module.dequantized_weight(), linear.bias)
    got = module(x)
    assert got.shape == (2, 5, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and it stays close to the original fp32 linear: the rounding is small
    torch.testing.assert_close(got, linear(x), rtol=0, atol=0.05)


@pytest.mark.skipif(not HAS_INT8PACK, reason="torch has no _weight_int8pack_mm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("leading", [(1, 1), (3,), (2, 7)])
def test_int8pack_path_matches_f_linear_with_dequantized_weight(dtype, leading):
    linear = _linear().to(dtype)
    module = Int8WeightLinear.from_linear(linear)
    assert module.scales.dtype == dtype
    module.kernel = "int8pack"
    x = torch.randn(*leading, 64, dtype=dtype)
    assert module.choose_kernel(x) == "int8pack"
    expected = F.linear(x.float(), module.dequantized_weight(torch.float32), linear.bias.float())
    got = module(x)
    assert got.shape == (*leading, 48) and got.dtype == dtype
    # the op computes with bf16 activations, so allow bf16 rounding (relative 2**-8) of inputs and outputs
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


def test_auto_kernel_routes_by_rows_alignment_and_grad():
    module = Int8WeightLinear.from_linear(_linear())
    decode, prefill = torch.randn(1, 1, 64), torch.randn(1, INT8PACK_MAX_ROWS + 1, 64)
    assert module.choose_kernel(prefill) == "dequant"
    assert module.choose_kernel(decode) == ("int8pack" if HAS_INT8PACK else "dequant")
    assert module.choose_kernel(decode.half()) == "dequant"
    unaligned = Int8WeightLinear.from_linear(_linear(in_features=40))  # the op's bf16 kernel needs in % 16 == 0
    assert unaligned.choose_kernel(torch.randn(1, 40)) == "dequant"
    assert module.choose_kernel(torch.randn(1, 64, requires_grad=True)) == "dequant"
    module.kernel = "nope"
    with pytest.raises(ParameterError, match="auto, int8pack, dequant"):
        module(decode)


def test_bias_free_module_and_repr():
    module = Int8WeightLinear.from_linear(_linear(bias=False))
    assert module.bias is None
    assert module.nbytes() == 48 * 64 + 48 * 4
    assert "in_features=64, out_features=48, bias=False" in repr(module)


@pytest.mark.parametrize("fixture, layers", [("tiny_llama", 2 * 7 + 1), ("tiny_gemma3", 4 * 7 + 1)])
def test_quantize_weights_converts_every_linear_and_keeps_the_embedding(request, fixture, layers):
    loaded = request.getfixturevalue(fixture)
    reference = loaded.model
    model = copy.deepcopy(reference)
    embedding = model.get_input_embeddings().weight.detach().clone()
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied, as in SmolLM2 and Gemma 3

    report = quantize_weights(model, "int8")

    assert report["layers"] == layers and report["untied_lm_head"] is True
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, Int8WeightLinear)
    assert 3.7 < report["bytes_before"] / report["bytes_after"] <= 4.0
    assert report["model_bytes_after"] < report["model_bytes_before"]
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert model.config.tie_word_embeddings is False
    model.tie_weights()  # transformers must not re-tie the int8 head to the embedding
    assert isinstance(model.lm_head, Int8WeightLinear)
    assert reference.lm_head.weight is reference.get_input_embeddings().weight  # the shared fixture is untouched

    ids = _ids()
    with torch.inference_mode():
        expected = reference(ids).logits
        got = model(ids).logits
        generated = model.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
    assert got.shape == expected.shape
    fidelity = weight_fidelity(reference, model, ids)
    assert fidelity["positions"] == ids.numel()
    assert 0 < fidelity["kl_mean"] < 0.05 and fidelity["top1_agreement"] >= 0.85
    assert generated.shape == (1, 12)


def test_quantized_decode_step_uses_the_fast_kernel_and_matches_prefill(tiny_llama, monkeypatch):
    model = copy.deepcopy(tiny_llama.model)
    quantize_weights(model, "int8")
    chosen = []
    choose = Int8WeightLinear.choose_kernel
    monkeypatch.setattr(Int8WeightLinear, "choose_kernel", lambda self, x: chosen.append(choose(self, x)) or chosen[-1])
    ids = _ids(16)
    with torch.inference_mode():
        full = model(ids).logits[:, -1]
        assert set(chosen) == {"dequant"}  # 16 rows: prefill path
        prefix = model(ids[:, :-1], use_cache=True)
        chosen.clear()
        step = model(ids[:, -1:], cache=prefix.cache, use_cache=True).logits[:, -1]
        assert set(chosen) == {"int8pack" if HAS_INT8PACK else "dequant"} and len(chosen) == 15
    # the step runs one row through the bf16 int8pack kernel, the full pass the fp32 dequant path
    torch.testing.assert_close(step, full, rtol=0, atol=0.1)
    assert torch.equal(step.argmax(-1), full.argmax(-1))


def test_fp_scheme_changes_nothing(tiny_llama):
    model = copy.deepcopy(tiny_llama.model)
    report = quantize_weights(model, "fp")
    assert report["layers"] == 0 and report["bytes_after"] == report["bytes_before"]
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert "fp" in WEIGHT_SCHEMES and "int8" in WEIGHT_SCHEMES


def test_unknown_scheme_raises_parameter_error(tiny_llama):
    with pytest.raises(ParameterError, match="fp, int8") as error:
        quantize_weights(tiny_llama.model, "int4")
    assert "\n" not in str(error.value)
    assert isinstance(tiny_llama.model.lm_head, torch.nn.Linear)


def test_weight_fidelity_of_a_model_against_itself(tiny_gemma3):
    fidelity = weight_fidelity(tiny_gemma3.model, tiny_gemma3.model, _ids(32)[0])
    assert fidelity == {"positions": 32, "kl_mean": 0.0, "kl_max": 0.0, "top1_agreement": 1.0}


def test_weight_fidelity_rejects_bad_token_ids(tiny_llama):
    with pytest.raises(ParameterError, match="token_ids"):
        weight_fidelity(tiny_llama.model, tiny_llama.model, torch.zeros(0, dtype=torch.long))
    with pytest.raises(ParameterError, match="token_ids"):
        weight_fidelity(tiny_llama.model, tiny_llama.model, torch.ones(1, 2, 3, dtype=torch.long))
