"""knorm — Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
(arXiv:2406.11430).

Rule: keys with a low L2 norm attract high attention, so keep the keys with the smallest norm. Needs no queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.policies import register_policy
from kvlab.policies.base import Policy, ScoreInputs


@register_policy("knorm")
@dataclass(frozen=True)
class KNorm(Policy):
    paper = ("Devoto et al., 2024 — A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression "
             "(arXiv:2406.11430)")
    rule = "score = -||key||"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return -inputs.keys.float().norm(dim=-1)
