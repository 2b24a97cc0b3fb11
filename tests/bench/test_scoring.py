"""Scoring as RULER scores: all-of and any-of substring matching, case-insensitive, and a normalized exact match."""

from __future__ import annotations

import pytest

from kvlab.bench.scoring import METRICS, normalize, score
from kvlab.errors import ParameterError


@pytest.mark.parametrize("prediction, expected", [
    ("1234567 and 7654321", 1.0),
    ("only 7654321 here", 0.5),
    ("nothing", 0.0),
    ("", 0.0),
])
def test_contains_all_is_the_fraction_found(prediction, expected):
    assert score(prediction, ["1234567", "7654321"], "contains_all") == expected


def test_contains_all_ignores_case_and_counts_each_answer_once():
    assert score("The words: APPLE, apple, River", ["apple", "river", "stone"], "contains_all") == pytest.approx(2 / 3)


def test_contains_any_is_all_or_nothing():
    assert score("It is in Oakdale, I think.", ["Millbrook", "oakdale"], "contains_any") == 1.0
    assert score("It is in Millford.", ["Millbrook", "Oakdale"], "contains_any") == 0.0


@pytest.mark.parametrize("prediction", ["Paris", "  paris. ", "PARIS!", "paris \n", "Paris..."])
def test_exact_normalizes_case_whitespace_and_trailing_punctuation(prediction):
    assert score(prediction, ["Paris"], "exact") == 1.0


@pytest.mark.parametrize("prediction", ["Paris, France", "The answer is Paris", "Pa ris", ""])
def test_exact_does_not_accept_containment(prediction):
    assert score(prediction, ["Paris"], "exact") == 0.0


def test_exact_accepts_any_listed_answer_and_collapses_inner_whitespace():
    assert score("New   York\tCity", ["Big Apple", "new york city"], "exact") == 1.0
    assert normalize("  New \n York?! ") == "new york"


def test_unknown_metric_lists_the_valid_ones():
    with pytest.raises(ParameterError) as error:
        score("x", ["x"], "contains")
    for metric in METRICS:
        assert metric in str(error.value)


@pytest.mark.parametrize("answers", [[], "1234567"])
def test_answers_must_be_a_non_empty_list(answers):
    with pytest.raises(ParameterError, match="non-empty list"):
        score("1234567", answers, "contains_all")
