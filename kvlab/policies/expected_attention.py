"""expected_attention — Devoto et al., 2025, "Expected Attention: KV Cache Compression by Estimating Attention from
Future Queries Distribution" (arXiv:2510.00057).

Rule: the prefix's queries (all but the first ``sink_tokens``), un-rotated to their pre-RoPE form, model the queries
still to come as a Gaussian per query head, with mean mu and covariance S (population, divided by n). R, the RoPE
rotation averaged over the next ``future_tokens`` positions, moves them to where future queries point: mu' = R mu,
S' = R S R^T. Under q ~ N(mu', S') the expected softmax numerator of a (rotated) key k is
exp(s mu'.k + s^2 k^T S' k / 2), s the layer's softmax scale. Those are normalised over the layer's keys (a softmax
that leaves the sinks out), averaged over the query heads sharing a KV head and, with ``use_vnorm``, weighted by
the value norm: (p + epsilon) * ||v||. The first ``sink_tokens`` are always kept.

Deviations from the reference code (kvpress ``ExpectedAttentionPress``):
- the statistics come from the queries the model computed, un-rotated with the layer's RoPE and accumulated over
  prefill chunks (float64 sums), not recomputed from the hidden states; ``statistics_tokens`` can restrict them to
  the end of the prefix (0, the default, uses every query after the sinks, as the reference);
- the scale is the layer's own s, where the reference writes 1/sqrt(d) and 1/(2d): the same for Llama and for
  Gemma 3 (query_pre_attn_scalar = head_dim);
- only standard RoPE is modelled (``LayerSpec.rope_theta``). Where a layer's RoPE is scaled (linear, dynamic,
  YaRN, Llama 3, ...) or partial, the statistics are those of the rotated queries as seen and no future rotation
  is applied: an approximation, not the paper's rule;
- in a conversation, a re-compression models the future with the new turn's queries.
kvpress's evaluation preset adds epsilon=0.01 and a head-wise budget; this is the plain press (epsilon 0, uniform).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.cache.layout import LayerSpec
from kvlab.cache.observations import (
    ObservationRequest,
    Observations,
    Probe,
    ProbeContext,
    ProbeState,
    Replay,
)
from kvlab.cache.rope import rope_cos_sin, rotate_half
from kvlab.errors import KvlabError
from kvlab.policies import register_policy
from kvlab.policies.base import Policy, ScoreInputs, group_mean, param


def average_rotation(first_position: int, count: int, head_dim: int, theta: float,
                     device: torch.device) -> torch.Tensor:
    """(head_dim, head_dim): the RoPE rotation matrix averaged over positions first_position .. + count - 1."""
    cos, sin = rope_cos_sin(torch.arange(first_position, first_position + count, device=device), head_dim, theta)
    eye = torch.eye(head_dim, device=device)
    return (eye * cos.mean(0) + rotate_half(eye) * sin.mean(0)).T  # row j before .T is R e_j


@dataclass(frozen=True)
class QueryMoments:
    """One full layer's query statistics: mean (query_heads, d) and covariance (query_heads, d, d), float32, of the
    pre-RoPE queries (of the rotated ones where ``rope_theta`` is None); the future starts at ``next_position``."""

    mean: torch.Tensor
    covariance: torch.Tensor
    next_position: int
    rope_theta: float | None


@dataclass(frozen=True)
class QueryStatistics(Probe):
    """Mean and covariance of the feed's queries at positions >= ``sink_tokens`` (only the last ``last_tokens``
    of the sequence if > 0); stored per full layer as ``QueryMoments``."""

    sink_tokens: int = 4
    last_tokens: int = 0

    def start(self, context: ProbeContext) -> ProbeState:
        return _StatisticsState(self, context)


@dataclass
class _Sums:
    """Running float64 sums over one layer's counted queries: count, sum (query_heads, d), sum of q q^T."""

    spec: LayerSpec
    scaling: float
    count: int
    total: torch.Tensor
    outer: torch.Tensor


class _StatisticsState(ProbeState):
    def __init__(self, probe: QueryStatistics, context: ProbeContext) -> None:
        self.probe = probe
        self.next_position = context.total_tokens
        window_start = context.total_tokens - probe.last_tokens if probe.last_tokens else 0
        self.first_counted = max(probe.sink_tokens, window_start)
        self.sums: dict[int, _Sums] = {}

    def on_attention(self, layer_index, spec, queries, keys, slot_positions, query_positions, scaling) -> None:
        if layer_index not in self.sums:
            zeros = queries.new_zeros((spec.query_heads, spec.head_dim, spec.head_dim), dtype=torch.float64)
            self.sums[layer_index] = _Sums(spec, float(scaling), 0, zeros[:, 0].clone(), zeros)
        counted = query_positions >= self.first_counted
        chosen = queries[:, counted].float()  # (query_heads, n, d)
        if spec.rope_theta is not None:  # undo RoPE: rotate each query back by its own angle
            cos, sin = rope_cos_sin(query_positions[counted], spec.head_dim, spec.rope_theta)
            chosen = chosen * cos - rotate_half(chosen) * sin
        chosen = chosen.double()
        sums = self.sums[layer_index]
        sums.count += int(counted.sum())
        sums.total += chosen.sum(dim=1)
        sums.outer += chosen.transpose(1, 2) @ chosen

    def finish(self, observations: Observations, replay: Replay | None) -> None:
        for layer_index, sums in self.sums.items():
            mean = sums.total / max(sums.count, 1)
            covariance = sums.outer / max(sums.count, 1) - mean[:, :, None] * mean[:, None, :]
            moments = QueryMoments(mean.float(), covariance.float(), self.next_position, sums.spec.rope_theta)
            observations.put_layer_extra(layer_index, self.probe, moments, sums.scaling)


@register_policy("expected_attention")
@dataclass(frozen=True)
class ExpectedAttention(Policy):
    paper = ("Devoto et al., 2025 — Expected Attention: KV Cache Compression by Estimating Attention from Future "
             "Queries Distribution (arXiv:2510.00057)")
    rule = ("score = softmax_k E[exp(s q.k)] under a Gaussian of the prefix's pre-RoPE queries rotated to the next "
            "positions, times ||v||; sinks kept")

    future_tokens: int = param(512, "future positions the query distribution is rotated to (averaged RoPE)",
                               unit="tokens", minimum=1)
    sink_tokens: int = param(4, "first tokens always kept, and left out of the statistics and the softmax",
                             unit="tokens", minimum=0)
    statistics_tokens: int = param(0, "last prefix tokens whose queries give the statistics (0: all after the sinks)",
                                   unit="tokens", minimum=0)
    epsilon: float = param(0.0, "added to the expected attention before weighting by the value norm", minimum=0.0)
    use_covariance: bool = param(True, "include the query covariance term k^T S k / 2 (else the mean only)")
    use_vnorm: bool = param(True, "weight the expected attention by the value norm ||v||")

    @property
    def probe(self) -> QueryStatistics:
        return QueryStatistics(self.sink_tokens, self.statistics_tokens)

    def observation_request(self) -> ObservationRequest:
        return ObservationRequest(probes=(self.probe,))

    def protected_sink_tokens(self) -> int:
        return self.sink_tokens

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        observation = inputs.observation
        moments = None if observation is None else observation.extras.get(self.probe)
        if observation is None or moments is None:
            raise KvlabError("expected_attention needs the query statistics; prefill with the policy's "
                             "observation_request() through an Engine")
        spec = inputs.spec
        mean, covariance = moments.mean, moments.covariance
        if moments.rope_theta is not None:
            rotation = average_rotation(moments.next_position, self.future_tokens, spec.head_dim,
                                        moments.rope_theta, mean.device)
            mean, covariance = mean @ rotation.T, rotation @ covariance @ rotation.T
        keys = inputs.keys.float().repeat_interleave(spec.group_size, dim=0)  # (query_heads, slots, d)
        scale = observation.scaling
        logits = scale * (keys @ mean[:, :, None])[..., 0]
        if self.use_covariance:
            logits = logits + scale * scale / 2 * ((keys @ covariance) * keys).sum(dim=-1)
        counted = inputs.positions >= self.sink_tokens  # padding (-1) is never counted
        grouped = counted.repeat_interleave(spec.group_size, dim=0)
        expected = logits.masked_fill(~grouped, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
        scores = group_mean(expected, spec)  # (kv_heads, slots)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * inputs.values.float().norm(dim=-1)
        scores = scores.masked_fill(~counted, 0.0)
        sinks = (inputs.positions >= 0) & ~counted
        return scores.masked_fill(sinks, float(scores.max()) + 1.0)  # as the reference; protected anyway
