"""full: the uncompressed baseline; every token is kept. The reference every other policy is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.policies import register_policy
from kvlab.policies.base import Policy, ScoreInputs
from kvlab.policies.budgets import KeepAllBudget


@register_policy("full")
@dataclass(frozen=True)
class Full(Policy):
    paper = "baseline (no compression)"
    rule = "keep every token; ratio and budget are ignored"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return torch.zeros(inputs.positions.shape)

    def budget_rule(self):
        return KeepAllBudget()
