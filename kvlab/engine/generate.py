"""The decode loop, the one every front end uses (``Engine``, ``Conversation``, bench and server): one token per
forward pass on top of the (possibly compressed, possibly quantized) cache, with sampling, stop tokens, optional
stop strings with streamed text deltas, and a cancellation check between steps."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvlab.engine.runner import ModelRunner
from kvlab.engine.sampling import Sampler
from kvlab.engine.text import TextStream


@dataclass
class Generation:
    token_ids: list[int]
    seconds: float
    stopped_by: str  # "stop_token", "stop_string" or "max_new_tokens"
    stop_token: int | None = None  # the stop token sampled, if any (not part of token_ids)
    text: str | None = None  # the text up to any stop string, when a TextStream was given

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


def decode(runner: ModelRunner, first_logits: torch.Tensor, *, max_new_tokens: int, sampler: Sampler,
           stop_token_ids: set[int], text: TextStream | None = None,
           on_text: Callable[[str], None] | None = None,
           check: Callable[[], None] | None = None) -> Generation:
    """Generate up to ``max_new_tokens`` tokens; ``first_logits`` (vocab,) predicts the first one.

    A stop token ends generation and is not returned; so does a stop string of ``text`` (the text is cut before
    it). ``on_text`` receives each safe text delta as it is released; ``check`` runs before every forward pass
    and may raise to cancel. The last sampled token is never fed: the cache holds every answer token but it.
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
        if text is not None:
            text.push(token)
            if text.stopped:
                stopped_by = "stop_string"
                break
            _emit(text, on_text)
        if step + 1 == max_new_tokens:
            break
        if check is not None:
            check()
        step_logits = runner.feed(torch.tensor([token], dtype=torch.long))
        assert step_logits is not None  # feed returns logits unless logits_to_keep=0
        logits = step_logits[-1]
    if text is not None:
        text.finish()
        _emit(text, on_text, final=True)
    return Generation(tokens, time.perf_counter() - started, stopped_by, stop_token,
                      None if text is None else text.text)


def _emit(text: TextStream, on_text: Callable[[str], None] | None, final: bool = False) -> None:
    delta = text.take(final=final)
    if delta and on_text is not None:
        on_text(delta)
