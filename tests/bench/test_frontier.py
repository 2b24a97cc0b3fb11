"""The budget frontier: Pareto marking, the best cell per memory budget, and their place in the report."""

import pytest

from kvlab.bench.report import write_report
from kvlab.bench.summary import best_per_budget, budget_table, fraction_label, frontier

FULL_FP16_BYTES = 1000


def cell(policy: str, score: float, fraction: float | None, quantization: str | None = None,
         ratio: float = 0.5, stderr: float = 0.05, n: int = 10) -> dict:
    """An overall summary row (task "all", length 0) holding ``fraction`` of the fp16 full bytes."""
    return {"policy": policy, "ratio": 0.0 if policy == "full" else ratio, "quantization": quantization,
            "task": "all", "length": 0, "score": score, "stderr": stderr, "n": n,
            "kv_bytes_kept": None if fraction is None else fraction * FULL_FP16_BYTES,
            "kv_bytes_full_fp16": FULL_FP16_BYTES}


def marked(summary: list[dict]) -> set[tuple]:
    return {(row["policy"], row["ratio"], row["quantization"]) for row in frontier(summary) if row["pareto"]}


def test_dominated_cells_are_not_on_the_frontier():
    summary = [cell("full", 0.9, 1.0), cell("snapkv", 0.8, 0.5), cell("knorm", 0.6, 0.5),  # same memory, lower
               cell("h2o", 0.8, 0.75),                                                     # same score, more memory
               cell("snapkv", 0.4, 0.125, "int4"),
               cell("knorm", 0.3, 0.25, "int8")]                                           # more memory, lower
    assert marked(summary) == {("full", 0.0, None), ("snapkv", 0.5, None), ("snapkv", 0.5, "int4")}


def test_identical_cells_are_both_marked_and_cells_without_bytes_never():
    # tova scores highest but, holding no byte figures, can neither be marked nor dominate the others
    summary = [cell("snapkv", 0.7, 0.5), cell("h2o", 0.7, 0.5), cell("tova", 1.0, None), cell("knorm", 0.1, 0.5)]
    rows = frontier(summary)
    assert marked(summary) == {("snapkv", 0.5, None), ("h2o", 0.5, None)}
    assert rows[-1]["policy"] == "tova" and rows[-1]["memory_fraction"] is None  # unplaced cells sort last


def test_frontier_uses_only_the_overall_rows_and_the_fraction_of_fp16_bytes():
    per_task = {**cell("knorm", 1.0, 0.01), "task": "vt"}
    rows = frontier([cell("snapkv", 0.5, 0.3), per_task, {**cell("snapkv", 1.0, 0.01), "length": 1024}])
    assert [row["memory_fraction"] for row in rows] == [pytest.approx(0.3)]


def test_best_per_budget_picks_the_best_cell_that_fits():
    summary = [cell("full", 0.8, 1.0), cell("snapkv", 0.9, 0.5), cell("snapkv", 0.6, 0.25, "int8"),
               cell("knorm", 0.6, 0.2, "int8"), cell("streaming_llm", 0.3, 0.1, "int4")]
    best = {entry["budget"]: entry["best"] for entry in best_per_budget(summary)}
    assert best[1.0]["policy"] == "snapkv" and best[1.0]["quantization"] is None   # beats full, fits under 1
    assert best[0.5]["policy"] == "snapkv" and best[0.5]["memory_fraction"] == pytest.approx(0.5)
    # equal scores at 1/4: the cell with the smaller memory wins
    assert best[0.25]["label"] == "knorm @ 0.5 int8"
    assert best[0.25]["compression"] == pytest.approx(5.0)
    assert best[0.125]["policy"] == "streaming_llm"
    assert best[0.0625] is None                                                      # nothing fits


def test_share_of_full_divides_by_the_unquantized_full_score():
    summary = [cell("full", 0.8, 1.0), cell("full", 0.4, 0.25, "int4"), cell("snapkv", 0.6, 0.5)]
    best = {entry["budget"]: entry["best"] for entry in best_per_budget(summary, budgets=(1.0, 0.5, 0.25))}
    assert best[1.0]["share_of_full"] == pytest.approx(1.0)
    assert best[0.5]["share_of_full"] == pytest.approx(0.75)
    assert best[0.25]["share_of_full"] == pytest.approx(0.5)                         # full int4 is not the reference
    without_full = best_per_budget([cell("snapkv", 0.6, 0.5), cell("h2o", 0.5, 0.25)], budgets=(1.0,))
    assert without_full[0]["best"]["share_of_full"] is None


def test_budget_table_rows():
    summary = [cell("full", 0.8, 1.0), cell("snapkv", 0.6, 0.25, "int8", stderr=0.1, n=4)]
    lines = budget_table(summary).splitlines()
    assert lines[0] == "### Best cell per memory budget"
    rows = {line.split(" | ")[0]: line for line in lines if line.startswith("| ≤")}
    assert rows["| ≤ 1/4 (4x)"] == "| ≤ 1/4 (4x) | snapkv @ 0.5 int8 | 0.600 ± 0.100 | 4 | 0.250 | 4.00x | 75% |"
    assert rows["| ≤ 1/16 (16x)"].startswith("| ≤ 1/16 (16x) | nothing fits |")
    assert budget_table([cell("full", 0.8, 1.0)]) == ""                              # one cell: no section


def test_fraction_labels():
    assert [fraction_label(x) for x in (2.0, 1.0, 0.5, 0.0625, 0.3)] == ["2", "1", "1/2", "1/16", "0.3"]


def result_row(policy: str, ratio: float, quantization: str | None, sample: int, score: float,
               kept_bytes: int) -> dict:
    return {"policy": policy, "ratio": ratio, "quantization": quantization, "task": "vt", "length_tokens": 512,
            "score": score, "matches_full": score == 1.0, "question_index": 0, "sample_id": sample,
            "depth": None, "kl_vs_full": 0.01, "kv_bytes_kept": kept_bytes, "kv_bytes_full": 4096,
            "kv_bytes_full_fp16": 4096, "kept_tokens": 100, "compress_s": 0.0, "decode_s": 0.1, "prefill_s": 0.1}


def test_report_has_the_frontier_figure_and_the_budget_table(tmp_path):
    rows = []
    for sample in range(3):
        for policy, ratio, quantization, kept in (("full", 0.0, None, 4096), ("full", 0.0, "int4", 1100),
                                                  ("snapkv", 0.5, None, 2048), ("snapkv", 0.5, "int4", 560)):
            rows.append(result_row(policy, ratio, quantization, sample, float(sample > 0 or policy == "full"), kept))
    paths = write_report(tmp_path, rows, {"model": "hand-made"})
    page = paths["html"].read_text()
    assert "<h2>Budget frontier: score vs memory</h2>" in page
    frontier_section = page.split("<h2>Budget frontier: score vs memory</h2>")[1].split("<h2>")[0]
    assert "data:image/png;base64," in frontier_section and "<figcaption>" in frontier_section
    assert "<h2>Best cell per memory budget</h2>" in page and "<td>≤ 1/4 (4x)</td>" in page
    markdown = paths["markdown"].read_text()
    assert "### Best cell per memory budget" in markdown
    # full int4 holds 1100/4096 of the fp16 bytes (> 1/4), so at 1/4 only snapkv int4 (560/4096) fits
    assert "| ≤ 1/4 (4x) | snapkv @ 0.5 int4 | 0.667 ± 0.333 | 3 | 0.137 | 7.31x | 67% |" in markdown
    # full and full int4 both score 1: the smaller memory wins
    assert "| ≤ 1 (1x) | full int4 | 1.000 ± 0.000 | 3 | 0.269 | 3.72x | 100% |" in markdown
    assert "| ≤ 1/8 (8x) | nothing fits |" in markdown
