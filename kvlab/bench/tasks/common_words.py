"""Common words extraction (``cwe``), one of RULER's aggregation tasks (Hsieh et al., 2024, arXiv:2404.06654).

The context is a numbered list of English words, one per line, in random order: 10 "common" words appear
``common_repeats`` times each, every other word ``uncommon_repeats`` times. The answer is the 10 common words (all
required). RULER uses 30 and 3 repeats from 4096 tokens up and 6 and 1 below; we do the same, with two changes so
every length works: on contexts too short for 60 common items the common repeats shrink (never below
``uncommon_repeats + 1``), and when the vocabulary (about 450 words) cannot fill a long context both repeats grow
by the same factor. Deviations: our own word list, where no word contains another (so substring scoring cannot
credit "arrow" for "row"), and no in-context example.
"""

from __future__ import annotations

import functools
import math
import random

from kvlab.bench.tasks.base import Draft, Request, register_task
from kvlab.bench.tasks.fit import Linear, fit_to_tokens
from kvlab.bench.tasks.words import ADJECTIVES, NOUNS, VERBS, distinct_words

COMMON_WORDS = 10


@functools.cache
def vocabulary() -> tuple[str, ...]:
    return tuple(distinct_words(ADJECTIVES + NOUNS + VERBS))


def numbered(words: list[str]) -> str:
    return "\n".join(f"{index}. {word}" for index, word in enumerate(words, start=1))


def repeats_for(length_tokens: int, estimated_items: float, vocabulary_size: int) -> tuple[int, int]:
    """(common_repeats, uncommon_repeats) for a list of about ``estimated_items`` items."""
    common, uncommon = (30, 3) if length_tokens >= 4096 else (6, 1)
    common = max(uncommon + 1, min(common, int(estimated_items * 0.5) // COMMON_WORDS))
    uncommon_words_needed = (estimated_items - COMMON_WORDS * common) / uncommon
    if uncommon_words_needed > vocabulary_size - COMMON_WORDS:
        factor = math.ceil(uncommon_words_needed / (vocabulary_size - COMMON_WORDS))
        common, uncommon = common * factor, uncommon * factor
    return common, uncommon


def generate_cwe(request: Request, task: str) -> Draft:
    words = list(vocabulary())
    request.rng("words").shuffle(words)
    common, others = words[:COMMON_WORDS], words[COMMON_WORDS:]
    item_tokens = request.count_tokens(numbered(words[:100])) / 100
    common_repeats, uncommon_repeats = repeats_for(request.length_tokens,
                                                   request.length_tokens / item_tokens, len(words))

    def build(n: int) -> str:
        items = common * common_repeats + others[:n] * uncommon_repeats
        random.Random(f"{request.seed}/order/{n}").shuffle(items)
        return numbered(items)

    scale = Linear(item_tokens * uncommon_repeats, limit=len(others))
    context = fit_to_tokens(build, scale, request.count_tokens, request.length_tokens, task)
    question = (f"Above is a numbered list of words in which some words appear more often than others. What are "
                f"the {COMMON_WORDS} most common words in the list? Answer with the {COMMON_WORDS} words only, "
                f"separated by commas.")
    prefix = f"The {COMMON_WORDS} words that appear most often in the list are:"
    return Draft(context, (question,), (tuple(common),), answer_prefix=prefix)


@register_task("cwe", "common words extraction: the 10 words repeated most often in a numbered word list",
               metric="contains_all", max_new_tokens=80)
def cwe(request: Request) -> Draft:
    return generate_cwe(request, "cwe")
