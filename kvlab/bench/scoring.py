"""Scoring a prediction against a sample's answers: RULER's string matching, plus the official per-task metrics
of LongBench, LongBench v2, InfiniteBench and SCBench (formulas in ``kvlab.bench.textmetrics``).

A sample's ``metric`` is a spec: a metric name, optionally followed by ``:first_line`` (score only the first
line of the prediction, as LongBench does for trec, triviaqa, samsum and lsht) and, for ``classification``,
``:labels=KEY`` naming a label set the data loader registered (``register_labels``).

- ``contains_all``: the fraction of required strings found in the prediction, case-insensitively (RULER's
  ``string_match_all``, used for needle, tracking and aggregation tasks).
- ``contains_any``: 1.0 if any accepted string is found in the prediction, else 0.0 (RULER's
  ``string_match_part``, used for QA).
- ``exact``: 1.0 if the normalized prediction equals any normalized accepted string (normalized: outer whitespace
  and trailing punctuation stripped, inner whitespace collapsed to one space, case folded).
- the rest are listed in ``METRIC_HELP``; the LongBench ones take the best score over the accepted answers, as
  LongBench's ``scorer`` does.
"""

from __future__ import annotations

import difflib
import hashlib
import string
from collections.abc import Callable, Sequence

from kvlab.bench import textmetrics as tm
from kvlab.errors import ParameterError

Scorer = Callable[[str, Sequence[str], Sequence[str]], float]  # (prediction, answers, labels) -> [0, 1]


def _best(metric: Callable[[str, str], float]) -> Scorer:
    return lambda prediction, answers, labels: max(metric(prediction, answer) for answer in answers)


def _contains(prediction: str, answers: Sequence[str]) -> list[bool]:
    return [answer.casefold() in prediction.casefold() for answer in answers]


_SCORERS: dict[str, tuple[Scorer, str]] = {
    "contains_all": (lambda p, a, _: sum(_contains(p, a)) / len(a),
                     "RULER string_match_all: share of the answers found in the prediction (any case)"),
    "contains_any": (lambda p, a, _: float(any(_contains(p, a))),
                     "RULER string_match_part: 1 if any answer is found in the prediction (any case)"),
    "exact": (lambda p, a, _: float(normalize(p) in {normalize(answer) for answer in a}),
              "the normalized prediction equals an answer"),
    "qa_f1": (_best(tm.qa_f1), "LongBench/InfiniteBench qa_f1_score: F1 of normalized words"),
    "qa_f1_zh": (_best(tm.qa_f1_zh), "LongBench qa_f1_zh_score: F1 of jieba words (needs jieba)"),
    "qa_f1_zh_chars": (_best(tm.qa_f1_zh_chars), "InfiniteBench/SCBench Chinese QA: F1 of normalized characters"),
    "rouge_l": (_best(tm.rouge_l), "LongBench rouge_score: ROUGE-L F as the rouge package computes it"),
    "rouge_l_zh": (_best(tm.rouge_l_zh), "LongBench rouge_zh_score: ROUGE-L over jieba words (needs jieba)"),
    "classification": (lambda p, a, labels: max(tm.classification(p, answer, labels) for answer in a),
                       "LongBench classification_score: 1/len(classes named) if the right one is named"),
    "code_sim": (_best(tm.code_sim), "LongBench code_sim_score: Levenshtein ratio of the first code line"),
    "retrieval": (_best(tm.retrieval), "LongBench retrieval_score: share of numbers equal to the paragraph's"),
    "retrieval_zh": (_best(lambda p, t: tm.retrieval(p, t, marker="段落")), "LongBench retrieval_zh_score"),
    "count": (_best(tm.count), "LongBench count_score: share of numbers equal to the count"),
    "choice": (lambda p, a, _: float(tm.choice_letter(p) in a),
               "LongBench v2: the extracted letter (A-D) is the answer letter"),
    "first_integer": (lambda p, a, _: float(tm.first_integer(p) == a[0]),
                      "InfiniteBench passkey/number_string: the first integer equals the answer"),
    "kv_words": (lambda p, a, _: float(tm.kv_words(p, a[0])),
                 "InfiniteBench kv_retrieval: the value is one of the prediction's words"),
    "kv_contains": (lambda p, a, _: float(a[0] in p), "SCBench kv tasks: the value occurs in the prediction"),
    "name_words": (lambda p, a, _: float(tm.dialogue_words(p, a[0])),
                   "InfiniteBench longdialogue_qa_eng: the name is one of the upper-cased words"),
    "name_contains": (lambda p, a, _: float(any(answer.upper() in p.strip().upper() for answer in a)),
                      "SCBench qa_eng/many_shot: an answer occurs in the upper-cased prediction"),
    "option": (lambda p, a, _: float(tm.option(p, a)),
               "InfiniteBench/SCBench choice_eng: the option letter or text (answers = text, letter)"),
    "math_find": (lambda p, a, _: float(tm.math_find(p, a[0])),
                  "InfiniteBench/SCBench math_find: the first number equals the answer"),
}
METRICS = tuple(_SCORERS)
METRIC_HELP = {name: help_text for name, (_, help_text) in _SCORERS.items()}
NEEDS_JIEBA = ("qa_f1_zh", "rouge_l_zh")

_LABEL_SETS: dict[str, tuple[str, ...]] = {}


def register_labels(name: str, labels: Sequence[str]) -> str:
    """Register the class names of a classification task; returns the key a metric spec names (``NAME-HASH``,
    so two files with different class lists under one task name never collide)."""
    labels = tuple(labels)
    digest = hashlib.sha1("\u0000".join(labels).encode("utf-8")).hexdigest()[:8]
    key = f"{name}-{digest}"
    _LABEL_SETS[key] = labels
    return key


def normalize(text: str) -> str:
    return " ".join(text.split()).rstrip(string.punctuation + " ").casefold()


def parse_metric(spec: str) -> tuple[str, bool, tuple[str, ...]]:
    """(metric name, score the first line only, class labels) of a metric spec; raises ParameterError."""
    name, *options = spec.split(":")
    if name not in _SCORERS:
        close = difflib.get_close_matches(name, METRICS, n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ParameterError(f"unknown metric {name!r}; use one of {', '.join(METRICS)}.{hint}")
    first_line = False
    labels: tuple[str, ...] = ()
    for option in options:
        if option == "first_line":
            first_line = True
        elif option.startswith("labels=") and option[7:] in _LABEL_SETS:
            labels = _LABEL_SETS[option[7:]]
        else:
            raise ParameterError(f"metric {spec!r}: unknown option {option!r}; options are first_line and "
                                 f"labels=KEY (registered by the loader of a LongBench file)")
    if name == "classification" and not labels:
        raise ParameterError(f"metric {spec!r} needs the task's class names: load a LongBench file with "
                             f"'all_classes' (kvlab bench --data longbench:FILE)")
    if name in NEEDS_JIEBA:
        tm._jieba_words("")  # fails now, with the install line, rather than in the middle of a run
    return name, first_line, labels


def score(prediction: str, answers: Sequence[str], metric: str) -> float:
    """A score in [0, 1] for one prediction (one question) against its accepted or required strings."""
    name, first_line, labels = parse_metric(metric)
    if isinstance(answers, str) or not answers:
        raise ParameterError(f"answers must be a non-empty list of strings (got {answers!r})")
    if first_line:
        prediction = prediction.lstrip("\n").split("\n")[0]
    scorer, _ = _SCORERS[name]
    return float(scorer(prediction, answers, labels))
