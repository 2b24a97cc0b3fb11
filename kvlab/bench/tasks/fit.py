"""Fit a generated context to a token budget, measured in the target model's own tokens.

A task describes its context as ``build(n) -> str``: the fixed content (needles, gold documents, ...) plus ``n``
filler units. The fitter first guesses ``n`` from per-unit costs counted once each and summed (exact for a
byte-level tokenizer, within a token or two per unit for BPE, where merges across unit boundaries differ), then
tokenizes whole candidates a handful of times to correct the guess: never the document-growing loop that
re-tokenizes everything after each added unit.

Result: the candidate whose token count is closest to the target, at most ``MAX_OVERSHOOT`` (2%) above it and,
below it, normally at most one filler unit short. Units are sentences (5-30 tokens), word-list items or needle
lines, so a 512-token context lands within about 2.5% of its target and longer ones closer; the coarsest unit is
niah_multikey_3's line of two UUIDs (~80 SmolLM2 tokens, up to 11% of a 512-token target).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from kvlab.errors import ParameterError

MAX_OVERSHOOT = 0.02  # a context may exceed its target by at most this fraction (closest-to-target wins)
MAX_ROUNDS = 12       # whole-context tokenizations per fit, at most (typically 2-4)


class Units:
    """A lazily extended list of filler units with the running sum of their token costs.

    Each unit carries its own leading separator (" " or "\\n\\n" before a sentence), so its cost as counted alone
    matches how it tokenizes inside the document. Equal units are counted once (a repeated noise sentence costs
    one tokenization in all).
    """

    def __init__(self, source: Iterator[str], count_tokens: Callable[[str], int]) -> None:
        self._source = source
        self._count_tokens = count_tokens
        self._cost_of: dict[str, int] = {}
        self.items: list[str] = []
        self._cumulative = [0]  # _cumulative[n] = estimated tokens of the first n units

    def _extend(self) -> bool:
        item = next(self._source, None)
        if item is None:
            return False
        if item not in self._cost_of:
            self._cost_of[item] = self._count_tokens(item)
        self.items.append(item)
        self._cumulative.append(self._cumulative[-1] + self._cost_of[item])
        return True

    def available(self, n: int) -> bool:
        while len(self.items) < n:
            if not self._extend():
                return False
        return True

    def estimate(self, n: int) -> float:
        return self._cumulative[n] if self.available(n) else math.inf

    def most_within(self, budget_tokens: float) -> int:
        """The largest n whose estimated cost fits ``budget_tokens``."""
        while self._cumulative[-1] <= budget_tokens and self._extend():
            pass
        n = len(self._cumulative) - 1
        while n > 0 and self._cumulative[n] > budget_tokens:
            n -= 1
        return n


class Linear:
    """Estimated cost ``n * tokens_per_unit`` for fillers that are counts rather than lists (word totals), with
    at most ``limit`` units when the filler is finite."""

    def __init__(self, tokens_per_unit: float, limit: int | None = None) -> None:
        self.tokens_per_unit = max(tokens_per_unit, 1e-6)
        self.limit = limit

    def available(self, n: int) -> bool:
        return self.limit is None or n <= self.limit

    def estimate(self, n: int) -> float:
        return n * self.tokens_per_unit

    def most_within(self, budget_tokens: float) -> int:
        n = max(0, math.floor(budget_tokens / self.tokens_per_unit))
        return n if self.limit is None else min(n, self.limit)


def fit_to_tokens(build: Callable[[int], str], scale: Units | Linear, count_tokens: Callable[[str], int],
                  target_tokens: int, task: str) -> str:
    """The ``build(n)`` whose token count is closest to ``target_tokens`` (at most ``MAX_OVERSHOOT`` above it)."""
    measured: dict[int, tuple[int, str]] = {}

    def tokens_at(n: int) -> int:
        if n not in measured:
            text = build(n)
            measured[n] = (count_tokens(text), text)
        return measured[n][0]

    fixed_tokens = tokens_at(0)
    if fixed_tokens > target_tokens:
        raise ParameterError(f"length {target_tokens} tokens is too short for task {task!r}: its required content "
                             f"alone takes {fixed_tokens} tokens; ask for at least {2 * fixed_tokens}")
    low, high = 0, None  # invariant: tokens_at(low) <= target < tokens_at(high)
    n = scale.most_within(target_tokens - fixed_tokens)
    for _ in range(MAX_ROUNDS):
        if tokens_at(n) <= target_tokens:
            low = max(low, n)
        else:
            high = n if high is None else min(high, n)
        if high is not None and high - low <= 1:
            break
        # rescale the estimate by what the whole-context count showed, and stay inside the bracket
        ratio = (tokens_at(n) - fixed_tokens) / scale.estimate(n) if n else 1.0
        guess = scale.most_within((target_tokens - fixed_tokens) / min(max(ratio, 0.25), 4.0))
        guess = max(guess, low + 1)
        if high is not None:
            guess = min(guess, high - 1)
        if guess in measured or not scale.available(guess):
            break  # filler exhausted, or nothing new to learn
        n = guess
    candidates = [low] + ([high] if high is not None and high - low == 1 else [])
    allowed = [c for c in candidates if tokens_at(c) <= target_tokens * (1 + MAX_OVERSHOOT)]
    best = min(allowed, key=lambda c: abs(tokens_at(c) - target_tokens))
    return measured[best][1]
