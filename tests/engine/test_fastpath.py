"""The decode fast path computes exactly what the full forward computes, and is used only where it applies."""

import pytest
import torch

from kvlab.engine import Engine
from kvlab.engine.fastpath import FastDecoder
from kvlab.engine.runner import ModelRunner
from kvlab.policies import make_policy


def decode_logits(engine: Engine, cache, tokens: list[int], fast: bool) -> list[torch.Tensor]:
    runner = ModelRunner(engine.model, cache.fork())
    if not fast:
        runner.fast = None
    return [runner.feed(torch.tensor([token]))[-1] for token in tokens]


@pytest.mark.parametrize("model_name,policy", [("tiny_llama", "full"), ("tiny_llama", "adakv"),
                                               ("smollm2", "snapkv")])
def test_fast_steps_equal_the_full_forward(model_name, policy, request):
    loaded = request.getfixturevalue(model_name)
    engine = Engine(loaded)
    assert FastDecoder.for_model(loaded.model) is not None
    ids = torch.randint(3, 250, (160,), generator=torch.Generator().manual_seed(0))
    result = engine.prefill(ids, make_policy(policy).observation_request())
    cache, _, _ = engine.compress(result, make_policy(policy), ratio=0.0 if policy == "full" else 0.5)
    if policy == "adakv":
        assert any(layer.is_ragged for layer in cache.layers)  # the padding mask path
    tokens = [5, 17, 42, 7, 99]
    fast, slow = decode_logits(engine, cache, tokens, True), decode_logits(engine, cache, tokens, False)
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))  # the same operations on the same tensors


def test_not_used_for_other_architectures(tiny_gemma3):
    assert FastDecoder.for_model(tiny_gemma3.model) is None
