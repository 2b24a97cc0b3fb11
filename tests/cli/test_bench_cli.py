"""`kvlab bench` and `kvlab report` end to end on the tiny model: files, resume, custom data, one-line errors."""

from __future__ import annotations

import json

import pytest

from kvlab.cli import main


@pytest.fixture()
def data_file(tmp_path):
    rows = [
        {"id": "a", "context": "The lighthouse keeper logged the storm. The code word is heron. " * 8,
         "question": "What is the code word?", "answers": ["heron"], "max_new_tokens": 4},
        {"context": "Ships came and went all winter. The harbour fee was nine coins. " * 8,
         "questions": ["What was the fee?", "Repeat it."], "answers": [["nine"], ["nine"]],
         "metric": "contains_all", "max_new_tokens": 4},
    ]
    path = tmp_path / "cases.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def bench(out, data_file, *extra):
    return main(["bench", "--model", "tiny-llama", "--data", str(data_file), "--policies", "full,snapkv",
                 "--ratios", "0.5", "--out", str(out), *extra])


def test_bench_with_custom_data_writes_everything_and_resumes(tmp_path, data_file, capsys):
    out = tmp_path / "run"
    assert bench(out, data_file) == 0
    printed = capsys.readouterr().out
    assert "6 rows from 2 prefills" in printed and f"report: {out}/report.html" in printed
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {row["task"] for row in rows} == {"cases"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["prefills"] == 2 and summary["meta"]["model"] == "tiny-llama"
    assert {"policy", "ratio", "task", "length", "score", "n"} <= set(summary["rows"][0])
    assert bench(out, data_file) == 0
    assert "0 rows from 0 prefills" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    assert "| policy @ ratio | score |" in capsys.readouterr().out


def test_bench_multi_turn_mode_reports_turns(tmp_path, data_file, capsys):
    out = tmp_path / "turns"
    assert bench(out, data_file, "--mode", "multi-turn") == 0
    assert "turn 2" in (out / "report.md").read_text()


@pytest.mark.parametrize("argv, fragment", [
    (["--ratios", "1.5"], "ratios must be in"),
    (["--lengths", "10"], "--lengths"),
    (["--quantize", "int3"], "unknown quantization"),
    (["--mode", "multi-turn", "--query-aware"], "needs mode single"),
])
def test_bench_mistakes_end_in_one_line(tmp_path, data_file, capsys, argv, fragment):
    assert bench(tmp_path / "bad", data_file, *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]


def test_bad_data_row_names_the_line(tmp_path, capsys):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"context": "x", "question": "q", "answers": ["a"]}\n{"context": "x", "answers": ["a"]}\n')
    assert main(["bench", "--model", "tiny-llama", "--data", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "line 2" in capsys.readouterr().err


def test_report_of_an_empty_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no results.jsonl" in capsys.readouterr().err


def test_weights_and_kv_quant_cells_report_their_costs(tmp_path, data_file, capsys):
    out = tmp_path / "int8"
    assert bench(out, data_file, "--weights", "int8", "--kv-quant", "none,int4") == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    fidelity = summary["meta"]["weights_fidelity_vs_fp"]
    assert summary["meta"]["weights"] == "int8"
    assert 0 <= fidelity["kl_mean"] < 1 and 0 < fidelity["top1_agreement"] <= 1
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {row["quantization"] for row in rows} == {None, "int4"}
    for row in rows:
        assert row["compression"] == pytest.approx(row["kv_bytes_full_fp16"] / row["kv_bytes_kept"], rel=1e-3)
    held = {row["quantization"]: row["kv_bytes_kept"] for row in rows if row["policy"] == "full"}
    assert held["int4"] < held[None]
    assert "weights_fidelity_vs_fp" in (out / "report.md").read_text()
