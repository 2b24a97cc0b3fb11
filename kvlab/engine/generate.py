"""The decode loop: one token per forward pass on top of the (possibly compressed) cache."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvlab.engine.runner import ModelRunner
from kvlab.engine.sampling import Sampler


@dataclass
class Generation:
    token_ids: list[int]
    seconds: float
    stopped_by: str  # "stop_token" or "max_new_tokens"
    stop_token: int | None = None  # the stop token sampled, if any (not part of token_ids)


def decode(runner: ModelRunner, first_logits: torch.Tensor, *, max_new_tokens: int, sampler: Sampler,
           stop_token_ids: set[int]) -> Generation:
    """Generate up to ``max_new_tokens`` tokens; ``first_logits`` (vocab,) predicts the first one.

    The stop token ends generation and is not returned.
    """
    started = time.perf_counter()
    tokens: list[int] = []
    logits = first_logits
    stopped_by, stop_token = "max_new_tokens", None
    for step in range(max_new_tokens):
        token = sampler(logits)
        if token in stop_token_ids:
            stopped_by, stop_token = "stop_token", token
            break
        tokens.append(token)
        if step + 1 < max_new_tokens:
            logits = runner.feed(torch.tensor([token]))[-1]
    return Generation(tokens, time.perf_counter() - started, stopped_by, stop_token)
