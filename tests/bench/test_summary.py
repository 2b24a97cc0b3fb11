"""Summary rows count each answer once, whatever its length key."""

import pytest

from kvlab.bench.summary import summarize


def row(task: str, length: int, score: float) -> dict:
    return {"policy": "snapkv", "ratio": 0.5, "task": task, "length_tokens": length, "score": score,
            "matches_full": score > 0.5, "question_index": 0}


def test_data_rows_of_length_zero_are_counted_once():
    rows = [row("cases", 0, value) for value in (1.0, 0.0, 1.0)]  # `--data` rows carry length 0
    by_key = {(entry["task"], entry["length"]): entry for entry in summarize(rows)}
    assert by_key[("cases", 0)]["n"] == 3 and by_key[("all", 0)]["n"] == 3
    assert by_key[("cases", 0)]["score"] == pytest.approx(2 / 3)
    # the standard error of three answers, not of six copies
    assert by_key[("all", 0)]["stderr"] == pytest.approx((1 / 3) ** 0.5 / 3 ** 0.5)


def test_generated_rows_count_once_per_length_and_once_overall():
    rows = [row("vt", 1024, 1.0), row("vt", 2048, 0.0), row("qa_1", 1024, 1.0)]
    by_key = {(entry["task"], entry["length"]): entry["n"] for entry in summarize(rows)}
    assert by_key[("vt", 1024)] == 1 and by_key[("vt", 0)] == 2 and by_key[("all", 0)] == 3
    assert by_key[("all", 1024)] == 2
