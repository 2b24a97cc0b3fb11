"""The input-method contract: reduce the context *text* to a token budget before the model ever sees it.

A KV policy prefills the whole document and evicts cache entries; an input method (retrieval, prompt compression)
drops text instead, and the shortened context is prefilled with the full cache. Both are given the same budget: a
ratio evicts that fraction of the document's tokens (``ratio 0.75`` keeps 25%), counted in the model's own tokens.

A method is a frozen dataclass whose fields are its parameters (declared with ``policies.base.param``, so ranges
are checked the same way). It only says how to score; the shared mechanics live here once:

- ``Document``: the context tokenized once, with every token's character span, cut into units (chunks of N tokens,
  sentences, phrases, single tokens) that partition the text exactly, so joining kept units gives real text;
- ``keep_best``: the best-scored units that fit the budget, joined in document order; the joined text is counted
  again with the tokenizer and trimmed (lowest score first) until it fits, since tokens can merge at the seams.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvlab.engine import resolve_budget
from kvlab.errors import ParameterError
from kvlab.policies.base import validate_param

if TYPE_CHECKING:
    from kvlab.engine import Engine

SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")  # a sentence ends at . ! ? before whitespace, or at a line break
PHRASE_END = re.compile(r"(?<=[.!?,;:])\s+|\n+")  # a phrase also ends at , ; :


@dataclass(frozen=True)
class Unit:
    """Tokens ``[start, end)`` of a ``Document`` (token indices)."""

    start: int
    end: int

    @property
    def tokens(self) -> int:
        return self.end - self.start


class Document:
    """The context tokenized once (no special tokens). Token ``i`` owns the text from its first character up to the
    next token's first character, so any set of units maps back to text without gaps or overlaps."""

    def __init__(self, tokenizer, text: str) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ParameterError("input methods need a fast (Rust) tokenizer to map tokens back to text; load the "
                                 "model with its tokenizer.json")
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        self.text = text
        self.tokenizer = tokenizer
        self.ids = torch.tensor(encoded["input_ids"], dtype=torch.long)
        # a token's text starts at its offset, never before an earlier token's (byte-level pieces of one character
        # share a span: the last piece gets the character); the first token owns any text before it
        starts = list(itertools.accumulate((start for start, _ in encoded["offset_mapping"]), max))
        self.char_starts = [0] + starts[1:]

    @property
    def tokens(self) -> int:
        return int(self.ids.numel())

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text_of(self, units: Sequence[Unit]) -> str:
        """The text of ``units`` in document order."""
        return "".join(self._span(unit) for unit in sorted(units, key=lambda unit: unit.start))

    def _span(self, unit: Unit) -> str:
        end = self.char_starts[unit.end] if unit.end < self.tokens else len(self.text)
        return self.text[self.char_starts[unit.start]:end]

    def chunks(self, chunk_tokens: int) -> list[Unit]:
        """Consecutive chunks of ``chunk_tokens`` tokens (the last may be shorter)."""
        return [Unit(start, min(start + chunk_tokens, self.tokens)) for start in range(0, self.tokens, chunk_tokens)]

    def word_starts(self, positions: Sequence[int]) -> list[int]:
        """Indices into ``positions`` (token indices, ascending) where a new word starts: the first, and every token
        whose text starts with whitespace. Digits, word pieces and trailing punctuation stay with their word."""
        return [index for index, token in enumerate(positions)
                if index == 0 or self.text[self.char_starts[token]:self.char_starts[token] + 1].isspace()]

    def single_tokens(self) -> list[Unit]:
        return [Unit(index, index + 1) for index in range(self.tokens)]

    def split(self, unit: str) -> list[Unit]:
        """Sentences (``unit="sentence"``) or phrases (``"phrase"``): cut where the pattern matches, at the first
        token starting at or after the end of the match (whitespace stays with the unit before it)."""
        pattern = {"sentence": SENTENCE_END, "phrase": PHRASE_END}[unit]
        cuts = sorted({bisect.bisect_left(self.char_starts, match.end()) for match in pattern.finditer(self.text)})
        bounds = [0] + [cut for cut in cuts if 0 < cut < self.tokens] + [self.tokens]
        return [Unit(start, end) for start, end in zip(bounds, bounds[1:]) if end > start]


def keep_best(document: Document, units: Sequence[Unit], scores: Sequence[float], budget_tokens: int) -> str:
    """The text of the best-scored units that fit ``budget_tokens``, in document order.

    Units are taken best first; one that does not fit the tokens left is skipped and smaller ones may still fill
    the gap; tokens still left then go to the start of the best skipped unit (so a budget below one unit still
    keeps the best one's beginning). Ties keep the earlier unit. The joined text is counted again with the
    tokenizer and, while it is over the budget, the worst kept unit is dropped."""
    order = sorted(range(len(units)), key=lambda index: (-scores[index], units[index].start))
    kept: list[Unit] = []
    skipped: list[Unit] = []
    used = 0
    for index in order:
        if used + units[index].tokens <= budget_tokens:
            kept.append(units[index])
            used += units[index].tokens
        else:
            skipped.append(units[index])
    if skipped and used < budget_tokens:
        kept.append(Unit(skipped[0].start, skipped[0].start + budget_tokens - used))
    while True:
        text = document.text_of(kept)
        if document.count_tokens(text) <= budget_tokens or not kept:
            return text
        kept.pop()  # ``kept`` is in score order (the partial unit last): the last is the worst


@dataclass(frozen=True)
class Reduction:
    """A shortened context: its text, the budget it was held to and what it cost. Tokens are the model's tokens of
    the context text alone (no template); seconds are wall-clock, scoring passes through the model included."""

    text: str
    budget_tokens: int
    original_tokens: int
    reduced_tokens: int
    seconds: float


@dataclass(frozen=True)
class InputMethod:
    """Base class; subclasses are registered with ``@register_input_method(name)`` and set ``paper``, ``rule`` and
    ``query_aware`` (whether ``select`` reads the question)."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    rule: ClassVar[str] = ""
    query_aware: ClassVar[bool] = False
    family: ClassVar[str] = "input"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            validate_param(self.name, field, getattr(self, field.name))

    def select(self, engine: Engine, document: Document, question: str, budget_tokens: int) -> str:
        """The kept text: at most ``budget_tokens`` tokens of ``document``, in document order."""
        raise NotImplementedError

    def reduce(self, engine: Engine, context: str, question: str, *, ratio: float | None = None,
               budget_tokens: int | None = None) -> Reduction:
        """Shorten ``context`` to the budget given by ``ratio`` (fraction of its tokens dropped) or
        ``budget_tokens``; a context already within the budget is returned unchanged."""
        from kvlab.inputs.surprisal import charging

        started = time.perf_counter()
        document = Document(engine.tokenizer, context)
        budget = resolve_budget(ratio, budget_tokens, max(1, document.tokens))
        with charging() as charge:  # a scoring pass reused from another cell still counts in this one's time
            text = context if budget >= document.tokens else self.select(engine, document, question, budget)
        return Reduction(text=text, budget_tokens=budget, original_tokens=document.tokens,
                         reduced_tokens=document.count_tokens(text),
                         seconds=time.perf_counter() - started + charge.reused_s)

    def params(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def describe(self) -> str:
        settings = ", ".join(f"{key}={value}" for key, value in self.params().items())
        return f"{self.name}({settings})"
