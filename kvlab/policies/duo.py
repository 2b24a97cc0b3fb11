"""duo — Xiao et al., 2024, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming
Heads" (arXiv:2410.10819).

Rule: retrieval heads keep the whole context; streaming heads keep only the first ``sink_tokens`` and the last
``recent_tokens``. Heads are ranked once per model by their head profile (``kvlab profile --model M``, see
``engine.profile``: a training-free copy-attention score after Wu et al., 2024, arXiv:2404.15574), best first across
all full-attention layers. The budget sets the share f of retrieval heads: with context C and s + w protected tokens
per head, f * C + (1 - f) * (s + w) = budget, so f = (budget - s - w) / (C - s - w); the head at the boundary
keeps part of the context (its most recent tokens), so the mean kept per head is the budget exactly.
``retrieval_share`` sets f directly instead (the budget then only caps the streaming heads' window).

How the rank reaches the budget: the score of a slot is ``rank x stride + position`` (stride: the sequence length),
so the global budget (``GlobalBudget``) gives whole heads to the best-ranked ones, most recent tokens first. Exact
in float32 while heads x sequence length < 2**24 (16.7M); past that only the boundary head's order is approximate.

Memory: held bytes count padding, and a layer is padded to its longest head. One retrieval head makes its layer
hold C slots for every head, so duo's real footprint depends on how the retrieval heads spread over layers.
``granularity=layer`` ranks whole layers (mean head score), so every head of a layer keeps the same count and no
slot is spent on padding.

Deviations: the paper learns a gate per head by distillation on synthetic passkey data and applies the split while
decoding; here heads are ranked by the training-free profile and the split is applied once to the prefilled cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.cache.observations import (
    ObservationRequest,
    Observations,
    Probe,
    ProbeContext,
    ProbeState,
    Replay,
)
from kvlab.errors import KvlabError, ParameterError
from kvlab.models.profile import HeadProfile, ProfileError, load_profile
from kvlab.policies import register_policy
from kvlab.policies.base import Policy, ScoreInputs, param
from kvlab.policies.budgets import BudgetRule, GlobalBudget, WholeHeadBudget


@dataclass(frozen=True)
class HeadRanks(Probe):
    """The model's head profile as ranks, per full layer (kv_heads,) float: 0 for the model's lowest-scored head,
    heads - 1 for its best (``granularity=layer``: every head of a layer gets its layer's rank). Stored per layer
    as ``(ranks, stride)``; the profile itself in ``Observations.extras``."""

    granularity: str = "head"

    def start(self, context: ProbeContext) -> ProbeState:
        if context.model_fingerprint is None:
            raise KvlabError("duo needs the model's fingerprint to find its head profile; prefill through an Engine")
        profile = load_profile(context.model_fingerprint)
        full = tuple(index for index, spec in enumerate(context.layout) if spec.kind == "full")
        if profile.layers != full or any(len(row) != context.layout[index].kv_heads
                                         for index, row in zip(profile.layers, profile.scores)):
            raise ProfileError(f"the head profile of {profile.model} does not match the model's layers; re-run "
                               f"`kvlab profile --model {profile.model}`")
        return _HeadRankState(self, profile, context.total_tokens)


class _HeadRankState(ProbeState):
    def __init__(self, probe: HeadRanks, profile: HeadProfile, total_tokens: int) -> None:
        self.probe, self.profile, self.stride = probe, profile, total_tokens
        self.scaling: dict[int, float] = {}

    def on_attention(self, layer_index, spec, queries, keys, slot_positions, query_positions, scaling) -> None:
        self.scaling.setdefault(layer_index, float(scaling))

    def finish(self, observations: Observations, replay: Replay | None) -> None:
        scores = torch.tensor(self.profile.scores, dtype=torch.float64)  # (layers, kv_heads)
        if self.probe.granularity == "layer":
            scores = scores.mean(dim=1, keepdim=True).expand_as(scores)
        order = scores.flatten().argsort(stable=True)
        ranks = torch.empty(order.numel(), dtype=torch.float64)
        ranks[order] = torch.arange(order.numel(), dtype=torch.float64)
        if self.probe.granularity == "layer":  # tied heads of one layer share its rank
            ranks = ranks.reshape(scores.shape).amin(dim=1, keepdim=True).expand_as(scores).flatten()
        observations.extras[self.probe] = self.profile
        for row, index in enumerate(self.profile.layers):
            observations.put_layer_extra(index, self.probe, (ranks.reshape(scores.shape)[row], self.stride),
                                         self.scaling.get(index, 1.0))


@register_policy("duo")
@dataclass(frozen=True)
class Duo(Policy):
    paper = ("Xiao et al., 2024 — DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming "
             "Heads (arXiv:2410.10819)")
    rule = "retrieval heads (by `kvlab profile`) keep all; streaming heads keep sinks + recent"

    sink_tokens: int = param(16, "first tokens every head keeps (attention sinks)", unit="tokens", minimum=0)
    recent_tokens: int = param(64, "last tokens every head keeps (the streaming heads' window)", unit="tokens",
                               minimum=0)
    retrieval_share: float = param(-1.0, "share of heads that keep everything; -1: follows from the budget",
                                   minimum=-1.0, maximum=1.0)
    granularity: str = param("head", "rank single heads, or whole layers (no padding)", choices=("head", "layer"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.retrieval_share != -1.0 and self.retrieval_share < 0:
            raise ParameterError(f"duo: retrieval_share must be in [0, 1], or -1 to follow the budget "
                                 f"(got {self.retrieval_share})")

    @property
    def probe(self) -> HeadRanks:
        return HeadRanks(self.granularity)

    def observation_request(self) -> ObservationRequest:
        return ObservationRequest(probes=(self.probe,))

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        recorded = None if inputs.observation is None else inputs.observation.extras.get(self.probe)
        if recorded is None:
            raise KvlabError("duo needs the model's head profile; prefill with the policy's observation_request() "
                             "through an Engine")
        ranks, stride = recorded
        positions = inputs.positions
        scores = ranks.to(positions.device)[:, None] * stride + positions.clamp(min=0).double()
        return scores.float()

    def protected_sink_tokens(self) -> int:
        return self.sink_tokens

    def protected_recent_tokens(self, budget_tokens: int) -> int:
        return self.recent_tokens

    def budget_rule(self) -> BudgetRule:
        if self.retrieval_share >= 0:
            return WholeHeadBudget(self.retrieval_share, self.granularity)
        return GlobalBudget(heads="free" if self.granularity == "head" else "shared")
