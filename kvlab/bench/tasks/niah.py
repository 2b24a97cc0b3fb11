"""Needle-in-a-haystack retrieval, the eight NIAH variants of RULER (Hsieh et al., 2024, "RULER: What's the Real
Context Size of Your Long-Context Language Models?", arXiv:2404.06654).

A needle is one sentence "One special magic number for <key> is <value>." hidden in a haystack; the question
asks for the value(s) of one or more keys, and every required value must appear in the answer (all-of matching).
Variants differ in haystack (repeated noise sentences, essay-like prose, or nothing but other needles), in key and
value types (adjective-noun words, 7-digit numbers, UUIDs) and in how many needles, values and queries there are.

Deviations from RULER's generator: our own essay prose (or the user's files) instead of Paul Graham essays; needle
and question wording of our own; the target needle of single and multi-key variants goes at the requested depth
(RULER draws depths at random); the context is fitted to the model's tokens excluding question and template.
"""

from __future__ import annotations

import random
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from kvlab.bench.tasks.base import Draft, Request, register_task
from kvlab.bench.tasks.fillers import essay_units, noise_units, place
from kvlab.bench.tasks.fit import Units, fit_to_tokens
from kvlab.bench.tasks.words import join_names, key_words, numbers, uuids


@dataclass(frozen=True)
class NeedleSpec:
    haystack: str             # "noise" (repeated sentences), "essay" (prose) or "needles" (only distractor needles)
    key_kind: str = "words"   # "words" (adjective-noun) or "uuids"
    value_kind: str = "numbers"  # "numbers" (7 digits) or "uuids"
    keys: int = 1             # keys with needles in the document; the queried ones first, the rest distractors
    values_per_key: int = 1   # needles (distinct values) per key
    queries: int = 1          # keys asked about in the one question


def needle_sentence(kind: str, key: str, value: str) -> str:
    return f"One special magic {kind} for {key} is {value}."


def _draw_keys(rng: random.Random, kind: str, count: int, exclude: AbstractSet[str] = frozenset()) -> list[str]:
    return key_words(rng, count, exclude) if kind == "words" else uuids(rng, count)


def _draw_values(rng: random.Random, kind: str, count: int, exclude: AbstractSet[str] = frozenset()) -> list[str]:
    return numbers(rng, count, exclude=exclude) if kind == "numbers" else uuids(rng, count)


def _distractor_needles(rng: random.Random, spec: NeedleSpec, kind: str, taken_keys: set[str],
                        taken_values: set[str]):
    """Endless needle lines for the all-needle haystack, with keys and values distinct from the real ones."""
    while True:
        key = _draw_keys(rng, spec.key_kind, 1, taken_keys)[0]
        value = _draw_values(rng, spec.value_kind, 1, taken_values)[0]
        taken_keys.add(key)
        taken_values.add(value)
        yield "\n" + needle_sentence(kind, key, value)


def generate_niah(request: Request, spec: NeedleSpec, task: str) -> Draft:
    rng = request.rng("needles")
    kind = "number" if spec.value_kind == "numbers" else "uuid"
    keys = _draw_keys(rng, spec.key_kind, max(spec.keys, spec.queries))
    values: list[list[str]] = []
    for _ in keys:  # distinct across all needles, so each value answers exactly one key
        values.append(_draw_values(rng, spec.value_kind, spec.values_per_key, {v for vs in values for v in vs}))
    needles = [needle_sentence(kind, key, value) for key, key_values in zip(keys, values) for value in key_values]
    if spec.values_per_key == 1 and spec.queries == 1 and request.depth is not None:
        # the queried needle at the requested depth, distractor needles (multikey_1) anywhere
        inserts = [(request.depth, needles[0])] + [(rng.random(), needle) for needle in needles[1:]]
    else:
        inserts = [(rng.random(), needle) for needle in needles]
        inserts.sort(key=lambda insert: insert[0])

    filler_rng = request.rng("filler")
    if spec.haystack == "noise":
        source, separator = noise_units(), " "
    elif spec.haystack == "essay":
        source, separator = essay_units(f"{request.seed}/filler", request.haystack_dir), " "
    else:
        source = _distractor_needles(filler_rng, spec, kind, set(keys), {v for vs in values for v in vs})
        separator = "\n"
    units = Units(source, request.count_tokens)
    context = fit_to_tokens(lambda n: place(units.items[:n], inserts, separator), units, request.count_tokens,
                            request.length_tokens, task)

    asked = keys[:spec.queries]
    required = tuple(value for key_values in values[:spec.queries] for value in key_values)
    if len(required) == 1:
        question = (f"What is the special magic {kind} for {asked[0]} mentioned in the provided text? "
                    f"Answer with the {kind} only.")
        prefix = f"The special magic {kind} for {asked[0]} mentioned in the provided text is"
    elif spec.queries == 1:
        question = (f"What are all the special magic {kind}s for {asked[0]} mentioned in the provided text? "
                    f"Answer with the {kind}s only, separated by commas.")
        prefix = f"The special magic {kind}s for {asked[0]} mentioned in the provided text are"
    else:
        question = (f"What are the special magic {kind}s for {join_names(asked)} mentioned in the provided text? "
                    f"Answer with the {kind}s only, one for each, separated by commas.")
        prefix = f"The special magic {kind}s for {join_names(asked)} mentioned in the provided text are"
    return Draft(context, (question,), (required,), answer_prefix=prefix)


def _register(name: str, description: str, spec: NeedleSpec, max_new_tokens: int) -> None:
    def generate(request: Request) -> Draft:
        return generate_niah(request, spec, name)

    uses_depth = spec.values_per_key == 1 and spec.queries == 1
    register_task(name, description, metric="contains_all", max_new_tokens=max_new_tokens, uses_depth=uses_depth,
                  uses_haystack_dir=spec.haystack == "essay")(generate)


_register("niah_single_1", "one number needle in repeated noise sentences",
          NeedleSpec("noise"), max_new_tokens=24)
_register("niah_single_2", "one number needle in essay prose",
          NeedleSpec("essay"), max_new_tokens=24)
_register("niah_single_3", "one UUID needle in essay prose",
          NeedleSpec("essay", value_kind="uuids"), max_new_tokens=64)
_register("niah_multikey_1", "the asked needle among 3 distractor needles with other keys, in essay prose",
          NeedleSpec("essay", keys=4), max_new_tokens=24)
_register("niah_multikey_2", "the asked needle in a haystack made only of needles with other keys",
          NeedleSpec("needles"), max_new_tokens=24)
_register("niah_multikey_3", "the asked needle among needles only, UUID keys and UUID values",
          NeedleSpec("needles", key_kind="uuids", value_kind="uuids"), max_new_tokens=64)
_register("niah_multivalue", "one key with 4 needles of different values; all 4 values required",
          NeedleSpec("essay", values_per_key=4), max_new_tokens=64)
_register("niah_multiquery", "4 keys asked at once, one needle each; all 4 values required",
          NeedleSpec("essay", keys=4, queries=4), max_new_tokens=64)


@register_task("niah_multiturn", "SCBench-style shared context: 4 needles, one asked per turn (for --mode multi-turn "
               "or multi-request)", metric="contains_all", max_new_tokens=24, uses_haystack_dir=True)
def generate_niah_multiturn(request: Request) -> Draft:
    """The multiquery haystack, with its 4 keys asked one by one as follow-up questions."""
    spec = NeedleSpec("essay", keys=4, queries=4)
    together = generate_niah(request, spec, "niah_multiturn")
    keys = key_words(request.rng("needles"), spec.keys)  # the same draw generate_niah made first
    questions = tuple(f"What is the special magic number for {key} mentioned in the provided text? "
                      f"Answer with the number only." for key in keys)
    return Draft(together.context, questions, tuple((value,) for value in together.answers[0]),
                 answer_prefix="The special magic number mentioned in the provided text is")
