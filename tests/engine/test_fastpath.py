"""The decode fast path computes exactly what the full forward computes, and is used only where it applies."""

import pytest
import torch

from kvlab.engine import Engine, SamplingConfig
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


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gemma3"])
def test_rows_answer_like_separate_decodes(model_name, request):
    loaded = request.getfixturevalue(model_name)
    engine = Engine(loaded)
    ids = torch.randint(3, 250, (120,), generator=torch.Generator().manual_seed(1))
    result = engine.prefill(ids, make_policy("snapkv").observation_request())
    caches = [engine.compress(result, make_policy(name), ratio=ratio)[0]
              for name, ratio in (("full", 0.0), ("snapkv", 0.5), ("streaming_llm", 0.75))]
    together = engine.decode_rows([cache.fork() for cache in caches], [result.last_logits] * 3, max_new_tokens=12)
    for cache, generation in zip(caches, together):
        alone = engine.continue_and_decode(cache.fork(), None, result.last_logits, max_new_tokens=12,
                                           sampling=SamplingConfig())
        assert generation.token_ids == alone.token_ids
        assert generation.stopped_by == alone.stopped_by
    # the caches the rows decoded on grew by their own answers only
    grown = [cache.fork() for cache in caches]
    engine.decode_rows(grown, [result.last_logits] * 3, max_new_tokens=5)
    assert [cache.num_tokens for cache in grown] == [124] * 3 and all(c.num_tokens == 120 for c in caches)
