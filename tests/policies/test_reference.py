"""Policies against independent references: transformers' eager attention, closed-form budgets, and the errors a
user gets for bad names and values."""

from contextlib import contextmanager

import pytest
import torch

from kvlab.cache.observations import ObservationRequest
from kvlab.engine import Engine
from kvlab.errors import ParameterError, UnknownPolicyError
from kvlab.policies import make_policy
from kvlab.policies.base import ScoreInputs
from kvlab.policies.budgets import HeadwiseBudget, PyramidBudget
from kvlab.policies.observed import window_attention

MODELS = ["tiny_llama", "tiny_gemma3"]


@contextmanager
def eager(model):
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation("sdpa")


def eager_attentions(model, ids):
    with eager(model), torch.inference_mode():
        return model(ids[None], output_attentions=True).attentions


def full_layers(cache):
    return [index for index, layer in enumerate(cache.layers) if layer.spec.kind == "full"]


@pytest.mark.parametrize("model_name", MODELS)
def test_window_attention_matches_eager(model_name, request):
    loaded = request.getfixturevalue(model_name)
    window = 24
    ids = torch.randint(3, 259, (120,), generator=torch.Generator().manual_seed(11))
    result = Engine(loaded, chunk_tokens=50).prefill(ids, ObservationRequest(window_tokens=window))
    attentions = eager_attentions(loaded.model, ids)
    assert loaded.model.config._attn_implementation == "sdpa"
    for index in full_layers(result.cache):
        layer = result.cache.layers[index]
        inputs = ScoreInputs(index, layer.spec, layer.keys, layer.values, layer.positions,
                             result.observations.layer(index))
        ours = window_attention(inputs)
        reference = attentions[index][0, :, -window:, :].float()
        assert ours.shape == reference.shape == (layer.spec.query_heads, window, 120)
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)
        # the last 8 queries alone give the same rows
        torch.testing.assert_close(window_attention(inputs, last_queries=8), reference[:, -8:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_name", MODELS)
def test_h2o_attention_sums_match_eager(model_name, request):
    loaded = request.getfixturevalue(model_name)
    ids = torch.randint(3, 259, (130,), generator=torch.Generator().manual_seed(12))
    policy = make_policy("h2o")
    result = Engine(loaded, chunk_tokens=40).prefill(ids, policy.observation_request())
    attentions = eager_attentions(loaded.model, ids)
    for index in full_layers(result.cache):
        spec = result.cache.layers[index].spec
        per_query_head = attentions[index][0].float().sum(dim=1)  # (query_heads, keys): summed over queries
        reference = per_query_head.reshape(spec.kv_heads, spec.group_size, -1).sum(dim=1)
        sums = result.observations.layer(index).attention_sums
        assert sums.shape == (spec.kv_heads, 130)
        torch.testing.assert_close(sums, reference, atol=1e-3, rtol=0)
        # every query's probabilities sum to 1, so the total is the number of queries times the group size
        assert float(sums.sum()) == pytest.approx(130 * spec.query_heads, rel=1e-4)


def test_pyramid_layer_budgets():
    budgets = PyramidBudget(beta=20.0).layer_budgets(30, 100, 36)
    assert len(budgets) == 30
    assert all(a > b for a, b in zip(budgets, budgets[1:]))
    assert sum(budgets) / 30 == pytest.approx(100, abs=0.5)
    assert min(budgets) >= 36
    # the deepest layer gets 1/beta of the spare budget on top of the protected tokens
    assert budgets[-1] == 36 + round(64 / 20)
    assert PyramidBudget().layer_budgets(1, 100, 36) == [100]


def test_pyramid_allocation_redistributes_what_a_layer_cannot_hold():
    # 2 layers, 3 heads, 10 eligible slots each; a mean budget of 8 asks for more than 10 in the first layer
    ranked = [torch.randn(3, 10, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    counts = PyramidBudget().allocate(ranked, budget_tokens=8, protected_tokens=0)
    assert counts[0].tolist() == [10, 10, 10]
    assert sum(int(c[0]) for c in counts) == 16


def test_headwise_budget_follows_the_scores():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 50, generator=generator)
    scores[0] += 10.0  # head 0 is focused: its scores beat everybody else's
    scores[2] -= 0.5
    budget = 10
    rule = HeadwiseBudget(floor_fraction=0.2)
    counts = rule.allocate([scores], budget_tokens=budget, protected_tokens=0)[0]
    assert int(counts.sum()) == budget * 3
    assert len(set(counts.tolist())) > 1
    assert counts.tolist() == [26, 2, 2]  # floors of 0.2 x 10 for heads 1 and 2, the rest to head 0
    # equal scores in every head: an equal split
    flat = torch.rand(1, 50, generator=generator).expand(3, -1)
    assert rule.allocate([flat], budget_tokens=budget, protected_tokens=0)[0].tolist() == [10, 10, 10]


def test_headwise_floor_and_protection():
    scores = torch.rand(2, 40, generator=torch.Generator().manual_seed(1))
    scores[0] += 5.0
    scores[1, :6] = float("inf")  # 6 protected slots in head 1
    counts = HeadwiseBudget(floor_fraction=0.0).allocate([scores], budget_tokens=10, protected_tokens=6)[0]
    assert int(counts.sum()) == 20
    assert int(counts[1]) >= 6  # protected slots are a floor


def test_unknown_policy_suggests_a_name():
    with pytest.raises(UnknownPolicyError, match="Did you mean") as info:
        make_policy("snapk")
    assert "snapkv" in str(info.value)
    with pytest.raises(UnknownPolicyError):
        make_policy("adakv", base="snapk")


def test_bad_parameter_value():
    with pytest.raises(ParameterError, match="window_tokens"):
        make_policy("snapkv", window_tokens=0)
    with pytest.raises(ParameterError, match="window_tokens"):
        make_policy("snapkv", window_tokens="many")
    with pytest.raises(ParameterError):
        make_policy("h2o", recent_fraction=1.5)
    with pytest.raises(ParameterError):
        make_policy("adakv", base="full")


def test_unknown_parameter():
    with pytest.raises(ParameterError, match="window_tokens"):  # the suggestion
        make_policy("snapkv", window_token=8)
    with pytest.raises(ParameterError):
        make_policy("full", ratio=0.5)


def test_string_parameters_are_converted():
    policy = make_policy("snapkv", window_tokens="8", kernel_size="3")
    assert (policy.window_tokens, policy.kernel_size) == (8, 3)
    assert make_policy("h2o", recent_fraction="0.25").recent_fraction == 0.25
    assert policy.observation_request() == ObservationRequest(window_tokens=8)
