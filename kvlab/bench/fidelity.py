"""Fidelity of a compressed cache against the full cache on the same prompt.

The full cache's greedy answer is the reference. Each compressed cache is teacher-forced along that same answer,
and at every answer position we compare its next-token distribution with the full cache's:
KL(full || compressed), averaged over positions (nats/token). Zero means the compressed cache predicts the
reference answer exactly as the full cache does; the greedy-match flag says whether it also generates it.
"""

from __future__ import annotations

import torch

from kvlab.cache.kvcache import KVCache
from kvlab.engine.runner import ModelRunner


def teacher_forced_log_probs(model, cache: KVCache, first_logits: torch.Tensor,
                             reference_ids: list[int]) -> torch.Tensor:
    """(len(reference_ids), vocab) log-probabilities predicting each reference token in turn.

    ``cache`` holds the prompt; ``first_logits`` (vocab,) predict the first answer token. The cache is forked, so
    the caller can still decode on it.
    """
    steps = [first_logits.float()[None]]
    if len(reference_ids) > 1:
        runner = ModelRunner(model, cache.fork())
        logits = runner.feed(torch.tensor(reference_ids[:-1]), logits_to_keep=len(reference_ids) - 1)
        assert logits is not None  # logits_to_keep >= 1 here
        steps.append(logits)
    return torch.cat(steps).log_softmax(dim=-1)


def mean_kl_divergence(reference_log_probs: torch.Tensor, log_probs: torch.Tensor) -> float:
    """Mean over positions of KL(reference || other) in nats; both (positions, vocab) log-probabilities."""
    if reference_log_probs.shape != log_probs.shape:
        raise ValueError(f"shapes differ: {tuple(reference_log_probs.shape)} vs {tuple(log_probs.shape)}")
    if reference_log_probs.shape[0] == 0:
        return 0.0
    per_position = (reference_log_probs.exp() * (reference_log_probs - log_probs)).sum(dim=-1)
    return float(per_position.clamp(min=0).mean())
