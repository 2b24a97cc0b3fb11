"""Reading one field of a published benchmark's row, with errors that name the file, the line and the field."""

from __future__ import annotations

from typing import Any

from kvlab.bench.data import Row
from kvlab.errors import DataError


def text(row: Row, key: str, *, empty_ok: bool = False) -> str:
    """A string field; missing, not a string, or (unless ``empty_ok``) blank raises DataError."""
    if key not in row.values:
        raise DataError(f"{row.where}: missing {key!r} (a string)")
    value = row.values[key]
    if not isinstance(value, str) or (not empty_ok and not value.strip()):
        raise DataError(f"{row.where}: {key!r} must be a {'' if empty_ok else 'non-empty '}string "
                        f"(got {_kind(value)})")
    return value


def optional_text(row: Row, key: str) -> str:
    value = row.values.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{row.where}: {key!r} must be a string (got {_kind(value)})")
    return value


def answers(row: Row, key: str, value: Any = None) -> tuple[str, ...]:
    """Accepted answers: a string, a number, or a non-empty list of them (numbers become their decimal text)."""
    value = row.values.get(key) if value is None else value
    if value is None:
        raise DataError(f"{row.where}: missing {key!r} (a string or a list of strings)")
    items = value if isinstance(value, list) else [value]
    if not items or not all(_is_answer(item) for item in items):
        raise DataError(f"{row.where}: {key!r} must be a non-empty string or number, or a non-empty list of them "
                        f"(got {_kind(value)})")
    return tuple(item if isinstance(item, str) else str(item) for item in items)


def text_list(row: Row, key: str, length: int | None = None) -> list[str]:
    value = row.values.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value) \
            or (length is not None and len(value) != length):
        size = f"{length} " if length is not None else "a non-empty list of "
        raise DataError(f"{row.where}: {key!r} must be {size}strings (got {_kind(value)})")
    return value


def letter_and_text(row: Row, key: str, answer: str, options: list[str]) -> tuple[str, str]:
    """The right option of a multiple-choice row as (option text, letter), from either of them."""
    letters = "ABCD"[:len(options)]
    if answer in options:
        return answer, letters[options.index(answer)]
    if len(answer) == 1 and answer in letters:
        return options[letters.index(answer)], answer
    raise DataError(f"{row.where}: {key!r} must be one of the options or their letter {', '.join(letters)} "
                    f"(got {answer!r})")


def _is_answer(item: Any) -> bool:
    return (isinstance(item, str) and bool(item.strip())) or (isinstance(item, int | float)
                                                               and not isinstance(item, bool))


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return "an empty string" if not value.strip() else repr(value[:40])
    return "nothing" if value is None else f"{type(value).__name__} {str(value)[:40]}"
