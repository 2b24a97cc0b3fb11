"""streaming_llm — Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks" (arXiv:2309.17453).

Rule: keep the first ``sink_tokens`` tokens (attention sinks) and the most recent tokens; evict the middle.
Deviation: the paper rolls the window while decoding; here the rule is applied once to the prefilled context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.policies import register_policy
from kvlab.policies.base import Policy, ScoreInputs, param


@register_policy("streaming_llm")
@dataclass(frozen=True)
class StreamingLLM(Policy):
    paper = "Xiao et al., 2023 — Efficient Streaming Language Models with Attention Sinks (arXiv:2309.17453)"
    rule = "keep sink tokens + the most recent window"

    sink_tokens: int = param(4, "first tokens always kept (attention sinks)", unit="tokens", minimum=0)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return inputs.positions.float()  # later is better; sinks are protected by the core

    def protected_sink_tokens(self) -> int:
        return self.sink_tokens
