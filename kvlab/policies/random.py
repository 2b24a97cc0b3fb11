"""random: evict uniformly at random; the control that any scoring policy must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.policies import register_policy
from kvlab.policies.base import Policy, ScoreInputs, param


@register_policy("random")
@dataclass(frozen=True)
class RandomEviction(Policy):
    paper = "control baseline"
    rule = "score = uniform noise (seeded by --seed)"

    sink_tokens: int = param(0, "first tokens always kept", unit="tokens", minimum=0)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return torch.rand(inputs.positions.shape, generator=inputs.generator)

    def protected_sink_tokens(self) -> int:
        return self.sink_tokens
