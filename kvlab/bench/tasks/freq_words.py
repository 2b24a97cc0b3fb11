"""Frequent words extraction (``fwe``), one of RULER's aggregation tasks (Hsieh et al., 2024, arXiv:2404.06654).

The context is a shuffled stream of made-up 6-letter "coded words" whose counts follow a Zipf law: the word of
rank k appears about ``total * k**-alpha / H`` times (alpha = 2, as RULER). Rank 0 is the filler "..." that the
question says to ignore, so the answer is the words of ranks 1-3 (all required). The vocabulary has
``length_tokens // 50`` words, as RULER. Deviations: ``H`` is the sum over the finite vocabulary rather than the
Riemann zeta function, and on very short contexts the top three counts are nudged so that they stay strictly
above every other count (otherwise rounding can tie ranks 3 and 4 and the answer is ambiguous).
"""

from __future__ import annotations

import random

from kvlab.bench.tasks.base import Draft, Request, register_task
from kvlab.bench.tasks.fit import Linear, fit_to_tokens
from kvlab.bench.tasks.words import coded_words

ALPHA = 2.0
NOISE_WORD = "..."
ANSWER_WORDS = 3


def zipf_counts(total_words: int, vocabulary_size: int, alpha: float = ALPHA) -> list[int]:
    """Counts per rank (0 = most frequent) summing to about ``total_words``; ranks 1-3 strictly above the rest."""
    weights = [rank ** -alpha for rank in range(1, vocabulary_size + 1)]
    norm = sum(weights)
    counts = [int(total_words * weight / norm) for weight in weights]
    for rank in range(ANSWER_WORDS, 0, -1):
        counts[rank] = max(counts[rank], counts[rank + 1] + 1)
    return counts


def generate_fwe(request: Request, task: str) -> Draft:
    rng = request.rng("vocabulary")
    vocabulary = [NOISE_WORD] + coded_words(rng, max(8, request.length_tokens // 50))

    def build(total_words: int) -> str:
        if total_words == 0:
            return ""
        counts = zipf_counts(total_words, len(vocabulary))
        stream = [word for word, count in zip(vocabulary, counts) for _ in range(count)]
        random.Random(f"{request.seed}/order/{total_words}").shuffle(stream)
        return " ".join(stream)

    probe_words = 400
    scale = Linear(request.count_tokens(build(probe_words)) / probe_words)
    context = fit_to_tokens(build, scale, request.count_tokens, request.length_tokens, task)
    question = (f"Above is a text of made-up coded words. Ignoring the dots \"{NOISE_WORD}\", what are the "
                f"{ANSWER_WORDS} most frequently appearing coded words? Answer with the {ANSWER_WORDS} words only, "
                f"separated by commas.")
    prefix = f"According to the coded text above, the {ANSWER_WORDS} most frequently appearing words are:"
    return Draft(context, (question,), (tuple(vocabulary[1:ANSWER_WORDS + 1]),), answer_prefix=prefix)


@register_task("fwe", "frequent words extraction: the 3 most frequent coded words in a Zipf-distributed stream",
               metric="contains_all", max_new_tokens=32)
def fwe(request: Request) -> Draft:
    return generate_fwe(request, "fwe")
