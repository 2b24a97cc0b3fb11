"""``--dtype``: auto is float32 on CPU and the checkpoint's own dtype on a GPU; explicit choices load in that dtype;
misuse is one ParameterError naming the fix, raised before anything loads."""

from __future__ import annotations

import argparse

import pytest
import torch

from kvlab.cli.common import DTYPE_CHOICES as CLI_DTYPE_CHOICES
from kvlab.cli.common import add_model_arguments
from kvlab.errors import ParameterError
from kvlab.models import load_model
from kvlab.models.dtypes import DTYPE_CHOICES, parse_dtype, resolve_dtype
from kvlab.models.embedded import EMBEDDED_MODELS
from kvlab.server.settings import Settings

CPU, GPU = torch.device("cpu"), torch.device("meta")  # "meta" stands for any non-CPU device in the rule


def test_cli_choices_are_the_loader_choices():
    assert CLI_DTYPE_CHOICES == DTYPE_CHOICES
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    assert parser.parse_args([]).dtype == "auto"
    assert parser.parse_args(["--dtype", "bfloat16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "fp8"])


@pytest.mark.parametrize(("checkpoint", "expected"), [
    (torch.bfloat16, torch.bfloat16), ("float16", torch.float16), (torch.float32, torch.float32),
    (None, torch.float32), (torch.float64, torch.float32),  # not a loadable weight dtype: transformers' default
])
def test_auto_is_the_checkpoint_dtype_off_cpu(checkpoint, expected):
    assert resolve_dtype("auto", GPU, checkpoint) == expected
    assert resolve_dtype(None, GPU, checkpoint) == expected


@pytest.mark.parametrize("checkpoint", [torch.bfloat16, torch.float16, None])
def test_auto_is_float32_on_cpu(checkpoint):
    assert resolve_dtype("auto", CPU, checkpoint) == torch.float32


def test_explicit_choice_wins_over_the_checkpoint():
    assert resolve_dtype("bfloat16", CPU, torch.float32) == torch.bfloat16
    assert resolve_dtype("float16", GPU, torch.bfloat16) == torch.float16
    assert resolve_dtype(torch.float32, GPU, torch.bfloat16) == torch.float32


def test_misuse_is_one_line_naming_the_fix():
    with pytest.raises(ParameterError, match="use --dtype float32"):
        resolve_dtype("float16", CPU, None)
    with pytest.raises(ParameterError, match="use one of auto, float32, bfloat16, float16"):
        parse_dtype("half")
    with pytest.raises(ParameterError, match="cannot hold model weights"):
        parse_dtype(torch.int8)
    with pytest.raises(ParameterError, match="dtype must be one of"):
        Settings(dtype="fp16")


def test_load_model_in_each_cpu_dtype(tiny_llama):
    ids = torch.tensor([[5, 9, 14, 3, 77]])
    with torch.inference_mode():
        reference = tiny_llama.model(ids).logits
    bf16 = load_model("tiny-llama", device="cpu", dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and load_model("tiny-llama", device="cpu").dtype == torch.float32
    assert bf16.fingerprint != tiny_llama.fingerprint  # caches built in one dtype are not read in the other
    with torch.inference_mode():
        got = bf16.model(ids).logits.float()
    assert not torch.equal(got, reference)  # really bf16 arithmetic...
    assert torch.allclose(got, reference, atol=0.25, rtol=0.05)  # ...of the same model


def test_float16_on_cpu_fails_before_loading(monkeypatch):
    import kvlab.models.tiny

    def not_expected(*args, **kwargs):
        raise AssertionError("the model was built before the dtype was checked")

    monkeypatch.setattr(kvlab.models.tiny, "tiny_llama", not_expected)
    with pytest.raises(ParameterError, match="float16 is not supported on CPU"):
        load_model("tiny-llama", device="cpu", dtype="float16")


def test_embedded_models_declare_their_release_dtype():
    """Their converted files are fp32 (dequantized GGUF), so auto on a GPU needs the dtype they were released in."""
    assert {model.release_dtype for model in EMBEDDED_MODELS.values()} <= set(DTYPE_CHOICES) - {"auto"}
    assert all(resolve_dtype("auto", GPU, model.release_dtype) == torch.bfloat16 for model in EMBEDDED_MODELS.values())
