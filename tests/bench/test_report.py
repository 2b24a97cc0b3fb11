"""The bench report reads as a conclusion: one header for `kvlab bench` and `kvlab report`, a summary that says which
cells are within noise of the full cache and which lose, a caption under every table and plot, the latency and
memory table."""

from __future__ import annotations

import json
import re

import pytest

from kvlab.bench.report import write_report
from kvlab.bench.summary import (
    ERROR_BARS,
    compare_with_full,
    conclusion,
    duration_words,
    latency_table,
    run_header,
    summarize,
    t_95,
)
from kvlab.cli import main

FULL_FP16_BYTES = 1000
# 15 answers; the full cache gets 9 right (0.600)
FULL_SCORES = [1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 1, 0, 0, 1]
# one more right than the full cache (0.667): higher, but one answer in 15 is noise
SNAPKV_SCORES = [1, 1, 1, 1, 0, 1, 0, 1, 1, 0, 1, 1, 0, 0, 1]
STREAMING_SCORES = [0] * 15  # loses every answer the full cache had


def row(policy: str, ratio: float, sample: int, score: float, kept_bytes: int, task: str = "vt",
        quantization: str | None = None, **extra) -> dict:
    return {"policy": policy, "ratio": ratio, "quantization": quantization, "task": task, "length_tokens": 1024,
            "sample_id": f"{task}/s{sample}", "question_index": 0, "depth": None, "score": float(score),
            "matches_full": policy == "full", "kl_vs_full": 0.0 if policy == "full" else 0.05,
            "kv_bytes_kept": kept_bytes, "kv_bytes_full": 2 * FULL_FP16_BYTES, "kv_bytes_full_fp16": FULL_FP16_BYTES,
            "kept_tokens": 100.0, "prefill_s": 2.0, "compress_s": 0.5, "question_s": 0.1, "decode_s": 1.0,
            "decode_tokens": 8, **extra}


def graded_rows() -> list[dict]:
    """full (fp32: 2x the fp16 bytes), snapkv @ 0.5 at 1/5 of them, streaming_llm @ 0.75 at 1/10."""
    return ([row("full", 0.0, i, s, 2000) for i, s in enumerate(FULL_SCORES)]
            + [row("snapkv", 0.5, i, s, 200) for i, s in enumerate(SNAPKV_SCORES)]
            + [row("streaming_llm", 0.75, i, s, 100) for i, s in enumerate(STREAMING_SCORES)])


def test_a_higher_score_within_noise_is_not_called_better_and_a_clear_loss_is_called_a_loss():
    rows = graded_rows()
    sentences = conclusion(rows, summarize(rows))
    assert sentences[0] == "The full cache scores 0.600 on 15 answers; 2 other cells are compared with it."
    assert sentences[1].startswith("Within noise of it (1): snapkv @ 0.5 (0.667, memory 0.20 of fp16 full; +0.067 [")
    assert sentences[2].startswith("Below it beyond noise (1): streaming_llm @ 0.75 (0.000, memory 0.10 of fp16 full; "
                                   "-0.600 [")
    assert not any(sentence.startswith("Above") for sentence in sentences)
    assert sentences[3] == ("Best cell per memory budget (of the fp16 full cache's bytes): ≤ 1, 1/2 and 1/4: snapkv @ "
                            "0.5 (0.667, 5.0x smaller than the fp16 full cache, within noise of the full cache); "
                            "≤ 1/8: streaming_llm @ 0.75 (0.000, 10.0x smaller than the fp16 full cache, below the "
                            "full cache beyond noise); ≤ 1/16: nothing fits.")


def test_the_noise_interval_is_a_paired_student_t_interval():
    found = compare_with_full(graded_rows())
    snapkv = found["snapkv @ 0.5"]
    differences = [b - a for a, b in zip(FULL_SCORES, SNAPKV_SCORES)]
    mean = sum(differences) / 15
    stderr = (sum((d - mean) ** 2 for d in differences) / 14 / 15) ** 0.5
    assert snapkv["paired"] and snapkv["n"] == 15 and snapkv["verdict"] == "within noise"
    assert (snapkv["low"], snapkv["high"]) == pytest.approx((mean - 2.145 * stderr, mean + 2.145 * stderr))
    assert found["streaming_llm @ 0.75"]["verdict"] == "below" and found["streaming_llm @ 0.75"]["high"] < 0
    assert t_95(14) == 2.145 and t_95(200) == pytest.approx(1.972)


def test_cells_on_other_samples_are_compared_unpaired_and_one_answer_is_too_few():
    rows = ([row("full", 0.0, i, s, 2000) for i, s in enumerate(FULL_SCORES)]
            + [row("h2o", 0.5, 100 + i, 1, 500) for i in range(15)]          # other samples, all right
            + [row("knorm", 0.5, 0, 1, 500)])                                # one answer
    found = compare_with_full(rows)
    assert not found["h2o @ 0.5"]["paired"] and found["h2o @ 0.5"]["verdict"] == "above"
    assert found["knorm @ 0.5"]["verdict"] == "too few" and found["knorm @ 0.5"]["low"] is None
    assert "Too few answers to compare (1): knorm @ 0.5 (1.000, memory 0.50 of fp16 full)." in conclusion(
        rows, summarize(rows))


def test_without_a_full_cache_cell_nothing_is_compared():
    rows = [row("snapkv", 0.5, i, s, 200) for i, s in enumerate(SNAPKV_SCORES)]
    assert compare_with_full(rows) == {}
    assert conclusion(rows, summarize(rows))[0].startswith("No full-cache cell (policy full without quantization)")


def test_latency_and_memory_table_gives_seconds_rates_and_bytes_against_fp16():
    rows = [row("full", 0.0, 0, 1, 2 * 2**20, kv_bytes_full_fp16=2**20),
            row("snapkv", 0.5, 0, 1, 2**19, kv_bytes_full_fp16=2**20, decode_rows=2),
            row("snapkv", 0.5, 1, 1, 2**19, kv_bytes_full_fp16=2**20, decode_rows=2, decode_s=3.0)]
    for item in rows:
        item["compression"] = item["kv_bytes_full_fp16"] / item["kv_bytes_kept"]
    lines = latency_table(summarize(rows)).splitlines()
    assert lines[0] == ("| policy @ ratio | prefill s | compress s | question s | decode s | cells per decode loop "
                        "| decode tok/s | KV MiB held | fp16 full MiB | compression vs fp16 |")
    # the full cache decoded alone: 8 tokens in 1 s; snapkv shared its loop, so no per-cell rate
    assert lines[2] == "| full | 2.00 | 0.500 | 0.100 | 1.00 | 1 | 8.0 | 2.00 | 1.00 | 0.50x |"
    assert lines[3] == "| snapkv @ 0.5 | 2.00 | 0.500 | 0.100 | 2.00 | 2 | - | 0.50 | 1.00 | 2.00x |"


def report_rows() -> list[dict]:
    """graded_rows plus needle rows with depths, so every table and plot of the report has something to show."""
    needles = [row(policy, ratio, i, s, kept, task="niah_single_1", depth=depth)
               for policy, ratio, kept in (("full", 0.0, 2000), ("snapkv", 0.5, 200))
               for i, (s, depth) in enumerate(((1, 0.0), (0, 0.5), (1, 1.0)))]
    return graded_rows() + needles


def test_every_table_and_plot_has_a_caption_and_the_plus_minus_is_defined_once(tmp_path):
    paths = write_report(tmp_path, report_rows(), {"model": "hand-made"})
    page = paths["html"].read_text()
    sections = page.split("<h2>")[1:]
    titles = [section.split("</h2>")[0] for section in sections]
    assert titles == ["Summary", "Scores", "Score per task", "Best cell per memory budget",
                      "Best cell per budget and task type", "Latency and memory",
                      "Score vs eviction ratio", "Budget frontier: score vs memory",
                      "Needle retrieval by depth and length", "Fidelity vs KV bytes kept"]
    for title, section in zip(titles[1:], sections[1:]):
        caption = re.search(r"<figcaption>(.+?)</figcaption>", section)
        assert caption and len(caption.group(1)) > 80, title
        assert ("<table>" in section) != ("data:image/png;base64," in section), title
    assert page.count("one standard error of the mean score") == 1 and ERROR_BARS in page.replace("&#x27;", "'")
    markdown = paths["markdown"].read_text()
    blocks = markdown.split("\n### ")[1:]
    assert [block.split("\n")[0] for block in blocks] == ["Summary"] + titles[1:6]
    for block in blocks[1:]:                                  # each table is followed by its caption
        table, caption = block.split("\n\n")[1:3]
        assert table.startswith("| policy") or table.startswith("| budget")
        assert len(caption) > 80 and not caption.startswith("|")
    assert "- Within noise of it (1): snapkv @ 0.5" in markdown


def test_summary_json_keeps_the_header_and_the_verdicts(tmp_path):
    paths = write_report(tmp_path, graded_rows(), {"model": "hand-made"})
    summary = json.loads(paths["summary"].read_text())
    assert summary["compared_with_full"]["snapkv @ 0.5"]["verdict"] == "within noise"
    assert summary["header"]["Context lengths"] == "1,024 tokens"
    assert summary["conclusion"][0].startswith("The full cache scores 0.600")


@pytest.mark.parametrize("seconds, words", [(0.42, "0.4 s"), (42.2, "42 s"), (235.850825336, "3 min 56 s"),
                                            (7500, "2 h 5 min")])
def test_wall_time_in_human_units(seconds, words):
    assert duration_words(seconds) == words


def test_header_in_words_from_the_rows_and_the_run_file():
    rows = [row(policy, ratio, i, 1, 2000, task=task, length_tokens=length, sample_id=f"{task}/{length}/s{i}",
                model="smollm2-135m", weights="fp")
            for task in ("vt", "niah_single_1") for length in (1024, 4096) for i in range(2)
            for policy, ratio in (("full", 0.0), ("snapkv", 0.5))]
    header = dict(run_header(rows, {"wall_s": 235.850825336, "prefills": 8, "last_run_started": "2026-12-01T22:50:27",
                                    "query_aware": False}))
    assert header == {
        "Model": "smollm2-135m, its own weights",
        "Tasks": "2 (niah_single_1, vt)",
        "Context lengths": "1,024 and 4,096 tokens",
        "Samples": "8 (2 per task and length); 16 answers over 2 cells",
        "Setting": "query-agnostic: each document is compressed before its question is seen",
        "Machine": "not recorded for this run",
        "Date": "2026-12-01 22:50 (start of the last run into this folder, local time)",
        "Wall time": "3 min 56 s, 8 prefills"}


@pytest.fixture()
def data_file(tmp_path):
    rows = [{"id": "a", "context": "The lighthouse keeper logged the storm. The code word is heron. " * 8,
             "question": "What is the code word?", "answers": ["heron"], "max_new_tokens": 4},
            {"id": "b", "context": "Ships came and went all winter. The harbour fee was nine coins. " * 8,
             "question": "What was the fee?", "answers": ["nine"], "max_new_tokens": 4}]
    path = tmp_path / "cases.jsonl"
    path.write_text("\n".join(json.dumps(item) for item in rows) + "\n")
    return path


def test_bench_and_report_print_the_same_header(tmp_path, data_file, capsys):
    out = tmp_path / "run"
    assert main(["bench", "--model", "tiny-llama", "--data", str(data_file), "--policies", "full,snapkv",
                 "--ratios", "0.5", "--out", str(out)]) == 0
    bench_header = capsys.readouterr().out.split("\n\n")[0]
    assert main(["report", str(out)]) == 0
    report_header = capsys.readouterr().out.split("\n\n")[0]
    assert report_header == bench_header
    lines = dict(line.split(": ", 1) for line in bench_header.splitlines())
    assert list(lines) == ["Model", "Tasks", "Context lengths", "Samples", "Setting", "Machine", "Date", "Wall time"]
    assert lines["Model"].startswith("tiny-llama, its own weights") and lines["Tasks"] == "1 (cases)"
    assert lines["Samples"] == "2 (2 per task and length); 4 answers over 2 cells"
    assert re.fullmatch(r"\d+\.\d s, 2 prefills", lines["Wall time"])           # not `wall_s: 0.83142...`
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d \(.+\)", lines["Date"])
    assert re.fullmatch(r".+ CPU, \d+ cores, \d+ torch threads, torch .+", lines["Machine"])  # recorded in run.json
    assert "- Wall time: " + lines["Wall time"] in (out / "report.md").read_text()


def family_rows() -> list[dict]:
    """Two task types; full (fp32), snapkv (KV) at 1/5, rag_bm25 (input, reads the question) and selective_context
    (input, query-agnostic) at 1/10 of the fp16 bytes. rag wins on qa, snapkv on vt."""
    rows = []
    for task in ("qa_1", "qa_2", "vt"):
        for i in range(4):
            rows.append(row("full", 0.0, i, 1, 2000, task=task, family="kv"))
            rows.append(row("snapkv", 0.5, i, int(task == "vt"), 200, task=task, family="kv"))
            rows.append(row("rag_bm25", 0.9, i, int(task != "vt"), 100, task=task, family="input",
                            method_query_aware=True, prefill_s=0.2, compress_s=0.1))
            rows.append(row("selective_context", 0.9, i, 0, 100, task=task, family="input",
                            method_query_aware=False, prefill_s=0.2, compress_s=1.2))
    return rows


def test_the_best_cell_per_budget_is_given_per_family_and_per_task_type():
    from kvlab.bench.summary import best_per_family_table, best_per_task_type_table

    rows = family_rows()
    summary = summarize(rows)
    families = best_per_family_table(summary).splitlines()
    assert families[0] == ("| budget (of fp16 full) | KV policy | input, query-agnostic | input, reads the question |")
    assert "| ≤ 1/8 | nothing fits | selective_context @ 0.9: 0.000 | rag_bm25 @ 0.9: 0.667 |" in families
    assert "| ≤ 1/4 | snapkv @ 0.5: 0.333 | selective_context @ 0.9: 0.000 | rag_bm25 @ 0.9: 0.667 |" in families
    types = best_per_task_type_table(rows).splitlines()
    assert types[0] == "| budget (of fp16 full) | qa | vt |"  # qa_1 and qa_2 pooled
    assert "| ≤ 1/4 | rag_bm25 @ 0.9: 1.000 | snapkv @ 0.5: 1.000 |" in types
    # a grid of KV policies only has no family table
    assert best_per_family_table(summarize([r for r in rows if r["family"] == "kv"])) == ""


def test_the_latency_table_shows_an_input_methods_prefill_saved_net_of_its_own_time():
    table = latency_table(summarize(family_rows())).splitlines()
    assert table[0].endswith("| prefill saved |")
    rag = next(line for line in table if line.startswith("| rag_bm25 @ 0.9 |"))
    selective = next(line for line in table if line.startswith("| selective_context @ 0.9 |"))
    snapkv = next(line for line in table if line.startswith("| snapkv @ 0.5 |"))
    assert rag.endswith("| +85% |")  # (2.0 - 0.2 - 0.1) / 2.0
    assert selective.endswith("| +30% |")  # (2.0 - 0.2 - 1.2) / 2.0
    assert snapkv.endswith("| - |")
    assert not latency_table(summarize(graded_rows())).splitlines()[0].endswith("prefill saved |")
