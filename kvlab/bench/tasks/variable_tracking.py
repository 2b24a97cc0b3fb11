"""Variable tracking (``vt``), RULER's multi-hop tracing task (Hsieh et al., 2024, arXiv:2404.06654).

A chain "VAR ABCDE = 52817." → "VAR FGHIJ = VAR ABCDE." → ... (4 hops, 5 variables) is spread in reading order over
the repeated noise haystack; the question gives the number and asks for every variable that ends up holding it.
All 5 names are required (all-of matching). RULER's default is one chain; ``chains`` > 1 adds distractor chains with
other values. Deviation: no in-context example is prepended (RULER adds a short solved example).
"""

from __future__ import annotations

import random
import string

from kvlab.bench.tasks.base import Draft, Request, register_task
from kvlab.bench.tasks.fillers import noise_units, place
from kvlab.bench.tasks.fit import Units, fit_to_tokens

NAME_LETTERS = 5


def variable_names(rng: random.Random, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=NAME_LETTERS))
        if name not in names:
            names.append(name)
    return names


def chain_statements(names: list[str], value: str) -> list[str]:
    """The first name gets the number; each next name copies the one before it."""
    return [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]


def generate_vt(request: Request, task: str, chains: int = 1, hops: int = 4) -> Draft:
    rng = request.rng("chains")
    names = variable_names(rng, chains * (hops + 1))
    values: list[str] = []
    while len(values) < chains:
        value = str(rng.randint(10000, 99999))
        if value not in values:
            values.append(value)
    inserts: list[tuple[float, str]] = []
    for index, value in enumerate(values):
        statements = chain_statements(names[index * (hops + 1):(index + 1) * (hops + 1)], value)
        depths = sorted(rng.random() for _ in statements)  # in reading order, so the chain resolves forwards
        inserts.extend(zip(depths, statements))
    inserts.sort(key=lambda insert: insert[0])

    units = Units(noise_units(), request.count_tokens)
    context = fit_to_tokens(lambda n: place(units.items[:n], inserts), units, request.count_tokens,
                            request.length_tokens, task)
    question = (f"The text above assigns values to variables in statements of the form \"VAR NAME = ...\". "
                f"Find all variables that are assigned the value {values[0]}, directly or through other variables. "
                f"Answer with the {hops + 1} variable names only, separated by commas.")
    prefix = (f"According to the chain of variable assignments in the text above, {hops + 1} variables are "
              f"assigned the value {values[0]}; they are:")
    return Draft(context, (question,), (tuple(names[:hops + 1]),), answer_prefix=prefix)


@register_task("vt", "variable tracking: list the 5 variables a 4-hop assignment chain gives one number",
               metric="contains_all", max_new_tokens=40)
def vt(request: Request) -> Draft:
    return generate_vt(request, "vt")
