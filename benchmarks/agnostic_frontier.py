"""The query-agnostic budget frontier of one model, merged from several `kvlab bench` runs.

Each run folder holds a `results.jsonl` written by `kvlab bench` (query-agnostic, single mode). Rows are merged
(a row measured in two runs, such as the `full` reference, counts once), the report is rebuilt in `--out` (tables,
the budget frontier plot and the best cell per memory budget) and the best cells are printed and written as JSON
with the targets of the query-agnostic issue: at <= 1/4 of the fp16 full cache's bytes the best cell should keep
>= 95% of the full cache's score, at <= 1/8 >= 90%.

    python benchmarks/agnostic_frontier.py --runs benchmarks/results/agnostic_smollm2 \
        benchmarks/results/agnostic_smollm2_more --out benchmarks/results/agnostic_smollm2_all \
        --json benchmarks/results/agnostic_frontier_smollm2.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import environment

from kvlab.bench.report import write_report
from kvlab.bench.results import ResultsFile, cell_key
from kvlab.bench.summary import best_per_budget, fraction_label, frontier, summarize
from kvlab.fileio import atomic_write_text

TARGETS = {0.25: 0.95, 0.125: 0.90}  # budget (fraction of fp16 full bytes) -> share of the full cache's score


def merged_rows(folders: list[Path], common_samples: bool = False) -> list[dict]:
    """Rows of every folder, each measurement once; with ``common_samples`` only the samples every run measured, so
    all cells are compared on the same cases."""
    rows: dict[tuple, dict] = {}
    samples_per_run = []
    for folder in folders:
        run_rows = [row for row in ResultsFile(folder / "results.jsonl").rows
                    if row.get("mode", "single") == "single" and not row["query_aware"]]
        samples_per_run.append({row["sample_id"] for row in run_rows})
        for row in run_rows:
            rows.setdefault(cell_key(row), row)
    common = set.intersection(*samples_per_run) if samples_per_run else set()
    return [row for row in rows.values() if not common_samples or row["sample_id"] in common]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="kvlab bench output folders of one model")
    parser.add_argument("--out", required=True, help="folder for the merged results and report")
    parser.add_argument("--json", required=True, help="where to write the best cells per budget")
    parser.add_argument("--common-samples", action="store_true",
                        help="keep only the samples every run measured (runs with different --samples)")
    args = parser.parse_args()
    folders = [Path(folder) for folder in args.runs]
    rows = merged_rows(folders, args.common_samples)
    if not rows:
        raise SystemExit("no query-agnostic single-mode rows in those folders")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    models = sorted({row.get("model", "?") for row in rows})
    meta = {"model": ", ".join(models), "mode": "single", "query_aware": False, "rows": len(rows),
            "samples": len({row["sample_id"] for row in rows}), "runs": [str(folder) for folder in folders]}
    write_report(out, rows, meta)
    summary = summarize(rows)
    best = best_per_budget(summary)
    full = next((cell for cell in frontier(summary) if cell["policy"] == "full" and not cell["quantization"]), None)
    print(f"{meta['model']}: {len(rows)} rows over {meta['samples']} samples; full cache score "
          f"{'-' if full is None else format(full['score'], '.3f')} (n {full['n'] if full else 0})")
    print("| budget (of fp16 full) | best cell | score | memory held | share of full | target |")
    print("| --- | --- | --- | --- | --- | --- |")
    for entry in best:
        cell, budget = entry["best"], entry["budget"]
        target = TARGETS.get(budget)
        wanted = "-" if target is None else f">= {target:.0%}"
        if cell is None:
            print(f"| <= {fraction_label(budget)} | nothing fits | - | - | - | {wanted} |")
            continue
        share = cell["share_of_full"]
        met = "" if target is None or share is None else (" met" if share >= target else " NOT met")
        print(f"| <= {fraction_label(budget)} | {cell['label']} | {cell['score']:.3f} ± {cell['stderr']:.3f} "
              f"(n {cell['n']}) | {cell['memory_fraction']:.3f} | "
              f"{'-' if share is None else format(share, '.0%')} | {wanted}{met} |")
    pareto = [cell for cell in frontier(summary) if cell["pareto"]]
    Path(args.json).write_text(json.dumps({
        "environment": environment(), "runs": meta["runs"], "model": meta["model"], "rows": len(rows),
        "full_score": None if full is None else full["score"], "targets": {str(k): v for k, v in TARGETS.items()},
        "best_per_budget": best,
        "pareto": [{"label": cell["label"] if "label" in cell else cell["policy"], "policy": cell["policy"],
                    "ratio": cell["ratio"], "quantization": cell["quantization"], "score": cell["score"],
                    "memory_fraction": cell["memory_fraction"]} for cell in pareto],
    }, indent=2) + "\n")
    print(f"report: {out / 'report.html'}\nwrote {args.json}")


if __name__ == "__main__":
    main()
