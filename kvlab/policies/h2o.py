"""h2o — Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models" (arXiv:2306.14048).

Rule: keep the heavy hitters, the keys with the largest attention accumulated over every query of the prefix,
plus a recent window of ``recent_fraction`` of the budget. The accumulation runs during prefill in query chunks,
so no n x n attention matrix is ever held. Deviation: the paper evicts greedily while decoding; here the rule is
applied once to the prefilled context, which is the variant kvpress and SCBench evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.cache.observations import ObservationRequest
from kvlab.errors import KvlabError
from kvlab.policies import register_policy
from kvlab.policies.base import Policy, ScoreInputs, param


@register_policy("h2o")
@dataclass(frozen=True)
class H2O(Policy):
    paper = ("Zhang et al., 2023 — H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs "
             "(arXiv:2306.14048)")
    rule = "score = attention accumulated over all prefix queries; recent window kept"

    recent_fraction: float = param(0.5, "share of the budget given to the most recent tokens", minimum=0.0,
                                   maximum=1.0)

    def observation_request(self) -> ObservationRequest:
        return ObservationRequest(attention_sums=True)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        observation = inputs.observation
        if observation is None or observation.attention_sums is None:
            raise KvlabError("h2o needs accumulated attention; prefill with the policy's observation_request()")
        sums = observation.attention_sums
        index = inputs.positions.clamp(min=0).clamp(max=sums.shape[-1] - 1)
        return sums.gather(-1, index)

    def protected_recent_tokens(self, budget_tokens: int) -> int:
        return int(budget_tokens * self.recent_fraction)
