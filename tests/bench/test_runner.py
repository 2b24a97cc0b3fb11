"""The grid runner: one prefill per sample, answers identical to separate runs, fidelity, resume, report."""

from __future__ import annotations

import json

import pytest

from kvlab.bench.report import write_report
from kvlab.bench.results import ResultsFile
from kvlab.bench.runner import grid, run_grid
from kvlab.bench.tasks.base import Sample
from kvlab.engine import Engine
from kvlab.engine.conversation import Conversation
from kvlab.errors import ParameterError
from kvlab.policies import make_policy

PROSE = ("The harbour master counted the boats as they returned before dusk. " * 6).strip()


def make_sample(index: int, questions=("What is the code?",), depth=0.5) -> Sample:
    context = f"{PROSE} The secret code is {1000 + index}. {PROSE}"
    return Sample(id=f"toy/{index}", task="niah_toy", context=context, questions=tuple(questions),
                  answers=tuple((str(1000 + index),) for _ in questions), metric="contains_all",
                  length_tokens=len(context), depth=depth, max_new_tokens=6)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return Engine(tiny_llama, chunk_tokens=256)


CELLS = ["full", "streaming_llm", "snapkv", "h2o"]


def test_one_prefill_per_sample_and_one_row_per_cell(engine, tmp_path):
    samples = [make_sample(0), make_sample(1, questions=("What is the code?", "Repeat the code."))]
    cells = grid(CELLS, [0.5, 0.9])
    outcome = run_grid(engine, samples, cells, ResultsFile(tmp_path / "results.jsonl"), progress=False)
    assert outcome.prefills == 2
    assert outcome.rows_written == 3 * len(cells) == 3 * 7
    full_rows = [row for row in outcome.rows if row["policy"] == "full"]
    assert all(row["kl_vs_full"] == 0.0 and row["matches_full"] for row in full_rows)
    evicted = [row for row in outcome.rows if row["ratio"] == 0.9]
    assert all(row["kept_tokens"] < 0.2 * row["context_tokens"] for row in evicted)
    assert any(row["kl_vs_full"] > 1e-4 for row in evicted)
    assert all(row["kv_bytes_kept"] < row["kv_bytes_full"] for row in evicted)


def test_query_aware_prefills_each_question(engine, tmp_path):
    samples = [make_sample(0, questions=("What is the code?", "Repeat the code."))]
    outcome = run_grid(engine, samples, grid(["full", "snapkv"], [0.5]),
                       ResultsFile(tmp_path / "results.jsonl"), query_aware=True, progress=False)
    assert outcome.prefills == 2 and outcome.rows_written == 4
    assert all(row["query_aware"] for row in outcome.rows)


@pytest.mark.parametrize("query_aware", [False, True])
def test_grid_answers_equal_separate_runs(engine, tmp_path, query_aware):
    """Sharing one prefill between cells must not change any answer."""
    sample = make_sample(3)
    outcome = run_grid(engine, [sample], grid(CELLS, [0.5]), ResultsFile(tmp_path / "r.jsonl"),
                       query_aware=query_aware, progress=False)
    for row in outcome.rows:
        alone = engine.ask(sample.context, sample.questions[0], make_policy(row["policy"]),
                           ratio=None if row["policy"] == "full" else row["ratio"], query_aware=query_aware,
                           max_new_tokens=sample.max_new_tokens)
        assert row["prediction"] == alone.answer, row["policy"]
        assert row["kv_bytes_kept"] == alone.kv_bytes_kept or query_aware


def test_resume_skips_done_cells_and_repairs_a_partial_line(engine, tmp_path):
    path = tmp_path / "results.jsonl"
    samples = [make_sample(0), make_sample(1)]
    cells = grid(["full", "snapkv"], [0.5, 0.75])
    first = run_grid(engine, samples, cells, ResultsFile(path), progress=False)
    assert first.rows_written == 6
    again = run_grid(engine, samples, cells, ResultsFile(path), progress=False)
    assert (again.rows_written, again.prefills, again.cells_skipped) == (0, 0, 6)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])  # killed mid-write
    resumed = run_grid(engine, samples, cells, ResultsFile(path), progress=False)
    assert (resumed.rows_written, resumed.prefills) == (1, 1)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 6 and len({(r["sample_id"], r["policy"], r["ratio"]) for r in rows}) == 6


def test_bad_grid_arguments():
    with pytest.raises(ParameterError, match="ratios must be in"):
        grid(["snapkv"], [1.0])
    with pytest.raises(ParameterError, match="at least one policy"):
        grid([], [0.5])


def test_report_files(engine, tmp_path):
    samples = [make_sample(i, depth=d) for i, d in enumerate((0.1, 0.5, 0.9))]
    outcome = run_grid(engine, samples, grid(["full", "streaming_llm", "snapkv"], [0.5, 0.8]),
                       ResultsFile(tmp_path / "results.jsonl"), progress=False)
    paths = write_report(tmp_path, outcome.rows, {"model": "tiny-llama", "prefills": outcome.prefills})
    summary = json.loads(paths["summary"].read_text())
    overall = [row for row in summary["rows"] if row["task"] == "all" and row["length"] == 0]
    assert {(row["policy"], row["ratio"]) for row in overall} == {
        ("full", 0.0), ("streaming_llm", 0.5), ("streaming_llm", 0.8), ("snapkv", 0.5), ("snapkv", 0.8)}
    assert all(row["n"] == 3 for row in overall)
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") == 4 and "Budget frontier: score vs memory" in html
    assert "| policy @ ratio | score |" in paths["table"]


def test_multi_request_answers_from_the_file_like_single_mode(engine, tmp_path):
    sample = make_sample(5, questions=("What is the code?", "Repeat the code."))
    cells = grid(["full", "snapkv"], [0.5])
    single = run_grid(engine, [sample], cells, ResultsFile(tmp_path / "a.jsonl"), progress=False)
    persisted = run_grid(engine, [sample], cells, ResultsFile(tmp_path / "b.jsonl"), mode="multi-request",
                         progress=False)
    assert persisted.prefills == 1 and persisted.rows_written == 4
    by_key = {(r["question_index"], r["policy"]): r["prediction"] for r in single.rows}
    for row in persisted.rows:
        assert row["prediction"] == by_key[(row["question_index"], row["policy"])]
        assert row["load_s"] > 0 and row["file_bytes"] > row["kv_bytes_kept"]


def test_multi_turn_keeps_the_history(engine, tmp_path):
    sample = make_sample(6, questions=("What is the code?", "Repeat the code.", "Say it again."))
    outcome = run_grid(engine, [sample], grid(["full", "streaming_llm"], [0.5]),
                       ResultsFile(tmp_path / "r.jsonl"), mode="multi-turn", progress=False)
    assert outcome.prefills == 1 and outcome.rows_written == 6
    full_turns = sorted((r for r in outcome.rows if r["policy"] == "full"), key=lambda r: r["question_index"])
    assert all(r["kl_vs_full"] is None and r["matches_full"] for r in full_turns)
    assert [r["question_index"] for r in full_turns] == [0, 1, 2]
    result = engine.prefill(engine.prompt(sample.context, "").prefix_ids)
    conversation = Conversation(engine, result.cache)
    expected = [conversation.ask(q, max_new_tokens=sample.max_new_tokens).answer for q in sample.questions]
    assert [r["prediction"] for r in full_turns] == expected
    with pytest.raises(ParameterError, match="needs mode single"):
        run_grid(engine, [sample], grid(["full"], [0.5]), ResultsFile(tmp_path / "x.jsonl"), mode="multi-turn",
                 query_aware=True, progress=False)


def test_quantized_cells_cost_fewer_bytes_and_some_fidelity(engine, tmp_path):
    long_context = make_sample(7)
    long_context = Sample(**{**long_context.__dict__, "context": long_context.context * 3})
    outcome = run_grid(engine, [long_context], grid(["full"], [0.5], [None, "int8", "int4"]),
                       ResultsFile(tmp_path / "q.jsonl"), progress=False)
    by_scheme = {row["quantization"]: row for row in outcome.rows}
    assert by_scheme["int4"]["kv_bytes_kept"] < by_scheme["int8"]["kv_bytes_kept"] < by_scheme[None]["kv_bytes_kept"]
    assert by_scheme[None]["kl_vs_full"] == 0.0
    assert by_scheme["int4"]["kl_vs_full"] > by_scheme["int8"]["kl_vs_full"] > 0.0
