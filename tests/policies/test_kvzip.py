"""KVzip against a reference computed from transformers' eager attention, its global budget rule, and the
observation channel it uses (a probe that replays a reconstruction pass)."""

import pytest
import torch

from kvlab.cache.observations import ObservationRequest
from kvlab.engine import Engine, context_kept_tokens
from kvlab.engine.conversation import CompressionRule, Conversation
from kvlab.policies import make_policy
from kvlab.policies.base import ScoreInputs
from kvlab.policies.budgets import GlobalBudget
from kvlab.policies.kvzip import FIRST_PROMPT, Reconstruction

MODELS = ["tiny_llama", "tiny_gemma3"]


def eager_attentions(model, ids):
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            return model(ids[None], output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("feed_chunk", [64, 4096])  # the replay fed in several passes, or in one (fused kernel)
def test_scores_match_eager_attention_of_the_reconstruction(model_name, feed_chunk, request):
    """One chunk: the chunk-local softmax covers every key, so the score of context position p in layer l, head h
    is the max over reconstruction queries and over h's query heads of eager attention to p."""
    loaded = request.getfixturevalue(model_name)
    engine = Engine(loaded, chunk_tokens=feed_chunk)
    ids = torch.randint(3, 259, (90,), generator=torch.Generator().manual_seed(3))
    policy = make_policy("kvzip", chunk_tokens=512)
    result = engine.prefill(ids, policy.observation_request())
    replayed = torch.cat([ids, engine.question_ids(FIRST_PROMPT), ids])
    attentions = eager_attentions(loaded.model, replayed)
    checked = 0
    for index, layer in enumerate(result.cache.layers):
        if layer.spec.kind != "full":
            assert result.observations.layer_extra(index, policy.probe) is None
            continue
        scores = result.observations.layer_extra(index, policy.probe)
        queries = attentions[index][0, :, ids.numel():, : ids.numel()].float()  # (query_heads, replay, context)
        reference = queries.amax(dim=1).reshape(layer.spec.kv_heads, layer.spec.group_size, -1).amax(dim=1)
        torch.testing.assert_close(scores, reference, atol=2e-5, rtol=1e-4)
        inputs = ScoreInputs(index, layer.spec, layer.keys, layer.values, layer.positions,
                             result.observations.layer(index))
        torch.testing.assert_close(policy.score(inputs), reference, atol=2e-5, rtol=1e-4)
        checked += 1
    assert checked


def test_chunks_cover_the_whole_context_and_the_pass_is_timed(tiny_llama):
    engine = Engine(tiny_llama)
    ids = torch.randint(3, 259, (150,), generator=torch.Generator().manual_seed(4))
    policy = make_policy("kvzip", chunk_tokens=40)
    result = engine.prefill(ids, policy.observation_request())
    for index, layer in enumerate(result.cache.layers):
        scores = result.observations.layer_extra(index, policy.probe)
        assert scores.shape == (layer.spec.kv_heads, 150)
        assert bool((scores > 0).all())  # every chunk was reconstructed
    reconstruction_s = result.observations.seconds[policy.probe]
    assert reconstruction_s > 0
    cache, _, compress_s = engine.compress(result, policy, ratio=0.75)
    assert compress_s >= reconstruction_s
    # the sinks are kept in every head of every layer
    for layer in cache.layers:
        assert bool(((layer.positions >= 0) & (layer.positions < 4)).sum(-1).eq(4).all())


def test_equal_probes_are_recorded_once():
    first = make_policy("kvzip").observation_request()
    union = first.union(make_policy("kvzip", heads="free").observation_request()).union(
        ObservationRequest(window_tokens=8))
    assert union.probes == (Reconstruction(),)  # the split of the budget does not change what is recorded
    other = make_policy("kvzip", chunk_tokens=512).observation_request()
    assert len(union.union(other).probes) == 2


def test_global_budget_spends_the_whole_budget_on_the_best_scores():
    inf = float("inf")
    ranked = [torch.tensor([[inf, 0.9, 0.8, 0.1], [inf, 0.2, 0.1, -inf]]),
              torch.tensor([[inf, 0.7, 0.05, 0.01], [inf, 0.6, 0.5, 0.4]])]
    counts = GlobalBudget(heads="free").allocate(ranked, budget_tokens=2, protected_tokens=1)
    # 8 slots in all, 4 protected; the 4 best others are 0.9, 0.8, 0.7, 0.6
    assert [c.tolist() for c in counts] == [[3, 1], [2, 2]]
    shared = GlobalBudget(heads="shared").allocate(ranked, budget_tokens=2, protected_tokens=1)
    assert [c.tolist() for c in shared] == [[2, 2], [2, 2]]
    # padded: the held slots (each layer as wide as its widest head) fit 8. Taking 0.9 and 0.8 makes layer 0 three
    # wide (6 held) and leaves layer 1 at its protected width (2 held): 8. Taking 0.7 too would hold 10.
    padded = GlobalBudget().allocate(ranked, budget_tokens=2, protected_tokens=1)
    assert [c.tolist() for c in padded] == [[3, 3], [1, 1]]
    # a budget above what is eligible keeps everything eligible
    for heads in ("free", "padded"):
        everything = GlobalBudget(heads=heads).allocate(ranked, budget_tokens=10, protected_tokens=1)
        assert [c.tolist() for c in everything] == [[4, 3], [4, 4]]


def test_conversation_recompresses_with_the_turns_own_attention(tiny_llama):
    engine = Engine(tiny_llama)
    ids = torch.randint(3, 259, (120,), generator=torch.Generator().manual_seed(5))
    policy = make_policy("kvzip")
    result = engine.prefill(ids, policy.observation_request())
    cache, budget, _ = engine.compress(result, policy, budget_tokens=40)
    chat = Conversation(engine, cache, rule=CompressionRule(policy, budget_tokens=40, headroom=0.0))
    turn = chat.ask("what is the first word? " * 6, max_new_tokens=4)
    assert turn.recompressed
    # the document is back within the budget (the new question is kept on top of it)
    assert context_kept_tokens(chat.cache, 120) <= 40
    assert context_kept_tokens(chat.cache, 120) < context_kept_tokens(cache, 120) + 1
