"""User benchmark data: one case per JSONL line, turned into ``Sample``s the runner treats like generated ones.

A line holds an object with
- ``context`` (string): the document;
- ``question`` (string) or ``questions`` (list of strings, asked in order as follow-ups);
- ``answers``: a list of strings (accepted answers of a single question) or a list of lists, one per question;
- optional ``id`` (string, default "<file stem>/<line number>"), ``metric`` (default ``contains_any``; see
  ``kvlab.bench.scoring``), ``max_new_tokens`` (positive integer, default 32) and ``answer_prefix`` (text that
  starts the model's answer, default none).

Blank lines are skipped. Every problem is reported as one line naming the file, the line and the field.
``Row`` and ``read_jsonl_rows`` are shared with the published benchmarks' formats (``kvlab.bench.formats``).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvlab.bench.scoring import METRICS, parse_metric
from kvlab.bench.tasks.base import Sample
from kvlab.errors import DataError, KvlabError

FIELDS = ("context", "question", "questions", "answers", "id", "metric", "max_new_tokens", "answer_prefix")
DEFAULT_METRIC = "contains_any"
DEFAULT_MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class Row:
    """One decoded case of any data format, with where it came from (for error messages)."""

    values: dict[str, Any]
    where: str                   # "FILE line N" or "hub:NAME row N"
    source: str                  # the file stem (or hub config/split): default task name and id prefix
    number: int                  # line (file) or 1-based row (hub) number
    path: Path | None = None     # the file, when the row came from one

    @property
    def unit(self) -> str:
        return "line" if self.path is not None else "row"


def read_jsonl_rows(path: str | Path) -> list[Row]:
    """The JSON objects of a JSONL file, one per non-blank line; a bad line raises DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass the path of a JSONL file with one case per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8") from None
    rows = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {line_number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno}); each line must be one "
                            f"JSON object") from None
        if not isinstance(value, dict):
            raise DataError(f"{where}: expected a JSON object with the case's fields, got {type(value).__name__}")
        rows.append(Row(value, where, path.stem, line_number, path))
    if not rows:
        raise DataError(f"{path}: the file has no cases; write one JSON object per line with 'context', "
                        f"'question' and 'answers'")
    return rows


def check_unique_ids(samples: list[Sample], rows: list[Row]) -> None:
    first_row_of: dict[str, Row] = {}
    for sample, row in zip(samples, rows):
        first = first_row_of.setdefault(sample.id, row)
        if first is not row:
            raise DataError(f"{row.where}: duplicate id {sample.id!r} (first used on {first.unit} {first.number}); "
                            f"give every case its own id")


def load_jsonl(path: str | Path) -> list[Sample]:
    """kvlab's own format (see the module docstring)."""
    rows = read_jsonl_rows(path)
    samples = [parse_row(row) for row in rows]
    check_unique_ids(samples, rows)
    return samples


def parse_row(row: Row) -> Sample:
    where, values = row.where, row.values
    for key in values:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise DataError(f"{where}: unknown field {key!r}.{hint} Fields: {', '.join(FIELDS)}")
    context = values.get("context")
    if not isinstance(context, str) or not context.strip():
        raise DataError(f"{where}: 'context' must be a non-empty string")
    questions = _questions(where, values)
    answers = _answers(where, values, len(questions))
    metric = values.get("metric", DEFAULT_METRIC)
    if not isinstance(metric, str) or metric.split(":")[0] not in METRICS:
        close = difflib.get_close_matches(str(metric), METRICS, n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DataError(f"{where}: 'metric' must be one of {', '.join(METRICS)} (got {metric!r}).{hint}")
    try:
        parse_metric(metric)
    except KvlabError as error:
        raise DataError(f"{where}: 'metric': {error}") from None
    answer_prefix = values.get("answer_prefix", "")
    if not isinstance(answer_prefix, str):
        raise DataError(f"{where}: 'answer_prefix' must be a string (got {type(answer_prefix).__name__})")
    max_new_tokens = values.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise DataError(f"{where}: 'max_new_tokens' must be a positive integer (got {max_new_tokens!r})")
    sample_id = values.get("id", f"{row.source}/{row.number}")
    if not isinstance(sample_id, str) or not sample_id.strip():
        raise DataError(f"{where}: 'id' must be a non-empty string (got {sample_id!r})")
    return Sample(id=sample_id, task=row.source, context=context, questions=questions, answers=answers,
                  metric=metric, length_tokens=0, depth=None, max_new_tokens=max_new_tokens,
                  answer_prefix=answer_prefix)


def _questions(where: str, row: dict[str, Any]) -> tuple[str, ...]:
    if "question" in row and "questions" in row:
        raise DataError(f"{where}: give either 'question' (a string) or 'questions' (a list of strings), not both")
    if "question" in row:
        if not _is_text(row["question"]):
            raise DataError(f"{where}: 'question' must be a non-empty string")
        return (row["question"],)
    if "questions" in row:
        value = row["questions"]
        if not isinstance(value, list) or not value or not all(_is_text(q) for q in value):
            raise DataError(f"{where}: 'questions' must be a non-empty list of non-empty strings")
        return tuple(value)
    raise DataError(f"{where}: missing 'question' (a string) or 'questions' (a list of strings)")


def _answers(where: str, row: dict[str, Any], num_questions: int) -> tuple[tuple[str, ...], ...]:
    expected = "a list of strings or a list of lists, one per question"
    if "answers" not in row:
        raise DataError(f"{where}: missing 'answers' ({expected})")
    value = row["answers"]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'answers' must be {expected}")
    if all(_is_text(answer) for answer in value):
        if num_questions != 1:
            raise DataError(f"{where}: 'answers' is a flat list but there are {num_questions} questions; give a "
                            f"list of lists, one per question")
        return (tuple(value),)
    if all(isinstance(group, list) for group in value):
        if len(value) != num_questions:
            raise DataError(f"{where}: 'answers' has {len(value)} lists for {num_questions} questions; give one "
                            f"list per question")
        for index, group in enumerate(value, start=1):
            if not group or not all(_is_text(answer) for answer in group):
                raise DataError(f"{where}: 'answers' list {index} must be a non-empty list of non-empty strings")
        return tuple(tuple(group) for group in value)
    raise DataError(f"{where}: 'answers' must be {expected}")


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())
