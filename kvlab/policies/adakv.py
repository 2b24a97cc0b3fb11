"""adakv — Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
LLM Inference" (arXiv:2407.11550).

Rule: wrap any scoring policy (``base``, SnapKV by default) and let the KV heads of a layer share its budget:
the layer keeps its ``budget x kv_heads`` best-scored tokens across heads, so focused heads give slots to heads
whose attention is spread out; each head keeps at least ``floor_fraction`` of the budget (the paper's alpha
safeguard). Heads then hold different numbers of tokens; the cache pads and masks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from kvlab.cache.observations import ObservationRequest
from kvlab.errors import ParameterError
from kvlab.policies import POLICIES, register_policy
from kvlab.policies.base import Policy, ScoreInputs, param
from kvlab.policies.budgets import HeadwiseBudget


@register_policy("adakv")
@dataclass(frozen=True)
class AdaKV(Policy):
    paper = "Feng et al., 2024 — Ada-KV: Adaptive Budget Allocation for KV Cache Eviction (arXiv:2407.11550)"
    rule = "base policy's score; head-wise budgets within each layer"

    base: str = param("snapkv", "scoring policy to wrap (its default parameters are used)")
    floor_fraction: float = param(0.2, "share of the budget every head keeps at least (alpha)", minimum=0.0,
                                  maximum=1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base in ("adakv", "full"):
            raise ParameterError(f"adakv: base must be a scoring policy, not {self.base!r}; try base=snapkv")
        POLICIES.get(self.base)  # unknown names fail here, with suggestions

    @cached_property
    def inner(self) -> Policy:
        return POLICIES.get(self.base)()

    def observation_request(self) -> ObservationRequest:
        return self.inner.observation_request()

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return self.inner.score(inputs)

    def protected_sink_tokens(self) -> int:
        return self.inner.protected_sink_tokens()

    def protected_recent_tokens(self, budget_tokens: int) -> int:
        return self.inner.protected_recent_tokens(budget_tokens)

    def budget_rule(self):
        return HeadwiseBudget(floor_fraction=self.floor_fraction)
