"""Filler text for haystacks, as streams of units that carry their own leading separator (see ``fit.Units``), and
the helper that places inserts (needles, gold documents) at relative depths among the units."""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from kvlab.bench.haystack import paragraphs
from kvlab.errors import DataError

# The "noise" haystack of niah_single_1 and vt: a few plain sentences repeated, so the needle is the only thing in
# the document that carries information (RULER's "repeat" haystack, in our own words).
NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "The river flows on.",
                   "Here we go again.")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def noise_units() -> Iterator[str]:
    """Endless noise: the five sentences in order, one line per round."""
    for round_index in itertools.count():
        for position, sentence in enumerate(NOISE_SENTENCES):
            yield ("\n" if position == 0 and round_index else " ") + sentence


def essay_units(seed: int | str, haystack_dir: str | None = None) -> Iterator[str]:
    """Endless essay-like prose, sentence by sentence: generated from ``seed``, or the user's ``*.txt`` files in
    ``haystack_dir`` (concatenated in sorted file order, restarted from the top when a long context needs more)."""
    if haystack_dir is not None:
        source = itertools.cycle(read_haystack_dir(haystack_dir))
    else:
        source = paragraphs(seed)  # random.Random seeds from a string deterministically (via SHA-512)
    for index, sentences in enumerate(source):
        for position, sentence in enumerate(sentences):
            yield ("\n\n" if position == 0 and index else " ") + sentence


def read_haystack_dir(haystack_dir: str) -> tuple[tuple[str, ...], ...]:
    """Paragraphs (split at blank lines) of sentences (split after . ! ?) from ``haystack_dir/*.txt``."""
    folder = Path(haystack_dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"haystack folder {haystack_dir!r} does not exist; pass --haystack-dir a folder of .txt "
                        f"files, or leave it out to use generated prose")
    files = sorted(folder.glob("*.txt"))
    # read once per make_samples run, not once per sample; the stamp re-reads files that changed
    found = _read_paragraphs(tuple(files), tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in files))
    if not found:
        raise DataError(f"haystack folder {haystack_dir!r} has no text in *.txt files; add at least one non-empty "
                        f".txt file, or leave --haystack-dir out to use generated prose")
    return found


@functools.lru_cache(maxsize=4)
def _read_paragraphs(files: tuple[Path, ...], stamp: tuple) -> tuple[tuple[str, ...], ...]:
    found: list[tuple[str, ...]] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); "
                            f"save it as UTF-8 or move it out of the haystack folder") from None
        for block in re.split(r"\n\s*\n", text):
            flat = " ".join(block.split())
            if flat:
                found.append(tuple(_SENTENCE_END.split(flat)))
    return tuple(found)


def place(units: Sequence[str], inserts: Sequence[tuple[float, str]], separator: str = " ") -> str:
    """The units with each ``(depth, text)`` insert placed after ``round(depth * len(units))`` of them (inserts at
    the same place keep their given order). Units start with their own separator; inserts get ``separator``; the
    result is stripped of outer whitespace."""
    slots: dict[int, list[str]] = {}
    for depth, text in inserts:
        slots.setdefault(round(depth * len(units)), []).append(separator + text)
    pieces: list[str] = []
    for index in range(len(units) + 1):
        pieces.extend(slots.get(index, ()))
        if index < len(units):
            pieces.append(units[index])
    return "".join(pieces).strip()

