"""Scoring a prediction against a sample's answers, as RULER scores its tasks.

- ``contains_all``: the fraction of required strings found in the prediction, case-insensitively (RULER's
  ``string_match_all``, used for needle, tracking and aggregation tasks).
- ``contains_any``: 1.0 if any accepted string is found in the prediction, else 0.0 (RULER's
  ``string_match_part``, used for QA).
- ``exact``: 1.0 if the normalized prediction equals any normalized accepted string (normalized: outer whitespace
  and trailing punctuation stripped, inner whitespace collapsed to one space, case folded).
"""

from __future__ import annotations

import string
from collections.abc import Sequence

from kvlab.errors import ParameterError

METRICS = ("contains_all", "contains_any", "exact")


def normalize(text: str) -> str:
    return " ".join(text.split()).rstrip(string.punctuation + " ").casefold()


def score(prediction: str, answers: Sequence[str], metric: str) -> float:
    """A score in [0, 1] for one prediction (one question) against its accepted or required strings."""
    if metric not in METRICS:
        raise ParameterError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if isinstance(answers, str) or not answers:
        raise ParameterError(f"answers must be a non-empty list of strings (got {answers!r})")
    if metric == "exact":
        return float(normalize(prediction) in {normalize(answer) for answer in answers})
    found = [answer.casefold() in prediction.casefold() for answer in answers]
    return sum(found) / len(found) if metric == "contains_all" else float(any(found))
