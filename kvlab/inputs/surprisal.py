"""Self-information of tokens under the model itself: ``I(x_i) = -log p(x_i | x_<i)`` in nats.

The model runs over kvlab's own cache in chunks, with the logits of every position of a chunk kept only while that
chunk's log-probabilities are gathered (at most ``SCORING_CHUNK_TOKENS`` x vocabulary floats at a time).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from kvlab.cache.kvcache import KVCache
from kvlab.engine.prefill import empty_cache
from kvlab.engine.runner import ModelRunner

if TYPE_CHECKING:
    from kvlab.engine import Engine

SCORING_CHUNK_TOKENS = 512
REMEMBERED_DOCUMENTS = 4
_REMEMBERED: dict[tuple, tuple[weakref.ref, torch.Tensor, float]] = {}


class Charge:
    """Seconds of remembered scoring passes reused inside a ``charging()`` block."""

    def __init__(self) -> None:
        self.reused_s = 0.0


_CHARGES: list[Charge] = []


@contextlib.contextmanager
def charging() -> Iterator[Charge]:
    """Within the block, reusing a remembered pass adds the seconds it took to compute to the yielded Charge: a
    method's reported time is its full cost, whichever bench cell happened to compute the pass first."""
    charge = Charge()
    _CHARGES.append(charge)
    try:
        yield charge
    finally:
        _CHARGES.remove(charge)


def feed_scored(runner: ModelRunner, ids: torch.Tensor, previous_log_probs: torch.Tensor | None,
                chunk_tokens: int = SCORING_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Append ``ids`` (tokens,) to the runner's cache; return (self-information of each token (tokens,) fp32 on
    the CPU, log-probabilities after the last token (vocab,)). ``previous_log_probs`` predicts the first token;
    without it (an empty cache) the first token's value is NaN."""
    count = int(ids.numel())
    info = torch.full((count,), float("nan"))
    last = previous_log_probs
    for start in range(0, count, chunk_tokens):
        chunk = ids[start:start + chunk_tokens]
        logits = runner.feed(chunk, logits_to_keep=int(chunk.numel()))
        assert logits is not None  # logits_to_keep >= 1
        log_probs = torch.log_softmax(logits, dim=-1)
        targets = chunk.to(log_probs.device)
        if last is not None:
            info[start] = -last[targets[0]].cpu()
        if chunk.numel() > 1:
            info[start + 1:start + int(chunk.numel())] = -log_probs[:-1].gather(1, targets[1:, None])[:, 0].cpu()
        last = log_probs[-1]
    return info, last


def token_self_information(engine: Engine, ids: torch.Tensor,
                           chunk_tokens: int = SCORING_CHUNK_TOKENS) -> torch.Tensor:
    """(tokens,) nats for ``ids`` read from the start of a fresh context. The first token has nothing before it:
    it gets the mean of the others (so it is neither always kept nor always dropped).

    The last few documents' values are remembered (per model), so the cells of a bench grid that score the same
    document (every ratio of selective_context, llmlingua's sentence stage) run one pass between them; each reuse
    is charged that pass's seconds (``charging``), so every cell still reports what the method costs alone."""
    key = (id(engine.model), chunk_tokens, hashlib.sha256(ids.numpy().tobytes()).digest())
    if key in _REMEMBERED and _REMEMBERED[key][0]() is engine.model:  # the same model, not one reusing its id
        _, remembered, seconds = _REMEMBERED[key]
        for charge in _CHARGES:
            charge.reused_s += seconds
        return remembered.clone()
    started = time.perf_counter()
    runner = ModelRunner(engine.model, fresh_cache(engine))
    info, _ = feed_scored(runner, ids, None, chunk_tokens)
    if info.numel() > 1:
        info[0] = info[1:].mean()
    elif info.numel():
        info[0] = 0.0
    while len(_REMEMBERED) >= REMEMBERED_DOCUMENTS:
        _REMEMBERED.pop(next(iter(_REMEMBERED)))
    _REMEMBERED[key] = (weakref.ref(engine.model), info, time.perf_counter() - started)
    return info.clone()


def fresh_cache(engine: Engine) -> KVCache:
    return empty_cache(engine.model, engine.layout)
