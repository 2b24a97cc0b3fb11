"""The engine against references it must reproduce exactly: transformers' own generate for the uncompressed cache,
a hand-built transformers forward for an evicted cache, and unpadded runs for padded (ragged) caches."""

import random

import pytest
import torch
from transformers.cache_utils import DynamicCache

from kvlab.bench.haystack import paragraphs
from kvlab.cache.hf import cache_argument
from kvlab.cache.kvcache import PADDING_POSITION, KVCache, LayerCache
from kvlab.cache.observations import Observations
from kvlab.engine import Engine, SamplingConfig
from kvlab.engine.compress import compress
from kvlab.engine.runner import ModelRunner
from kvlab.policies import make_policy

_alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?-"


def random_text(length: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(_alphabet) for _ in range(length))


QUESTION = "What is written above?"


def prose(sentences: int, seed: int) -> str:
    """``sentences`` sentences of the project's generated prose."""
    chosen = []
    for paragraph in paragraphs(seed):
        chosen.extend(paragraph)
        if len(chosen) >= sentences:
            return " ".join(chosen[:sentences])


def prompt_ids(engine: Engine, context: str, question: str) -> torch.Tensor:
    parts = engine.prompt(context, question)
    return torch.cat([parts.prefix_ids, parts.suffix_ids])


def assert_matches_generate(loaded, context: str, question: str, *, max_new_tokens: int, chunk_tokens: int):
    engine = Engine(loaded, chunk_tokens=chunk_tokens)
    ids = prompt_ids(engine, context, question)
    answer = engine.ask(context, question, make_policy("full"), max_new_tokens=max_new_tokens)
    with torch.inference_mode():
        output = loaded.model.generate(ids[None], attention_mask=torch.ones_like(ids[None]),
                                       max_new_tokens=max_new_tokens, do_sample=False)
    reference = output[0, ids.numel():].tolist()
    ours = answer.token_ids
    assert ours, "generated nothing: the comparison would be vacuous"
    assert ours == reference[:len(ours)]
    if answer.extra["stopped_by"] == "stop_token":
        assert len(reference) > len(ours) and reference[len(ours)] in engine.stop_ids
    else:
        assert len(ours) == max_new_tokens
    return engine, ids, answer


def test_full_matches_generate_tiny_llama(tiny_llama):
    engine, ids, answer = assert_matches_generate(tiny_llama, random_text(200, 1), QUESTION, max_new_tokens=12,
                                                  chunk_tokens=64)
    assert answer.context_tokens + answer.question_tokens == ids.numel()


def test_full_matches_generate_tiny_gemma3(tiny_gemma3):
    # 300 tokens in chunks of 64: every chunk boundary crosses the 16-token sliding window
    assert_matches_generate(tiny_gemma3, random_text(300, 2), QUESTION, max_new_tokens=12, chunk_tokens=64)


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gemma3"])
def test_prefill_and_question_logits_match_a_plain_forward(model_name, request):
    """Stronger than greedy tokens on a random model: every question position's logits equal transformers'."""
    loaded = request.getfixturevalue(model_name)
    engine = Engine(loaded, chunk_tokens=64)
    parts = engine.prompt(random_text(300, 3), QUESTION)
    ids = torch.cat([parts.prefix_ids, parts.suffix_ids])
    question = parts.suffix_ids.numel()
    with torch.inference_mode():
        reference = loaded.model(ids[None]).logits[0].float()
    result = engine.prefill(parts.prefix_ids)
    torch.testing.assert_close(result.last_logits, reference[parts.prefix_ids.numel() - 1], atol=1e-4, rtol=0)
    logits = ModelRunner(loaded.model, result.cache).feed(parts.suffix_ids, logits_to_keep=question)
    torch.testing.assert_close(logits, reference[-question:], atol=1e-4, rtol=0)


@pytest.mark.real
def test_full_matches_generate_smollm2(smollm2):
    engine, ids, answer = assert_matches_generate(smollm2, prose(22, seed=3), "Which town is mentioned first?",
                                                  max_new_tokens=16, chunk_tokens=128)
    assert 250 <= answer.context_tokens <= 450


# -- positions after eviction ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evicted(tiny_llama):
    """tiny-llama context compressed by streaming_llm at ratio 0.5, before the question is fed."""
    engine = Engine(tiny_llama)
    parts = engine.prompt(random_text(200, 4), QUESTION)
    result = engine.prefill(parts.prefix_ids)
    cache, budget, _ = engine.compress(result, make_policy("streaming_llm"), ratio=0.5)
    assert all(layer.positions.shape[-1] == budget < parts.prefix_ids.numel() for layer in cache.layers)
    return engine, parts, cache, budget


def reference_question_logits(model, cache: KVCache, suffix_ids: torch.Tensor, first_position: int) -> torch.Tensor:
    """transformers' own forward over the kept keys/values, with the question at its original positions."""
    hf_cache = DynamicCache()
    for index, layer in enumerate(cache.layers):
        assert not layer.is_ragged
        hf_cache.update(layer.keys[None].clone(), layer.values[None].clone(), index)
    kept, question = cache.layers[0].keys.shape[1], suffix_ids.numel()
    mask = torch.zeros(1, 1, question, kept + question)
    mask[0, 0, :, kept:] = torch.full((question, question), float("-inf")).triu(1)
    position_ids = torch.arange(first_position, first_position + question)[None]
    with torch.inference_mode():
        output = model(input_ids=suffix_ids[None], attention_mask=mask, position_ids=position_ids, use_cache=True,
                       **{cache_argument(model): hf_cache})
    return output.logits[0].float()


def test_question_after_eviction_keeps_original_positions(evicted, tiny_llama):
    engine, parts, cache, budget = evicted
    context, question = parts.prefix_ids.numel(), parts.suffix_ids.numel()
    reference = reference_question_logits(tiny_llama.model, cache, parts.suffix_ids, context)

    ours_cache = cache.clone()
    logits = ModelRunner(tiny_llama.model, ours_cache).feed(parts.suffix_ids, logits_to_keep=question)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)
    expected = torch.arange(context, context + question)
    for layer in ours_cache.layers:
        assert torch.equal(layer.positions[:, budget:], expected.expand(layer.positions.shape[0], -1))
    assert ours_cache.num_tokens == context + question

    # the engine's own path: question fed through continue_and_decode, then greedy decoding
    decode_cache = cache.clone()
    generation = engine.continue_and_decode(decode_cache, parts.suffix_ids, None, max_new_tokens=3,
                                            sampling=SamplingConfig())
    assert generation.token_ids[0] == int(reference[-1].argmax())
    for layer in decode_cache.layers:
        assert torch.equal(layer.positions[:, budget:budget + question], expected.expand(layer.positions.shape[0], -1))
        fed_after = layer.positions[0, budget + question:].tolist()
        assert fed_after == list(range(context + question, context + question + len(fed_after)))


def test_shifted_positions_would_change_the_logits(evicted, tiny_llama):
    """Control for the test above: numbering the question right after the kept slots gives different logits."""
    engine, parts, cache, budget = evicted
    question = parts.suffix_ids.numel()
    correct = ModelRunner(tiny_llama.model, cache.clone()).feed(parts.suffix_ids, logits_to_keep=question)
    shifted_cache = cache.clone()
    shifted_cache.num_tokens = budget
    shifted = ModelRunner(tiny_llama.model, shifted_cache).feed(parts.suffix_ids, logits_to_keep=question)
    assert float((correct - shifted).abs().max()) > 1e-2


def test_keep_all_reproduces_full_logits(tiny_llama):
    engine = Engine(tiny_llama)
    parts = engine.prompt(random_text(150, 5), QUESTION)
    question = parts.suffix_ids.numel()
    policy = make_policy("snapkv")
    result = engine.prefill(parts.prefix_ids, policy.observation_request())
    full = ModelRunner(tiny_llama.model, result.cache.clone()).feed(parts.suffix_ids, logits_to_keep=question)
    cache, _, _ = engine.compress(result, policy, ratio=0.0)
    kept = ModelRunner(tiny_llama.model, cache).feed(parts.suffix_ids, logits_to_keep=question)
    assert torch.equal(kept, full)


# -- ragged heads ---------------------------------------------------------------------------------------------------

def garbage_like(tensor: torch.Tensor, seed: int) -> torch.Tensor:
    return 100 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(seed))


def test_adakv_padding_is_masked(tiny_llama):
    engine = Engine(tiny_llama)
    parts = engine.prompt(random_text(200, 6), QUESTION)
    question = parts.suffix_ids.numel()
    policy = make_policy("adakv")
    result = engine.prefill(parts.prefix_ids, policy.observation_request())
    cache, _, _ = engine.compress(result, policy, ratio=0.5)
    assert any(len(set(layer.kept_per_head.tolist())) > 1 for layer in cache.layers)
    assert all(layer.is_ragged for layer in cache.layers)

    clean = ModelRunner(tiny_llama.model, cache.clone()).feed(parts.suffix_ids, logits_to_keep=question)
    dirty_cache = cache.clone()
    for seed, layer in enumerate(dirty_cache.layers):
        padding = ~layer.valid
        layer.keys[padding] = garbage_like(layer.keys, seed)[padding]
        layer.values[padding] = garbage_like(layer.values, seed + 10)[padding]
    dirty = ModelRunner(tiny_llama.model, dirty_cache.clone()).feed(parts.suffix_ids, logits_to_keep=question)
    torch.testing.assert_close(dirty, clean, atol=1e-5, rtol=0)

    # control: the same garbage, if it were visible, changes the result
    exposed_cache = dirty_cache.clone()
    for layer in exposed_cache.layers:
        layer.positions[~layer.valid] = 0
    exposed = ModelRunner(tiny_llama.model, exposed_cache).feed(parts.suffix_ids, logits_to_keep=question)
    assert float((exposed - clean).abs().max()) > 1e-2


def padded_layer(layer: LayerCache, extra: int, seed: int, arrangement: str) -> LayerCache:
    """Every head holds all of ``layer``'s tokens plus ``extra`` garbage padding slots.

    ``uniform``: padding appended to every head (heads share their positions). ``mixed``: head 0 pads at the end,
    head 1 at the front, head 2 holds its tokens in reverse order, so heads' slot positions differ and the
    per-head mask path runs (slot order does not matter to attention: masks come from positions).
    """
    heads, slots, dim = layer.keys.shape
    width = slots + extra
    keys = garbage_like(torch.empty(heads, width, dim), seed)
    values = garbage_like(torch.empty(heads, width, dim), seed + 1)
    positions = torch.full((heads, width), PADDING_POSITION, dtype=torch.long)
    for head in range(heads):
        order = torch.arange(slots)
        start = 0
        if arrangement == "mixed" and head % 3 == 1:
            start = extra
        if arrangement == "mixed" and head % 3 == 2:
            order = order.flip(0)
        keys[head, start:start + slots] = layer.keys[head, order]
        values[head, start:start + slots] = layer.values[head, order]
        positions[head, start:start + slots] = layer.positions[head, order]
    return LayerCache(layer.spec, keys, values, positions)


@pytest.mark.parametrize("arrangement", ["uniform", "mixed"])
def test_padding_slots_do_not_change_logits(tiny_llama, arrangement):
    engine = Engine(tiny_llama)
    parts = engine.prompt(random_text(120, 7), QUESTION)
    question = parts.suffix_ids.numel()
    result = engine.prefill(parts.prefix_ids)
    reference = ModelRunner(tiny_llama.model, result.cache.clone()).feed(parts.suffix_ids, logits_to_keep=question)
    padded = KVCache([padded_layer(layer, 5, seed, arrangement) for seed, layer in enumerate(result.cache.layers)],
                     num_tokens=result.cache.num_tokens)
    assert all(layer.is_ragged for layer in padded.layers)
    logits = ModelRunner(tiny_llama.model, padded).feed(parts.suffix_ids, logits_to_keep=question)
    # the padded run takes the explicit-mask path, the reference the past-plus-causal merge: float noise only
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    # decoding continues on the padded cache: one more token, same logits as without padding
    next_token = torch.tensor([int(reference[-1].argmax())])
    unpadded_cache = result.cache.clone()
    runner = ModelRunner(tiny_llama.model, unpadded_cache)
    runner.feed(parts.suffix_ids)
    torch.testing.assert_close(ModelRunner(tiny_llama.model, padded).feed(next_token), runner.feed(next_token),
                               atol=1e-5, rtol=1e-5)


# -- hybrid models ---------------------------------------------------------------------------------------------------

def test_gemma3_sliding_layers_keep_their_newest_tokens(tiny_gemma3):
    """At ratio 0.5 a sliding layer (window 16: 15 slots) keeps its newest ceil(15 * 75 / 150) = 8 slots, which
    then slide on as the window does: appended tokens push the oldest out once the layer holds 15."""
    engine = Engine(tiny_gemma3, chunk_tokens=64)
    ids = torch.randint(3, 259, (150,), generator=torch.Generator().manual_seed(8))
    policy = make_policy("snapkv")
    result = engine.prefill(ids, policy.observation_request())
    before = result.cache.clone()
    cache, budget, _ = engine.compress(result, policy, ratio=0.5)
    for kept, original in zip(cache.layers, before.layers):
        if kept.spec.kind == "sliding":
            assert original.positions.shape[-1] == 15
            assert torch.equal(kept.keys, original.keys[:, -8:])
            assert torch.equal(kept.values, original.values[:, -8:])
            assert kept.positions.tolist() == [list(range(142, 150))]
        else:
            assert kept.positions.shape[-1] == budget < original.positions.shape[-1] == 150
    for layer, original in zip(result.cache.layers, before.layers):  # the prefill's own cache is untouched
        assert torch.equal(layer.positions, original.positions)
    runner = ModelRunner(tiny_gemma3.model, cache)
    for step, token in enumerate(range(40, 52)):  # 12 tokens: the trimmed layers fill up to 15, then slide
        runner.feed(torch.tensor([token]))
        for layer in cache.layers:
            if layer.spec.kind == "sliding":
                newest = 150 + step
                held = min(8 + step + 1, 15)
                assert layer.positions.tolist() == [list(range(newest - held + 1, newest + 1))]


def test_gemma3_compressing_again_at_the_same_budget_changes_no_sliding_layer(tiny_gemma3):
    """The sliding share depends on the budget, not on what the layer holds: a second pass keeps every slot."""
    engine = Engine(tiny_gemma3, chunk_tokens=64)
    ids = torch.randint(3, 259, (150,), generator=torch.Generator().manual_seed(8))
    policy = make_policy("knorm")
    result = engine.prefill(ids)
    once, budget, _ = engine.compress(result, policy, ratio=0.75)
    twice, _ = compress(once, policy, Observations(), budget_tokens=budget)
    for first, second in zip(once.layers, twice.layers):
        assert torch.equal(first.positions, second.positions)
    kept = [layer.slots for layer in once.layers if layer.spec.kind == "sliding"]
    assert kept and set(kept) == {4}  # ceil(15 * 38 / 150)


def test_decoding_a_compressed_copy_leaves_the_prefill_untouched(tiny_gemma3):
    """One prefill, two compressions (as a sweep over policies does): the second must not see the first's tokens."""
    engine = Engine(tiny_gemma3, chunk_tokens=64)
    parts = engine.prompt(random_text(150, 9), QUESTION)
    policy = make_policy("streaming_llm")
    result = engine.prefill(parts.prefix_ids)
    before = result.cache.clone()

    def answer():
        cache, _, _ = engine.compress(result, policy, ratio=0.5)
        return engine.continue_and_decode(cache, parts.suffix_ids, None, max_new_tokens=5, sampling=SamplingConfig())

    first = answer()
    for now, original in zip(result.cache.layers, before.layers):
        assert torch.equal(now.positions, original.positions)
        assert torch.equal(now.keys, original.keys)
    assert result.cache.num_tokens == before.num_tokens
    assert answer().token_ids == first.token_ids
