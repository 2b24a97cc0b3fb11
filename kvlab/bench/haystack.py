"""Offline haystack text: varied, natural-looking prose generated deterministically from a seed.

Each paragraph picks a topic (a town, a lab, a voyage, ...) and builds sentences from several shapes (statements,
reports, quotations, comparisons, questions) whose slots are filled from topic word lists, so the text neither
repeats one sentence nor drifts into word salad. Lengths are measured in the target model's own tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

TOPICS: dict[str, dict[str, list[str]]] = {
    "town": {
        "people": ["the mayor", "a retired teacher", "the baker on Mill Street", "two young farmers", "the librarian"],
        "things": ["the river bridge", "the Saturday market", "the old clock tower", "the new school roof",
                   "the apple harvest", "the village choir"],
        "places": ["the town square", "the valley road", "the harbour", "the hill above the church"],
        "verbs": ["repaired", "talked about", "argued over", "celebrated", "planned", "visited"],
        "adjectives": ["crowded", "quiet", "muddy", "bright", "busy", "windy"],
    },
    "science": {
        "people": ["the lab director", "a graduate student", "the visiting chemist", "two technicians",
                   "the night-shift engineer"],
        "things": ["the cooling pump", "the new microscope", "a batch of samples", "the telescope mirror",
                   "the pressure sensor", "the field notes"],
        "places": ["the basement lab", "the observatory", "the clean room", "the research station"],
        "verbs": ["calibrated", "measured", "replaced", "examined", "recorded", "tested"],
        "adjectives": ["delicate", "noisy", "precise", "cold", "cluttered", "unusual"],
    },
    "voyage": {
        "people": ["the captain", "the ship's cook", "a young deckhand", "the navigator", "two passengers"],
        "things": ["the mainsail", "the fresh water barrels", "the old charts", "the lifeboat", "the cargo of tea",
                   "the brass compass"],
        "places": ["the northern strait", "a calm bay", "the island harbour", "the open sea"],
        "verbs": ["checked", "mended", "lost sight of", "secured", "counted", "steered toward"],
        "adjectives": ["stormy", "grey", "calm", "salty", "foggy", "endless"],
    },
    "kitchen": {
        "people": ["the head chef", "a new apprentice", "the pastry cook", "the owner", "a food critic"],
        "things": ["the sourdough starter", "the winter menu", "a pot of lentil soup", "the copper pans",
                   "the spice order", "the lemon tart"],
        "places": ["the back kitchen", "the cold store", "the dining room", "the market stalls"],
        "verbs": ["tasted", "prepared", "rewrote", "burned", "praised", "ordered"],
        "adjectives": ["fragrant", "hectic", "warm", "cramped", "spotless", "lively"],
    },
    "garden": {
        "people": ["the gardener", "a neighbour", "the beekeeper", "the children", "an old botanist"],
        "things": ["the tomato vines", "the rose bushes", "the compost heap", "the beehives", "the pear tree",
                   "the herb bed"],
        "places": ["the walled garden", "the greenhouse", "the orchard", "the path by the pond"],
        "verbs": ["pruned", "watered", "moved", "admired", "protected", "harvested"],
        "adjectives": ["overgrown", "sunny", "damp", "fragrant", "tidy", "green"],
    },
    "railway": {
        "people": ["the station master", "a ticket inspector", "the driver", "a group of students", "the signalman"],
        "things": ["the morning train", "the signal box", "the timetable", "the freight wagons", "the platform clock",
                   "the level crossing"],
        "places": ["the junction", "the mountain tunnel", "the branch line", "the coastal route"],
        "verbs": ["delayed", "inspected", "repainted", "waited for", "announced", "cleared"],
        "adjectives": ["late", "crowded", "rusty", "punctual", "empty", "noisy"],
    },
}
TIMES = ["In the morning", "Later that week", "By the end of the month", "Early on Tuesday", "That autumn",
         "Before sunrise", "After the long winter", "On the first warm day", "During the holidays", "At noon"]
REASONS = ["because the weather had turned", "since nobody else had the time", "after a long discussion",
           "to everyone's surprise", "as the old records suggested", "while the others were away"]


def _sentence_shapes() -> list[Callable[[random.Random, dict], str]]:
    def statement(r, t):
        return f"{r.choice(TIMES)}, {r.choice(t['people'])} {r.choice(t['verbs'])} {r.choice(t['things'])}."

    def report(r, t):
        return (f"According to {r.choice(t['people'])}, {r.choice(t['things'])} near {r.choice(t['places'])} "
                f"was {r.choice(t['adjectives'])} {r.choice(REASONS)}.")

    def quotation(r, t):
        return (f"\"We {r.choice(t['verbs'])} {r.choice(t['things'])} twice,\" said {r.choice(t['people'])}, "
                f"\"and it was still {r.choice(t['adjectives'])}.\"")

    def comparison(r, t):
        first, second = r.sample(t["things"], 2)
        return f"Compared with {first}, {second} seemed far more {r.choice(t['adjectives'])} that year."

    def question(r, t):
        return (f"Who would have guessed that {r.choice(t['people'])} would end up at {r.choice(t['places'])} "
                f"{r.choice(REASONS)}?")

    def description(r, t):
        return (f"{r.choice(t['places']).capitalize()} was {r.choice(t['adjectives'])}, and "
                f"{r.choice(t['people'])} {r.choice(t['verbs'])} {r.choice(t['things'])} {r.choice(REASONS)}.")

    return [statement, report, quotation, comparison, question, description]


SHAPES = _sentence_shapes()


def paragraphs(seed: int | str):
    """Endless stream of paragraphs, each a list of sentences on one topic, deterministic for a seed."""
    rng = random.Random(seed)
    while True:
        topic = TOPICS[rng.choice(sorted(TOPICS))]
        yield [rng.choice(SHAPES)(rng, topic) for _ in range(rng.randint(3, 6))]


@dataclass(frozen=True)
class Haystack:
    text: str
    needle_char_offset: int | None  # where the needle starts in ``text`` (None when no needle)


def build_haystack(count_tokens: Callable[[str], int], target_tokens: int, *, seed: int = 0,
                   needle: str | None = None, depth: float = 0.5) -> Haystack:
    """Prose of about ``target_tokens`` tokens (as ``count_tokens`` measures), with ``needle`` inserted between
    paragraphs at relative ``depth`` (0 = start, 1 = end)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1] (got {depth})")
    budget = target_tokens - (count_tokens(needle) if needle else 0)
    chosen: list[str] = []
    used = 0
    for sentences in paragraphs(seed):
        paragraph = " ".join(sentences)
        cost = count_tokens(paragraph + "\n\n")
        if used + cost > budget:
            # the last paragraph is cut at a sentence boundary so short targets are not overshot
            while len(sentences) > 1 and used + cost > budget:
                sentences = sentences[:-1]
                paragraph = " ".join(sentences)
                cost = count_tokens(paragraph + "\n\n")
            if used + cost <= budget or not chosen:
                chosen.append(paragraph)
            break
        chosen.append(paragraph)
        used += cost
    if needle is None:
        return Haystack("\n\n".join(chosen), None)
    split = round(depth * len(chosen))
    before = "\n\n".join(chosen[:split])
    text = "\n\n".join(part for part in (before, needle, "\n\n".join(chosen[split:])) if part)
    return Haystack(text, len(before) + 2 if before else 0)
