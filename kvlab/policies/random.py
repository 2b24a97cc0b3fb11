"""random: evict uniformly at random; the control that any scoring policy must beat.

The seed is a parameter of the policy, not of the run, so it is part of a stored cache's identity: two caches
compressed with different seeds are different files in the store.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.policies import register_policy
from kvlab.policies.base import Policy, ScoreInputs, param


@register_policy("random")
@dataclass(frozen=True)
class RandomEviction(Policy):
    paper = "control baseline"
    rule = "score = uniform noise (seeded by the seed parameter)"

    sink_tokens: int = param(0, "first tokens always kept", unit="tokens", minimum=0)
    seed: int = param(0, "random seed; each layer draws from its own stream derived from it", minimum=0)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + inputs.layer_index)
        return torch.rand(inputs.positions.shape, generator=generator)

    def protected_sink_tokens(self) -> int:
        return self.sink_tokens
