"""The contract every registered policy must honour, on a full-attention model and a hybrid (sliding + global) one.

Parametrized over ``list_policies()``, so a newly registered policy is tested without editing this file.
"""

import random

import pytest
import torch

from kvlab.cache.kvcache import PADDING_POSITION
from kvlab.cache.observations import ObservationRequest
from kvlab.cache.selection import eligible_scores, protection_mask
from kvlab.engine import Engine
from kvlab.engine.compress import budget_from_ratio, sliding_budget
from kvlab.policies import list_policies, make_policy
from kvlab.policies.base import ScoreInputs
from kvlab.policies.budgets import GlobalBudget, HeadwiseBudget, KeepAllBudget, PyramidBudget, UniformBudget

MODELS = ["tiny_llama", "tiny_gemma3"]
POLICIES = list_policies()
_alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?-"
CONTEXT = "".join(random.Random(0).choice(_alphabet) for _ in range(200))
QUESTION = "Which character appears most often?"
MAX_NEW = 6


def test_registry_has_the_builtin_policies():
    assert {"full", "snapkv", "streaming_llm", "knorm", "h2o", "tova", "pyramidkv", "adakv", "random"} <= set(POLICIES)


@pytest.fixture(scope="module")
def engines(tiny_llama, tiny_gemma3):
    return {"tiny_llama": Engine(tiny_llama), "tiny_gemma3": Engine(tiny_gemma3)}


@pytest.fixture(scope="module")
def prefills(engines):
    """Lazily built, memoized: (model, policy) -> (engine, context ids, PrefillResult of the context)."""
    memo = {}

    def get(model_name: str, policy_name: str):
        key = (model_name, policy_name)
        if key not in memo:
            engine = engines[model_name]
            ids = engine.prompt(CONTEXT, QUESTION).prefix_ids
            result = engine.prefill(ids, make_policy(policy_name).observation_request())
            memo[key] = (engine, ids, result)
        return memo[key]

    return get


@pytest.fixture(scope="module")
def full_answers(engines):
    memo = {}

    def get(model_name: str, query_aware: bool):
        key = (model_name, query_aware)
        if key not in memo:
            memo[key] = engines[model_name].ask(CONTEXT, QUESTION, make_policy("full"), query_aware=query_aware,
                                                max_new_tokens=MAX_NEW)
        return memo[key]

    return get


def full_layer_indices(cache):
    return [index for index, layer in enumerate(cache.layers) if layer.spec.kind == "full"]


def ranked_scores(policy, result, budget, compressible):
    """Recompute what ``compress`` ranks: the policy's scores with protected slots at +inf."""
    sinks = policy.protected_sink_tokens()
    recent = min(policy.protected_recent_tokens(budget), max(budget - sinks, 0))
    ranked = {}
    for index in full_layer_indices(result.cache):
        layer = result.cache.layers[index]
        scores = policy.score(ScoreInputs(index, layer.spec, layer.keys, layer.values, layer.positions,
                                          result.observations.layer(index)))
        protected = protection_mask(layer.positions, sinks, compressible - recent, compressible)
        ranked[index] = eligible_scores(scores, layer.positions, protected, compressible)
    return ranked


@pytest.mark.parametrize("policy_name", POLICIES)
@pytest.mark.parametrize("model_name", MODELS)
def test_score_shape(model_name, policy_name, prefills):
    engine, ids, result = prefills(model_name, policy_name)
    policy = make_policy(policy_name)
    full_layers = full_layer_indices(result.cache)
    assert full_layers
    for index in full_layers:
        layer = result.cache.layers[index]
        scores = policy.score(ScoreInputs(index, layer.spec, layer.keys, layer.values, layer.positions,
                                          result.observations.layer(index)))
        assert scores.shape == (layer.spec.kv_heads, ids.numel())
        assert scores.is_floating_point()
        assert torch.isfinite(scores).all()


@pytest.mark.parametrize("query_aware", [False, True], ids=["agnostic", "aware"])
@pytest.mark.parametrize("policy_name", POLICIES)
@pytest.mark.parametrize("model_name", MODELS)
def test_ratio_zero_equals_full(model_name, policy_name, query_aware, engines, full_answers):
    reference = full_answers(model_name, query_aware)
    answer = engines[model_name].ask(CONTEXT, QUESTION, make_policy(policy_name), ratio=0.0,
                                     query_aware=query_aware, max_new_tokens=MAX_NEW)
    assert answer.token_ids == reference.token_ids
    assert answer.kept_tokens == answer.context_tokens == reference.context_tokens
    assert answer.kv_bytes_full == reference.kv_bytes_full
    if policy_name == "quest":  # every token, plus each paged layer's key minimum and maximum per page (fp32)
        assert answer.kv_bytes_full <= answer.kv_bytes_kept <= answer.kv_bytes_full * (1 + 1 / 32)
    else:
        assert answer.kv_bytes_kept == answer.kv_bytes_full


@pytest.mark.parametrize("policy_name", POLICIES)
@pytest.mark.parametrize("model_name", MODELS)
def test_ratio_zero_cache_is_the_prefill_cache(model_name, policy_name, prefills):
    engine, ids, result = prefills(model_name, policy_name)
    cache, budget, _ = engine.compress(result, make_policy(policy_name), ratio=0.0)
    assert budget == ids.numel()
    for kept, original in zip(cache.layers, result.cache.layers):
        assert torch.equal(kept.positions, original.positions)
        assert torch.equal(kept.keys, original.keys)
        assert torch.equal(kept.values, original.values)


@pytest.mark.parametrize("policy_name", POLICIES)
@pytest.mark.parametrize("model_name", MODELS)
def test_budget_at_half_ratio(model_name, policy_name, prefills):
    engine, ids, result = prefills(model_name, policy_name)
    policy = make_policy(policy_name)
    cache, budget, _ = engine.compress(result, policy, ratio=0.5)
    context = ids.numel()
    assert budget == budget_from_ratio(0.5, context) == (context + 1) // 2
    full_layers = full_layer_indices(cache)
    # kept per head per full layer, counting context positions only
    counts = torch.stack([((cache.layers[i].positions >= 0) & (cache.layers[i].positions < context)).sum(-1)
                          for i in full_layers])  # (full layers, kv_heads)
    assert torch.equal(counts, torch.stack([cache.layers[i].kept_per_head for i in full_layers]))
    rule = policy.budget_rule()
    kv_heads = cache.layers[full_layers[0]].spec.kv_heads
    if isinstance(rule, KeepAllBudget):
        assert (counts == context).all()
    elif isinstance(rule, UniformBudget):
        assert (counts == budget).all()
    elif isinstance(rule, PyramidBudget):
        assert (counts == counts[:, :1]).all()  # every head of a layer keeps the same count
        per_layer = counts[:, 0].float()
        assert abs(float(per_layer.mean()) - budget) <= 1
        assert len(set(per_layer.tolist())) > 1
        assert all(a >= b for a, b in zip(per_layer.tolist(), per_layer.tolist()[1:]))  # falls with depth
    elif isinstance(rule, HeadwiseBudget):
        assert (counts.sum(-1) == budget * kv_heads).all()
    elif isinstance(rule, GlobalBudget):
        total = budget * kv_heads * len(full_layers)
        if rule.heads == "free":
            assert int(counts.sum()) == total
        elif rule.heads == "padded":  # held slots (every head padded to its layer's longest) fit the budget
            assert (counts == counts[:, :1]).all()
            assert total - kv_heads * max(len(full_layers), 8) <= int(counts.sum()) <= total
        else:
            assert (counts == counts[:, :1]).all()  # every head of a layer keeps the same count
            assert total - kv_heads * len(full_layers) <= int(counts.sum()) <= total
    else:
        pytest.fail(f"no budget check for rule {type(rule).__name__}; add one here")
    # sliding layers keep their newest tokens, at the full layers' share of their window (all of them under a
    # policy that evicts nothing)
    for kept, original in zip(cache.layers, result.cache.layers):
        if kept.spec.kind == "sliding" and policy.keeps_all_tokens:
            assert torch.equal(kept.positions, original.positions)
        elif kept.spec.kind == "sliding":
            keep = sliding_budget(kept.spec, budget, context)
            assert keep == -(-min(kept.spec.retained_tokens, context) * budget // context) < original.slots
            assert torch.equal(kept.positions, original.positions[:, -keep:])
            assert torch.equal(kept.keys, original.keys[:, -keep:])
            assert torch.equal(kept.values, original.values[:, -keep:])


@pytest.mark.parametrize("policy_name", POLICIES)
@pytest.mark.parametrize("model_name", MODELS)
def test_kept_slots_are_the_best_ranked(model_name, policy_name, prefills):
    """Within each head, every kept slot ranks at least as high as every evicted one (protection included)."""
    engine, ids, result = prefills(model_name, policy_name)
    policy = make_policy(policy_name)
    cache, budget, _ = engine.compress(result, policy, ratio=0.5)
    ranked = ranked_scores(policy, result, budget, ids.numel())
    for index, layer_ranked in ranked.items():
        kept_positions = cache.layers[index].positions
        for head in range(layer_ranked.shape[0]):
            kept = torch.zeros(ids.numel(), dtype=torch.bool)
            kept[kept_positions[head][kept_positions[head] != PADDING_POSITION]] = True
            if kept.all():
                continue
            assert float(layer_ranked[head][kept].min()) >= float(layer_ranked[head][~kept].max())


@pytest.mark.parametrize("model_name", MODELS)
def test_knorm_keeps_smallest_key_norms(model_name, prefills):
    engine, ids, result = prefills(model_name, "knorm")
    cache, budget, _ = engine.compress(result, make_policy("knorm"), ratio=0.5)
    for index in full_layer_indices(cache):
        norms = result.cache.layers[index].keys.norm(dim=-1)  # (kv_heads, slots)
        for head in range(norms.shape[0]):
            expected = set(norms[head].topk(budget, largest=False).indices.tolist())
            positions = cache.layers[index].positions[head]
            assert set(positions[positions >= 0].tolist()) == expected


@pytest.mark.parametrize("model_name", MODELS)
def test_streaming_llm_keeps_sinks_and_the_end(model_name, prefills):
    engine, ids, result = prefills(model_name, "streaming_llm")
    cache, budget, _ = engine.compress(result, make_policy("streaming_llm", sink_tokens=4), ratio=0.5)
    context = ids.numel()
    expected = list(range(4)) + list(range(context - (budget - 4), context))
    for index in full_layer_indices(cache):
        for head_positions in cache.layers[index].positions.tolist():
            assert head_positions == expected


@pytest.mark.parametrize("model_name", MODELS)
def test_snapkv_keeps_the_observation_window(model_name, prefills):
    engine, ids, result = prefills(model_name, "snapkv")
    window = make_policy("snapkv").window_tokens
    context = ids.numel()
    cache, budget, _ = engine.compress(result, make_policy("snapkv"), ratio=0.8)
    assert budget > window
    for index in full_layer_indices(cache):
        for head_positions in cache.layers[index].positions.tolist():
            assert set(range(context - window, context)) <= set(head_positions)
            assert len(head_positions) == budget


@pytest.mark.parametrize("model_name", MODELS)
def test_snapkv_query_aware_keeps_window_and_question(model_name, engines):
    """Query-aware: the compressed region is the context; its last window is protected, the question kept on top."""
    engine = engines[model_name]
    parts = engine.prompt(CONTEXT, QUESTION)
    context, question = parts.prefix_ids.numel(), parts.suffix_ids.numel()
    policy = make_policy("snapkv", window_tokens=8)
    result = engine.prefill(torch.cat([parts.prefix_ids, parts.suffix_ids]), policy.observation_request())
    cache, budget, _ = engine.compress(result, policy, ratio=0.5, compressible_tokens=context)
    for index in full_layer_indices(cache):
        for head_positions in cache.layers[index].positions.tolist():
            kept = set(head_positions)
            assert set(range(context - 8, context + question)) <= kept
            assert len(head_positions) == budget + question


@pytest.mark.parametrize("model_name", MODELS)
def test_chunked_prefill_equals_one_shot(model_name, engines):
    loaded = engines[model_name].loaded
    ids = torch.randint(3, 259, (150,), generator=torch.Generator().manual_seed(5))
    request = ObservationRequest(window_tokens=40, attention_sums=True)  # window spans a chunk boundary
    chunked = Engine(loaded, chunk_tokens=37).prefill(ids, request)
    one_shot = Engine(loaded, chunk_tokens=4096).prefill(ids, request)
    assert chunked.cache.num_tokens == one_shot.cache.num_tokens == 150
    for a, b in zip(chunked.cache.layers, one_shot.cache.layers):
        assert torch.equal(a.positions, b.positions)
        torch.testing.assert_close(a.keys, b.keys, atol=1e-4, rtol=0)
        torch.testing.assert_close(a.values, b.values, atol=1e-4, rtol=0)
    torch.testing.assert_close(chunked.last_logits, one_shot.last_logits, atol=1e-4, rtol=0)
    for index, (a, b) in enumerate(zip(chunked.observations.layers, one_shot.observations.layers)):
        if chunked.cache.layers[index].spec.kind == "sliding":
            assert a is None and b is None
            continue
        assert a.window_queries.shape == (a.window_queries.shape[0], 40, chunked.cache.layers[index].spec.head_dim)
        assert torch.equal(a.window_positions, torch.arange(110, 150))
        assert torch.equal(a.window_positions, b.window_positions)
        torch.testing.assert_close(a.window_queries, b.window_queries, atol=1e-4, rtol=0)
        torch.testing.assert_close(a.attention_sums, b.attention_sums, atol=1e-4, rtol=1e-5)
        assert a.scaling == b.scaling
