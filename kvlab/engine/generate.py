"""The decode loop, the one every front end uses (``Engine``, ``Conversation``, bench and server): one token per
forward pass on top of the (possibly compressed, possibly quantized) cache, with sampling, stop tokens, optional
stop strings with streamed text deltas, a cancellation check between steps, and an interruption that keeps what
was generated so far."""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import torch

from kvlab.engine.runner import ModelRunner, feed_rows
from kvlab.engine.sampling import Sampler
from kvlab.engine.text import TextStream


@dataclass
class Generation:
    token_ids: list[int]
    seconds: float
    stopped_by: str  # "stop_token", "stop_string", "max_new_tokens" or "interrupted"
    stop_token: int | None = None  # the stop token sampled, if any (not part of token_ids)
    text: str | None = None  # the text up to any stop string, when a TextStream was given

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


class _Decoding:
    """One sequence's side of the loop: sampling, stop tokens, stop strings and text deltas."""

    def __init__(self, max_new_tokens: int, sampler: Sampler, stop_token_ids: AbstractSet[int],
                 text: TextStream | None, on_text: Callable[[str], None] | None) -> None:
        self.max_new_tokens, self.sampler, self.stop_token_ids = max_new_tokens, sampler, stop_token_ids
        self.text, self.on_text = text, on_text
        self.tokens: list[int] = []
        self.stopped_by: str = "max_new_tokens"
        self.stop_token: int | None = None
        self.done = max_new_tokens < 1
        self.seconds = 0.0

    def take(self, logits: torch.Tensor) -> int | None:
        """Sample from ``logits``; return the token to feed next, or None once this sequence has ended (the last
        sampled token is never fed: the cache holds every answer token but it)."""
        token = self.sampler(logits)
        if token in self.stop_token_ids:
            self.stopped_by, self.stop_token, self.done = "stop_token", token, True
            return None
        self.tokens.append(token)
        if self.text is not None:
            self.text.push(token)
            if self.text.stopped:
                self.stopped_by, self.done = "stop_string", True
                return None
            _emit(self.text, self.on_text)
        if len(self.tokens) == self.max_new_tokens:
            self.done = True
            return None
        return token

    def result(self) -> Generation:
        if self.text is not None:
            self.text.finish()
            _emit(self.text, self.on_text, final=True)
        return Generation(self.tokens, self.seconds, self.stopped_by, self.stop_token,
                          None if self.text is None else self.text.text)


def decode(runner: ModelRunner, first_logits: torch.Tensor, *, max_new_tokens: int, sampler: Sampler,
           stop_token_ids: AbstractSet[int], text: TextStream | None = None,
           on_text: Callable[[str], None] | None = None,
           check: Callable[[], None] | None = None,
           interrupted: Callable[[], bool] | None = None) -> Generation:
    """Generate up to ``max_new_tokens`` tokens; ``first_logits`` (vocab,) predicts the first one.

    A stop token ends generation and is not returned; so does a stop string of ``text`` (the text is cut before
    it). ``on_text`` receives each safe text delta as it is released; ``check`` runs before every forward pass
    and may raise to cancel. ``interrupted`` is asked after every sampled token: True ends generation there,
    keeping the tokens so far (``stopped_by="interrupted"``, as a cut at ``max_new_tokens`` would). The last
    sampled token is never fed: the cache holds every answer token but it.
    """
    started = time.perf_counter()
    state = _Decoding(max_new_tokens, sampler, stop_token_ids, text, on_text)
    logits = first_logits
    while not state.done:
        token = state.take(logits)
        if token is None:
            break
        if interrupted is not None and interrupted():
            state.stopped_by = "interrupted"
            break
        if check is not None:
            check()
        logits = runner.step(token)
    state.seconds = time.perf_counter() - started
    return state.result()


def decode_rows(runners: list[ModelRunner], first_logits: list[torch.Tensor], *, max_new_tokens: list[int],
                samplers: list[Sampler], stop_token_ids: AbstractSet[int]) -> list[Generation]:
    """``decode`` for several independent sequences at once (a bench grid's cells on one prompt): the same
    per-sequence rule, with each step's forward pass shared by the sequences still running
    (``runner.feed_rows``). A row's ``seconds`` is the shared loop's wall time until that row ended."""
    started = time.perf_counter()
    states = [_Decoding(limit, sampler, stop_token_ids, None, None) for limit, sampler in zip(max_new_tokens, samplers)]
    logits = list(first_logits)
    active = list(range(len(states)))
    while active:
        feeding = []
        for row in active:
            token = states[row].take(logits[row])
            if token is None:
                states[row].seconds = time.perf_counter() - started
            else:
                feeding.append((row, token))
        active = [row for row, _ in feeding]
        if feeding:
            for (row, _), row_logits in zip(feeding, feed_rows([runners[row] for row in active],
                                                               [token for _, token in feeding])):
                logits[row] = row_logits
    return [state.result() for state in states]


def _emit(text: TextStream, on_text: Callable[[str], None] | None, final: bool = False) -> None:
    delta = text.take(final=final)
    if delta and on_text is not None:
        on_text(delta)
