"""duo: retrieval heads (ranked by the model's head profile) keep the whole context, streaming heads keep sinks
and a recent window; the share of retrieval heads follows from the budget or is set directly. The session's tiny
model profiles come from tests/conftest.py (head_profiles)."""

import pytest
import torch

from kvlab.cache.kvcache import PADDING_POSITION
from kvlab.engine import Engine, context_kept_tokens
from kvlab.engine.compress import budget_from_ratio
from kvlab.engine.conversation import CompressionRule, Conversation
from kvlab.errors import ParameterError
from kvlab.models.profile import PROFILE_DIR_ENV, MissingProfileError, load_profile
from kvlab.policies import make_policy
from kvlab.policies.budgets import GlobalBudget, WholeHeadBudget

CONTEXT_TOKENS = 162
SINKS, RECENT = 4, 8


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return Engine(tiny_llama)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 259, (CONTEXT_TOKENS,), generator=torch.Generator().manual_seed(11))


def kept_by_head(cache) -> dict[tuple[int, int], list[int]]:
    """(layer, head) -> kept positions, over full-attention layers."""
    kept = {}
    for index, layer in enumerate(cache.layers):
        if layer.spec.kind == "full":
            for head, row in enumerate(layer.positions.tolist()):
                kept[(index, head)] = [p for p in row if p != PADDING_POSITION]
    return kept


def compress(engine, ids, budget_tokens, **params):
    policy = make_policy("duo", sink_tokens=SINKS, recent_tokens=RECENT, **params)
    result = engine.prefill(ids, policy.observation_request())
    cache, _, _ = engine.compress(result, policy, budget_tokens=budget_tokens)
    return kept_by_head(cache)


def streaming(context: int, recent: int = RECENT) -> list[int]:
    return list(range(SINKS)) + list(range(context - recent, context))


def test_best_heads_keep_everything_and_the_others_sinks_and_window(engine, ids, tiny_llama):
    ranking = [(layer, head) for layer, head, _ in load_profile(tiny_llama.fingerprint).ranked_heads()]
    # 6 heads; two full heads cost 2 x (162 - 12) = 300 spare slots = (62 - 12) x 6: the budget is 62
    kept = compress(engine, ids, budget_tokens=62)
    assert sum(len(positions) for positions in kept.values()) == 62 * len(kept)
    for head in ranking[:2]:
        assert kept[head] == list(range(CONTEXT_TOKENS))
    for head in ranking[2:]:
        assert kept[head] == streaming(CONTEXT_TOKENS)


def test_the_boundary_head_keeps_its_most_recent_tokens(engine, ids, tiny_llama):
    ranking = [(layer, head) for layer, head, _ in load_profile(tiny_llama.fingerprint).ranked_heads()]
    kept = compress(engine, ids, budget_tokens=70)  # 6 x 58 = 348 spare: two full heads and 48 more slots
    assert [len(kept[head]) for head in ranking] == [162, 162, 12 + 48, 12, 12, 12]
    assert kept[ranking[2]] == streaming(CONTEXT_TOKENS, RECENT + 48)


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.7, 0.9])
def test_the_share_of_retrieval_heads_follows_from_the_ratio(engine, ids, ratio):
    budget = budget_from_ratio(ratio, CONTEXT_TOKENS)
    kept = compress(engine, ids, budget_tokens=budget)
    share = max(0.0, (budget - SINKS - RECENT) / (CONTEXT_TOKENS - SINKS - RECENT))  # f C + (1 - f)(s + w) = B
    full_heads = sum(len(positions) == CONTEXT_TOKENS for positions in kept.values())
    assert full_heads == int(share * len(kept) + 1e-9)
    assert sum(len(positions) for positions in kept.values()) == budget * len(kept)


def test_retrieval_share_sets_the_heads_directly(engine, ids, tiny_llama):
    ranking = [(layer, head) for layer, head, _ in load_profile(tiny_llama.fingerprint).ranked_heads()]
    kept = compress(engine, ids, budget_tokens=100, retrieval_share=0.5)
    for head in ranking[:3]:
        assert kept[head] == list(range(CONTEXT_TOKENS))
    for head in ranking[3:]:
        assert kept[head] == streaming(CONTEXT_TOKENS)
    assert make_policy("duo", retrieval_share=0.5).budget_rule() == WholeHeadBudget(0.5)
    assert make_policy("duo").budget_rule() == GlobalBudget(heads="free")


def test_layer_granularity_keeps_whole_layers(engine, ids, tiny_llama):
    profile = load_profile(tiny_llama.fingerprint)
    best_layer = max(zip(profile.layers, profile.scores), key=lambda item: sum(item[1]))[0]
    for params in ({"retrieval_share": 0.5}, {}):
        budget = 100 if params else 12 + (CONTEXT_TOKENS - 12) // 2  # half the heads' worth of spare slots
        kept = compress(engine, ids, budget_tokens=budget, granularity="layer", **params)
        for (layer, _), positions in kept.items():
            assert positions == (list(range(CONTEXT_TOKENS)) if layer == best_layer else streaming(CONTEXT_TOKENS))


def test_conversation_recompresses_by_the_same_heads(engine, ids, tiny_llama):
    policy = make_policy("duo", sink_tokens=SINKS, recent_tokens=RECENT)
    result = engine.prefill(ids, policy.observation_request())
    cache, _, _ = engine.compress(result, policy, budget_tokens=62)
    chat = Conversation(engine, cache, rule=CompressionRule(policy, budget_tokens=62, headroom=0.0))
    turn = chat.ask("what is the first word? " * 3, max_new_tokens=4)
    assert turn.recompressed
    assert context_kept_tokens(chat.cache, CONTEXT_TOKENS) <= 62
    best = load_profile(tiny_llama.fingerprint).ranked_heads()[0]
    positions = chat.cache.layers[best[0]].positions[best[1]]
    assert set(range(CONTEXT_TOKENS)) <= set(positions.tolist())  # the best head still holds the whole document


def test_a_missing_profile_is_one_line_naming_kvlab_profile(engine, ids, tmp_path, monkeypatch):
    monkeypatch.setenv(PROFILE_DIR_ENV, str(tmp_path))
    with pytest.raises(MissingProfileError) as caught:
        engine.prefill(ids, make_policy("duo").observation_request())
    message = str(caught.value)
    assert "\n" not in message and "kvlab profile --model" in message and engine.loaded.fingerprint in message


def test_retrieval_share_is_a_share_or_minus_one():
    with pytest.raises(ParameterError, match="retrieval_share"):
        make_policy("duo", retrieval_share="-0.5")
    with pytest.raises(ParameterError, match="retrieval_share"):
        make_policy("duo", retrieval_share="1.5")
