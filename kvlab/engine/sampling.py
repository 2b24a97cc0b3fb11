"""Next-token choice: greedy when temperature is 0, else temperature with optional top-k / top-p, seeded."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvlab.errors import ParameterError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or not math.isfinite(self.top_p):
            raise ParameterError(f"temperature and top_p must be finite numbers (got {self.temperature}, "
                                 f"{self.top_p})")
        if self.temperature < 0:
            raise ParameterError(f"temperature must be >= 0 (got {self.temperature}); 0 means greedy")
        if not 0 < self.top_p <= 1:
            raise ParameterError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise ParameterError(f"top_k must be >= 0 (got {self.top_k}); 0 disables it")


class Sampler:
    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self.generator = torch.Generator().manual_seed(config.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """Pick a token id from fp32 logits of shape (vocab,)."""
        config = self.config
        if config.temperature == 0:
            return int(logits.argmax())
        logits = logits.float().cpu() / config.temperature
        if config.top_k:
            threshold = logits.topk(min(config.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        probabilities = logits.softmax(dim=-1)
        if config.top_p < 1:
            sorted_probabilities, order = probabilities.sort(descending=True)
            outside = sorted_probabilities.cumsum(0) - sorted_probabilities > config.top_p
            sorted_probabilities[outside] = 0
            probabilities = torch.zeros_like(probabilities).scatter(0, order, sorted_probabilities)
        return int(torch.multinomial(probabilities, 1, generator=self.generator))
