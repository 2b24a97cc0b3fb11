"""Input methods as bench cells: rows carry family, the tokens given to the model, bytes against the original
context's full cache and the shortened prefill's time; a method that keeps everything answers like the full cache."""

from __future__ import annotations

import math

import pytest

from kvlab.bench.results import ResultsFile
from kvlab.bench.runner import grid, run_grid
from kvlab.bench.tasks.base import Sample
from kvlab.engine import Engine
from kvlab.errors import ParameterError, UnknownPolicyError

PROSE = " ".join(f"Boat {index} came back to the harbour before dusk." for index in range(12))


def make_sample(index: int, questions=("What is the secret code?",)) -> Sample:
    context = f"{PROSE} The secret code is {1000 + index}. {PROSE}"
    return Sample(id=f"toy/{index}", task="niah_toy", context=context, questions=tuple(questions),
                  answers=tuple((str(1000 + index),) for _ in questions), metric="contains_all",
                  length_tokens=len(context), depth=0.5, max_new_tokens=4)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return Engine(tiny_llama, chunk_tokens=256)


def test_input_cells_write_rows_with_the_new_fields(engine, tmp_path):
    cells = grid(["full", "snapkv", "rag_bm25:chunk_tokens=32", "selective_context", "llmlingua"], [0.5, 0.75])
    outcome = run_grid(engine, [make_sample(0)], cells, ResultsFile(tmp_path / "results.jsonl"), progress=False)
    rows = {(row["policy"], row["ratio"]): row for row in outcome.rows}
    document_tokens = len(engine.tokenizer(make_sample(0).context, add_special_tokens=False)["input_ids"])
    template_tokens = rows[("full", 0.0)]["context_tokens"] - document_tokens
    assert len(rows) == len(cells) == 9
    full = rows[("full", 0.0)]
    assert full["family"] == "kv" and rows[("snapkv", 0.5)]["family"] == "kv"
    assert full["input_context_tokens"] == full["context_tokens"]
    assert not full["method_query_aware"] and not rows[("snapkv", 0.5)]["method_query_aware"]
    for name in ("rag_bm25:chunk_tokens=32", "selective_context", "llmlingua"):
        for ratio in (0.5, 0.75):
            row = rows[(name, ratio)]
            assert row["family"] == "input"
            assert row["method_query_aware"] == name.startswith("rag_")
            assert row["budget_tokens"] == math.ceil(document_tokens * (1 - ratio))
            assert row["input_context_tokens"] <= row["budget_tokens"] + template_tokens
            assert row["kept_tokens"] == row["input_context_tokens"] < row["context_tokens"]
            # bytes against the original context's full cache, like every other row
            assert row["kv_bytes_full_fp16"] == full["kv_bytes_full_fp16"]
            assert row["kv_bytes_full"] == full["kv_bytes_full"]
            assert row["kv_bytes_kept"] < full["kv_bytes_kept"]
            assert row["prefill_s"] > 0 and row["compress_s"] > 0
    # a smaller share of the document holds fewer bytes
    assert rows[("llmlingua", 0.75)]["kv_bytes_kept"] < rows[("llmlingua", 0.5)]["kv_bytes_kept"]


@pytest.mark.parametrize("query_aware", [False, True])
def test_an_input_cell_that_keeps_everything_answers_like_the_full_cache(engine, tmp_path, query_aware):
    cells = grid(["full", "rag_bm25", "selective_context"], [0.0])
    outcome = run_grid(engine, [make_sample(1)], cells, ResultsFile(tmp_path / "results.jsonl"),
                       query_aware=query_aware, progress=False)
    for row in outcome.rows:
        assert row["matches_full"] and row["kl_vs_full"] == pytest.approx(0.0, abs=1e-6)
        assert row["input_context_tokens"] == row["context_tokens"]


def test_multi_request_retrieves_per_question(engine, tmp_path):
    sample = make_sample(2, questions=("What is the secret code?", "Which boat came back first?"))
    cells = grid(["full", "rag_bm25:chunk_tokens=32", "llmlingua"], [0.75])
    outcome = run_grid(engine, [sample], cells, ResultsFile(tmp_path / "results.jsonl"), mode="multi-request",
                       progress=False)
    assert outcome.rows_written == 6
    rag = [row for row in outcome.rows if row["policy"].startswith("rag_bm25")]
    lingua = [row for row in outcome.rows if row["policy"] == "llmlingua"]
    # retrieval ran once per question, llmlingua once for the sample (its second row reuses the first's work)
    assert rag[0]["input_context_tokens"] > 0 and rag[0]["compress_s"] != rag[1]["compress_s"]
    assert lingua[0]["compress_s"] == lingua[1]["compress_s"]
    assert all(row["family"] == "input" and row["mode"] == "multi-request" for row in rag + lingua)


def test_multi_turn_refuses_input_methods(engine, tmp_path):
    with pytest.raises(ParameterError, match="--mode single or multi-request"):
        run_grid(engine, [make_sample(3)], grid(["full", "llmlingua"], [0.5]),
                 ResultsFile(tmp_path / "results.jsonl"), mode="multi-turn", progress=False)


def test_unknown_cell_names_policies_and_input_methods():
    with pytest.raises(UnknownPolicyError, match="Did you mean: rag_bm25.*input methods: llmlingua"):
        grid(["full", "rag_bm2"], [0.5])
