"""`kvlab bench --max-kv-memory`: streamed cells beside the cells compressed after a full prefill."""

from __future__ import annotations

import json

import pytest

from kvlab.bench.results import ResultsFile
from kvlab.bench.runner import GREEDY, grid, run_grid
from kvlab.bench.summary import cell_label, summarize
from kvlab.bench.tasks.base import Sample
from kvlab.cli import build_parser, main
from kvlab.engine import Engine, resolve_budget
from kvlab.engine.streaming import kv_bytes_per_token, streaming_prefill
from kvlab.errors import ParameterError
from kvlab.policies import make_policy

PROSE = "The harbour master counted the boats as they returned before dusk. " * 3
SMALL, LARGE = 96 * 1024, 2**20  # tiny-llama holds 768 bytes per token: 128 and 1365 tokens; documents are ~470


def make_sample(index: int) -> Sample:
    context = f"{PROSE}The secret code is {1000 + index}. {PROSE}"
    return Sample(id=f"toy/{index}", task="niah_toy", context=context,
                  questions=("What is the code?", "Repeat the code."),
                  answers=((str(1000 + index),), (str(1000 + index),)), metric="contains_all",
                  length_tokens=len(context), depth=0.5, max_new_tokens=5)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return Engine(tiny_llama, chunk_tokens=256)


@pytest.fixture(scope="module")
def run(engine, tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "results.jsonl"
    cells = grid(["full", "snapkv"], [0.9], [None], [SMALL, LARGE])
    return path, cells, run_grid(engine, [make_sample(0)], cells, ResultsFile(path), progress=False)


def by_policy(rows, question_index=0):
    return {row["policy"]: row for row in rows if row["question_index"] == question_index}


def test_grid_adds_a_streamed_variant_per_limit_to_evicting_policies_only():
    cells = grid(["full", "snapkv", "rag_bm25"], [0.5, 0.9], [None, "int4"], [SMALL, LARGE])
    streamed = [cell.label for cell in cells if cell.max_kv_bytes is not None]
    assert len(streamed) == 2 * 2 * 2 and set(streamed) == {"snapkv stream≤96KiB", "snapkv stream≤1MiB"}
    with pytest.raises(ParameterError, match="evict"):
        grid(["full", "rag_bm25"], [0.5], [None], [LARGE])


def test_a_limit_the_full_cache_exceeds_streams_under_it(engine, run):
    _, _, outcome = run
    assert outcome.prefills == 1 and outcome.rows_written == 2 * 4
    sample = make_sample(0)
    prefix = engine.prompt(sample.context, "").prefix_ids
    assert prefix.numel() * kv_bytes_per_token(engine) > SMALL
    rows = [row for row in outcome.rows if row["policy"] == "snapkv stream≤96KiB"]
    assert len(rows) == 2
    for row in rows:
        assert row["streamed"] and row["max_kv_memory"] == SMALL and row["stream_compressions"] > 1
        assert 0 < row["peak_kv_bytes"] <= SMALL and row["stream_chunk_tokens"] < prefix.numel()
        assert row["kv_bytes_kept"] < row["kv_bytes_full"]
    # the row's answer is the streamed cache's, with the question fed after it as in the plain cell
    policy = make_policy("snapkv")
    budget = resolve_budget(0.9, None, int(prefix.numel()))
    streamed = streaming_prefill(engine, prefix, policy, budget, chunk_tokens=rows[0]["stream_chunk_tokens"])
    question = engine.question_ids(sample.questions[0], sample.answer_prefix)
    generation = engine.continue_and_decode(streamed.cache, question, None, max_new_tokens=sample.max_new_tokens,
                                            sampling=GREEDY)
    answer = engine.tokenizer.decode(generation.token_ids, skip_special_tokens=True).strip()
    assert by_policy(rows)["snapkv stream≤96KiB"]["prediction"] == answer


def test_a_limit_the_full_cache_fits_is_the_plain_cell_recorded_unstreamed(run):
    _, _, outcome = run
    for index in (0, 1):
        rows = by_policy(outcome.rows, index)
        fitting, plain = rows["snapkv stream≤1MiB"], rows["snapkv"]
        assert not fitting["streamed"] and fitting["stream_chunk_tokens"] is None
        assert fitting["peak_kv_bytes"] == plain["kv_bytes_full"] <= LARGE
        for name in ("prediction", "kl_vs_full", "kv_bytes_kept", "kept_tokens", "matches_full"):
            assert fitting[name] == plain[name], name
        assert "streamed" not in plain and fitting["decode_rows"] == 3  # full, snapkv, streamed: decoded once each


def test_summaries_and_resume_keep_streamed_cells_apart(engine, run):
    path, cells, _ = run
    labels = {cell_label(row) for row in summarize(ResultsFile(path).rows) if row["task"] == "all"}
    assert labels == {"full", "snapkv @ 0.9", "snapkv @ 0.9 stream≤96KiB", "snapkv @ 0.9 stream≤1MiB"}
    again = run_grid(engine, [make_sample(0)], cells, ResultsFile(path), progress=False)
    assert (again.rows_written, again.prefills, again.cells_skipped) == (0, 0, 8)


def test_query_aware_streaming_is_refused(engine, tmp_path):
    with pytest.raises(ParameterError, match="query-agnostic"):
        run_grid(engine, [make_sample(0)], grid(["snapkv"], [0.9], [None], [SMALL]),
                 ResultsFile(tmp_path / "r.jsonl"), query_aware=True, progress=False)


def test_cli_parses_limits_and_builds_the_same_grid_for_every_worker():
    from kvlab.bench.session import BenchRequest

    args = build_parser().parse_args(["bench", "--policies", "full,snapkv", "--ratios", "0.5",
                                      "--max-kv-memory", "64MiB, 1GB"])
    request = BenchRequest.from_cli(args)
    assert request.max_kv_memory == (64 * 2**20, 10**9)
    assert [cell.label for cell in request.cells()] == ["full", "snapkv", "snapkv stream≤64MiB", "snapkv stream≤1GB"]


@pytest.mark.parametrize("argv, fragment", [
    (["--max-kv-memory", "64"], "has no unit"),
    (["--max-kv-memory", "lots"], "cannot read size"),
    (["--max-kv-memory", ","], "--max-kv-memory needs"),
    (["--max-kv-memory", "64MiB", "--query-aware"], "query-agnostic"),
    (["--max-kv-memory", "64MiB", "--policies", "full"], "evict"),
])
def test_cli_mistakes_end_in_one_line(tmp_path, capsys, argv, fragment):
    data = tmp_path / "cases.jsonl"
    data.write_text(json.dumps({"context": PROSE, "question": "Who counted?", "answers": ["master"]}) + "\n")
    assert main(["bench", "--model", "tiny-llama", "--data", str(data), "--policies", "full,snapkv",
                 "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]


def test_cli_run_reports_streamed_cells_and_resumes(tmp_path, capsys):
    data = tmp_path / "cases.jsonl"
    data.write_text(json.dumps({"context": f"{PROSE}The code word is heron. {PROSE}",
                                "question": "What is the code word?", "answers": ["heron"],
                                "max_new_tokens": 4}) + "\n")
    argv = ["bench", "--model", "tiny-llama", "--data", str(data), "--policies", "full,snapkv", "--ratios", "0.9",
            "--max-kv-memory", "96KiB", "--mode", "multi-request", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    assert "3 rows from 1 prefills" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [row["streamed"] for row in rows if "streamed" in row] == [True]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| snapkv @ 0.9 stream≤96KiB | 1 of 1 |" in report
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["meta"]["max_kv_memory"] == [96 * 1024]
    assert main(argv) == 0
    assert "0 rows from 0 prefills" in capsys.readouterr().out
