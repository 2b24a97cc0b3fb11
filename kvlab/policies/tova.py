"""tova — Oren et al., 2024, "Transformers are Multi-State RNNs" (arXiv:2401.06104), Token Omission Via Attention.

Rule: keep the tokens the last query attends to most, with the attention averaged over all heads of the layer
(every KV head keeps the same tokens). Deviation: the paper evicts one token per decoding step; here the rule is
applied once to the prefilled context, scored by the last prefix token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.cache.observations import ObservationRequest
from kvlab.policies import register_policy
from kvlab.policies.base import Policy, ScoreInputs
from kvlab.policies.observed import window_attention


@register_policy("tova")
@dataclass(frozen=True)
class TOVA(Policy):
    paper = "Oren et al., 2024 — Transformers are Multi-State RNNs (arXiv:2401.06104)"
    rule = "score = last query's attention, averaged over all heads"

    def observation_request(self) -> ObservationRequest:
        return ObservationRequest(window_tokens=1)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        attention = window_attention(inputs, last_queries=1)[:, -1]  # (query_heads, slots)
        return attention.mean(dim=0, keepdim=True).expand(inputs.spec.kv_heads, -1)

    def protected_recent_tokens(self, budget_tokens: int) -> int:
        return 1
