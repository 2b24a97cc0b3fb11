"""The task contract: what a generator receives (``Request``), what it returns (``Draft``), what the runner gets
(``Sample``), and the registry a generator joins with ``@register_task``."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from kvlab.errors import UnknownTaskError
from kvlab.registry import Registry

CountTokens = Callable[[str], int]


@dataclass(frozen=True)
class Sample:
    id: str                      # unique and stable, e.g. "niah_single_1/len1024/s0/i3"
    task: str                    # task name, or the file stem for --data rows
    context: str                 # the long document
    questions: tuple[str, ...]   # one or more questions (follow-ups asked in order)
    answers: tuple[tuple[str, ...], ...]  # accepted/required strings, one tuple per question
    metric: str                  # "contains_all" | "contains_any" | "exact"
    length_tokens: int           # requested context length in tokens (0 for custom data)
    depth: float | None = None   # relative needle depth 0..1 for needle tasks (None otherwise)
    max_new_tokens: int = 32     # generation budget that fits the expected answer
    answer_prefix: str = ""      # starts the model's turn (RULER's answer prefix), so small models answer plainly


@dataclass(frozen=True)
class Request:
    """What one sample is built from. ``length_tokens`` counts the context only (no question, no template)."""

    count_tokens: CountTokens
    length_tokens: int
    seed: str                    # per-sample seed string; ``rng(label)`` derives independent streams from it
    depth: float | None          # where the needle goes (tasks with ``uses_depth``), else None
    haystack_dir: str | None     # user text replacing generated prose in essay haystacks

    def rng(self, label: str) -> random.Random:
        """An independent, deterministic stream: needles and filler draw from different streams, so the same
        sample index gets the same keys and values at every length."""
        return random.Random(f"{self.seed}/{label}")


@dataclass(frozen=True)
class Draft:
    """A generator's output; ``make_samples`` adds the identity and bookkeeping fields."""

    context: str
    questions: tuple[str, ...]
    answers: tuple[tuple[str, ...], ...]
    answer_prefix: str = ""      # RULER-style start of the answer, e.g. "The special magic number for x is"


@dataclass(frozen=True)
class Task:
    name: str
    description: str             # one line for `kvlab bench --list-tasks`
    metric: str                  # how every sample of the task is scored (see kvlab.bench.scoring)
    max_new_tokens: int          # generation budget that fits the expected answer in SmolLM2's tokens
    uses_depth: bool             # the generator honours Request.depth
    uses_haystack_dir: bool      # the generator builds essay haystacks that --haystack-dir can replace
    generate: Callable[[Request], Draft]


TASKS: Registry[Task] = Registry("task", UnknownTaskError, entry_point_group="kvlab.tasks")


def register_task(name: str, description: str, *, metric: str, max_new_tokens: int, uses_depth: bool = False,
                  uses_haystack_dir: bool = False):
    """Decorator for a generator ``fn(request) -> Draft``; the function is returned unchanged."""

    def decorator(generate: Callable[[Request], Draft]) -> Callable[[Request], Draft]:
        TASKS.register(name)(Task(name, description, metric, max_new_tokens, uses_depth, uses_haystack_dir,
                                  generate))
        return generate

    return decorator
