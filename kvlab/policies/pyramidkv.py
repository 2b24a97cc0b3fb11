"""pyramidkv — Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling" (arXiv:2406.02069).

Rule: SnapKV's score with a pyramid of layer budgets: lower layers, whose attention is spread out, keep more;
deeper layers, whose attention is focused, keep less (``beta`` sets the slope). The mean per-layer budget equals
the requested budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvlab.policies import register_policy
from kvlab.policies.base import param
from kvlab.policies.budgets import PyramidBudget
from kvlab.policies.snapkv import SnapKV


@register_policy("pyramidkv")
@dataclass(frozen=True)
class PyramidKV(SnapKV):
    paper = ("Cai et al., 2024 — PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling "
             "(arXiv:2406.02069)")
    rule = "SnapKV score; layer budgets fall linearly with depth"

    beta: float = param(20.0, "pyramid slope: the deepest layer keeps 1/beta of the mean spare budget", minimum=1.0)

    def budget_rule(self):
        return PyramidBudget(beta=self.beta)
