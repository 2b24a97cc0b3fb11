"""expected_attention against computations written out here: pre-RoPE queries taken from the model's own projections,
the future rotation from the model's own rotary embedding, and the score formula key by key."""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from transformers.models.llama.modeling_llama import rotate_half

from kvlab.cache.layout import LayerSpec, layout_from_config
from kvlab.cache.observations import LayerObservation, ObservationRequest
from kvlab.engine import Engine
from kvlab.policies import make_policy
from kvlab.policies.base import ScoreInputs
from kvlab.policies.expected_attention import ExpectedAttention, QueryMoments

MODELS = ["tiny_llama", "tiny_gemma3"]
TOKENS = 120


def token_ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 259, (TOKENS,), generator=torch.Generator().manual_seed(seed))


def full_layers(engine: Engine) -> list[int]:
    return [index for index, spec in enumerate(engine.layout) if spec.kind == "full"]


def prerope_queries(loaded, ids: torch.Tensor, layer_index: int) -> torch.Tensor:
    """(query_heads, tokens, d) float64: the layer's queries before RoPE, from its own q_proj (and q_norm) applied
    to the hidden states it receives in a plain forward of the model."""
    attention = loaded.model.model.layers[layer_index].self_attn
    seen = []
    handle = attention.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]),
        with_kwargs=True)
    try:
        with torch.no_grad():
            loaded.model(ids[None])
            queries = attention.q_proj(seen[0]).view(1, ids.numel(), -1, attention.head_dim).transpose(1, 2)
            if hasattr(attention, "q_norm"):
                queries = attention.q_norm(queries)
    finally:
        handle.remove()
    return queries[0].double()


def moments(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (H, d) and population covariance (H, d, d) over the token dimension of (H, n, d)."""
    mean = queries.mean(dim=1)
    centered = queries - mean[:, None]
    return mean, centered.transpose(1, 2) @ centered / queries.shape[1]


def average_future_rotation(loaded, first: int, count: int) -> torch.Tensor:
    """(d, d) float64: the mean over positions first .. first+count-1 of the matrix of x -> x cos + rotate_half(x)
    sin, cos and sin taken from the model's rotary embedding for its full-attention layers."""
    model = loaded.model
    per_type = "full_attention" in model.config.rope_parameters
    extra = {"layer_type": "full_attention"} if per_type else {}
    head_dim = model.model.layers[0].self_attn.head_dim
    eye = torch.eye(head_dim)
    total = torch.zeros(head_dim, head_dim, dtype=torch.float64)
    for position in range(first, first + count):
        cos, sin = model.model.rotary_emb(eye, torch.tensor([[position]]), **extra)
        rotated_columns = eye * cos[0, 0] + rotate_half(eye) * sin[0, 0]  # row j: the rotation of e_j
        total += rotated_columns.T.double()
    return total / count


@pytest.mark.parametrize("model_name", MODELS)
def test_statistics_are_those_of_the_pre_rope_queries(model_name, request):
    loaded = request.getfixturevalue(model_name)
    engine = Engine(loaded, chunk_tokens=50)  # the statistics span three prefill chunks
    ids = token_ids()
    for policy in (make_policy("expected_attention"), make_policy("expected_attention", statistics_tokens=30)):
        result = engine.prefill(ids, policy.observation_request())
        first = TOKENS - 30 if policy.statistics_tokens else policy.sink_tokens
        for index in full_layers(engine):
            recorded = result.observations.layer(index).extras[policy.probe]
            mean, covariance = moments(prerope_queries(loaded, ids, index)[:, first:])
            assert recorded.next_position == TOKENS
            torch.testing.assert_close(recorded.mean.double(), mean, atol=2e-4, rtol=1e-4)
            torch.testing.assert_close(recorded.covariance.double(), covariance, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("model_name", MODELS)
def test_score_is_the_expected_attention_formula(model_name, request):
    loaded = request.getfixturevalue(model_name)
    engine = Engine(loaded)
    ids = token_ids(seed=4)
    policy = make_policy("expected_attention", future_tokens=9, epsilon=0.05)
    sinks = policy.sink_tokens
    result = engine.prefill(ids, policy.observation_request())
    rotation = average_future_rotation(loaded, TOKENS, 9)
    for index in full_layers(engine):
        layer = result.cache.layers[index]
        spec = layer.spec
        scale = loaded.model.model.layers[index].self_attn.scaling
        mean, covariance = moments(prerope_queries(loaded, ids, index)[:, sinks:])
        keys, values = layer.keys.double(), layer.values.double()
        expected = torch.zeros(spec.kv_heads, TOKENS, dtype=torch.float64)
        for head in range(spec.query_heads):
            kv_head = head // spec.group_size
            mu = rotation @ mean[head]
            sigma = rotation @ covariance[head] @ rotation.T
            numerators = {}
            for j in range(sinks, TOKENS):
                k = keys[kv_head, j]
                numerators[j] = math.exp(scale * float(mu @ k) + scale ** 2 / 2 * float(k @ sigma @ k))
            total = sum(numerators.values())
            for j, numerator in numerators.items():
                expected[kv_head, j] += numerator / total / spec.group_size
        scores = policy.score(ScoreInputs(index, spec, layer.keys, layer.values, layer.positions,
                                          result.observations.layer(index)))
        for kv_head in range(spec.kv_heads):
            for j in (sinks, 11, 57, 90, TOKENS - 1):
                want = (expected[kv_head, j] + 0.05) * values[kv_head, j].norm()
                assert float(scores[kv_head, j]) == pytest.approx(float(want), rel=2e-3)
            assert float(scores[kv_head, :sinks].min()) > float(scores[kv_head, sinks:].max())


def constructed(mean: torch.Tensor, covariance: torch.Tensor, keys: torch.Tensor, policy: ExpectedAttention,
                rope_theta: float | None, next_position: int = 37) -> torch.Tensor:
    """Scores of one KV head whose keys are ``keys`` (slots, d), under hand-made query statistics."""
    spec = LayerSpec("full", kv_heads=1, query_heads=1, head_dim=keys.shape[1], rope_theta=rope_theta)
    statistics = QueryMoments(mean[None], covariance[None], next_position, rope_theta)
    observation = LayerObservation(scaling=0.5, extras={policy.probe: statistics})
    inputs = ScoreInputs(0, spec, keys[None], torch.ones_like(keys)[None], torch.arange(keys.shape[0])[None],
                         observation)
    return policy.score(inputs)[0]


def test_keys_the_expected_query_points_at_rank_first():
    dim, position, theta = 8, 37, 10000.0
    mean = torch.randn(dim, generator=torch.Generator().manual_seed(0))
    angles = position * theta ** (-torch.arange(0, dim, 2).double() / dim)
    cos, sin = torch.cat([angles, angles]).cos().float(), torch.cat([angles, angles]).sin().float()
    toward = mean * cos + rotate_half(mean) * sin  # where a query at the next position will point
    backward = mean * cos - rotate_half(mean) * sin  # rotated the wrong way
    keys = torch.stack([-toward, mean, backward, toward])
    policy = ExpectedAttention(future_tokens=1, sink_tokens=0, use_vnorm=False)
    scores = constructed(mean, torch.zeros(dim, dim), keys, policy, theta, next_position=position)
    assert int(scores.argmax()) == 3 and int(scores.argmin()) == 0
    # without the future rotation the un-rotated mean itself would win
    assert int(constructed(mean, torch.zeros(dim, dim), keys, policy, None).argmax()) == 1
    # the covariance term favours keys along the directions where queries vary most
    variance = torch.diag(torch.tensor([4.0] + [0.0] * (dim - 1)))
    axes = torch.eye(dim)[:2]
    with_covariance = constructed(torch.zeros(dim), variance, axes, policy, None)
    assert float(with_covariance[0]) > float(with_covariance[1])
    mean_only = constructed(torch.zeros(dim), variance, axes, dataclasses.replace(policy, use_covariance=False), None)
    assert float(mean_only[0]) == pytest.approx(float(mean_only[1]))


@pytest.mark.parametrize("model_name", MODELS)
def test_sink_tokens_are_kept(model_name, request):
    engine = Engine(request.getfixturevalue(model_name))
    ids = token_ids(seed=5)
    for sinks in (4, 9):
        policy = make_policy("expected_attention", sink_tokens=sinks)
        result = engine.prefill(ids, policy.observation_request())
        cache, budget, _ = engine.compress(result, policy, ratio=0.9)
        for index in full_layers(engine):
            for head_positions in cache.layers[index].positions.tolist():
                assert set(range(sinks)) <= set(head_positions)
                assert len(head_positions) == budget


def test_layout_carries_the_standard_rope_base(tiny_llama, tiny_gemma3):
    assert {spec.rope_theta for spec in layout_from_config(tiny_llama.model.config)} == {10000.0}
    gemma = {(spec.kind, spec.rope_theta) for spec in layout_from_config(tiny_gemma3.model.config)}
    assert gemma == {("sliding", 10000.0), ("full", 1000000.0)}
    base = dict(num_hidden_layers=1, num_attention_heads=2, hidden_size=32)
    for rope in ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
                 {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}):
        assert layout_from_config(SimpleNamespace(**base, rope_parameters=rope))[0].rope_theta is None


def test_without_standard_rope_the_statistics_are_of_the_rotated_queries(tiny_llama):
    """The fallback for scaled RoPE: no un-rotation, no future rotation (documented as an approximation)."""
    engine = Engine(tiny_llama)
    engine.layout = [dataclasses.replace(spec, rope_theta=None) for spec in engine.layout]
    policy = make_policy("expected_attention")
    ids = token_ids()
    request = ObservationRequest(window_tokens=TOKENS - policy.sink_tokens, probes=(policy.probe,))
    result = engine.prefill(ids, request)
    for index in full_layers(engine):
        observation = result.observations.layer(index)
        mean, covariance = moments(observation.window_queries.double())
        recorded = observation.extras[policy.probe]
        assert recorded.rope_theta is None
        torch.testing.assert_close(recorded.mean.double(), mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(recorded.covariance.double(), covariance, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(mean, moments(prerope_queries(tiny_llama, ids, index)[:, 4:])[0], atol=1e-2)
