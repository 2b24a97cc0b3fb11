"""User JSONL data: valid rows become Samples; every bad row is one DataError naming the file, line and field."""

from __future__ import annotations

import json

import pytest

from kvlab.bench.data import load_jsonl
from kvlab.errors import DataError, KvlabError

GOOD = {"context": "Mara was born in Oakdale.", "question": "Where was Mara born?", "answers": ["Oakdale"]}


def write(tmp_path, *lines, name="cases.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n",
                    encoding="utf-8")
    return path


def test_rows_become_samples_with_defaults(tmp_path):
    path = write(tmp_path, GOOD, "", "   ",
                 {"context": "doc", "questions": ["q1", "q2"], "answers": [["a", "A1"], ["b"]], "id": "two",
                  "metric": "contains_all", "max_new_tokens": 8},
                 name="mine.jsonl")
    first, second = load_jsonl(path)
    assert (first.id, first.task, first.questions, first.answers) == \
        ("mine/1", "mine", ("Where was Mara born?",), (("Oakdale",),))
    assert (first.metric, first.length_tokens, first.depth, first.max_new_tokens) == ("contains_any", 0, None, 32)
    assert (second.id, second.questions, second.answers) == ("two", ("q1", "q2"), (("a", "A1"), ("b",)))
    assert (second.metric, second.max_new_tokens) == ("contains_all", 8)


def test_default_ids_count_blank_lines(tmp_path):
    samples = load_jsonl(write(tmp_path, "", GOOD, "", GOOD))
    assert [sample.id for sample in samples] == ["cases/2", "cases/4"]


BAD_ROWS = [
    ('{"context": "x", ', None, "invalid JSON"),
    ('["context", "question"]', None, "JSON object"),
    ({**GOOD, "answer": ["x"]}, "'answer'", "Did you mean 'answers'?"),
    ({**GOOD, "contxt": "x"}, "'contxt'", "Did you mean 'context'?"),
    ({"question": "q", "answers": ["a"]}, "'context'", "non-empty string"),
    ({**GOOD, "context": 42}, "'context'", "non-empty string"),
    ({**GOOD, "context": "  "}, "'context'", "non-empty string"),
    ({**GOOD, "questions": ["q"]}, "'questions'", "not both"),
    ({"context": "x", "answers": ["a"]}, "'question'", "missing"),
    ({**GOOD, "question": ""}, "'question'", "non-empty string"),
    ({"context": "x", "questions": [], "answers": ["a"]}, "'questions'", "non-empty list"),
    ({"context": "x", "questions": ["q", 3], "answers": ["a"]}, "'questions'", "non-empty list"),
    ({"context": "x", "question": "q"}, "'answers'", "missing"),
    ({**GOOD, "answers": "Oakdale"}, "'answers'", "list of strings or a list of lists, one per question"),
    ({**GOOD, "answers": []}, "'answers'", "list of strings or a list of lists, one per question"),
    ({**GOOD, "answers": ["a", ["b"]]}, "'answers'", "list of strings or a list of lists, one per question"),
    ({"context": "x", "questions": ["q1", "q2"], "answers": ["a", "b"]}, "'answers'", "one per question"),
    ({"context": "x", "questions": ["q1", "q2"], "answers": [["a"]]}, "'answers'", "1 lists for 2 questions"),
    ({"context": "x", "questions": ["q1", "q2"], "answers": [["a"], []]}, "'answers' list 2", "non-empty"),
    ({**GOOD, "metric": "contains"}, "'metric'", "contains_all, contains_any, exact"),
    ({**GOOD, "metric": "exactly"}, "'metric'", "Did you mean 'exact'?"),
    ({**GOOD, "id": 7}, "'id'", "non-empty string"),
    ({**GOOD, "max_new_tokens": 0}, "'max_new_tokens'", "positive integer"),
    ({**GOOD, "max_new_tokens": True}, "'max_new_tokens'", "positive integer"),
]


@pytest.mark.parametrize("row, field, expected", BAD_ROWS,
                         ids=[f"{i}-{field or 'json'}" for i, (_, field, _) in enumerate(BAD_ROWS)])
def test_bad_row_is_one_line_naming_file_line_and_field(tmp_path, row, field, expected):
    path = write(tmp_path, GOOD, "", row)  # the bad row is on line 3
    with pytest.raises(DataError) as error:
        load_jsonl(path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path} line 3: ")
    assert field is None or field in message
    assert expected in message


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write(tmp_path, {**GOOD, "id": "a"}, {**GOOD, "id": "b"}, {**GOOD, "id": "a"})
    with pytest.raises(DataError, match=r"line 3: duplicate id 'a' \(first used on line 1\)"):
        load_jsonl(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "absent.jsonl")


def test_file_without_cases(tmp_path):
    with pytest.raises(DataError, match="has no cases"):
        load_jsonl(write(tmp_path, "", "  "))


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"context": "caf\xe9", "question": "q", "answers": ["a"]}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        load_jsonl(path)


def test_data_errors_are_kvlab_errors():
    assert issubclass(DataError, KvlabError)
