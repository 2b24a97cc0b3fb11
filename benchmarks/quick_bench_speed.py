"""Wall time of `kvlab bench --preset quick` for this tree against a baseline commit, measured in one run on one
machine (the baseline first, then this tree), with the two results' scores side by side. Writes JSON.

The baseline is checked out into a temporary git worktree and run with its own source on PYTHONPATH, in the same
Python environment (the dependencies must suit both). Each run writes to a fresh folder, so nothing is resumed.

    python benchmarks/quick_bench_speed.py --baseline 7bbf9ce --out benchmarks/results/quick_bench_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import environment, write_json

ROOT = Path(__file__).resolve().parents[1]


def run_quick(source: Path, out: Path, extra: list[str]) -> tuple[float, list[dict]]:
    env = {**os.environ, "PYTHONPATH": str(source)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kvlab", "bench", "--preset", "quick", "--out", str(out), *extra],
                   cwd=source, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    return wall, rows


def scores(rows: list[dict]) -> dict[str, float]:
    cells: dict[str, list[float]] = {}
    for row in rows:
        label = f"{row['policy']}@{row['ratio']}" + (f" {row['quantization']}" if row.get("quantization") else "")
        cells.setdefault(label, []).append(row["score"])
    return {label: sum(values) / len(values) for label, values in sorted(cells.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="git commit or ref to compare with")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvlab-quick-") as folder:
        tree = Path(folder) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.baseline], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            baseline_s, baseline_rows = run_quick(tree, Path(folder) / "baseline-out", [])
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False,
                           capture_output=True)
        current_s, current_rows = run_quick(ROOT, Path(folder) / "current-out", [])
    ratio = current_s / baseline_s
    print(f"kvlab bench --preset quick: baseline {args.baseline} {baseline_s:.1f} s, this tree {current_s:.1f} s, "
          f"x{ratio:.2f} of the baseline's wall time")
    before, after = scores(baseline_rows), scores(current_rows)
    for label in sorted(set(before) | set(after)):
        print(f"  {label:24s} score {before.get(label, float('nan')):.3f} -> {after.get(label, float('nan')):.3f}")
    write_json(args.out, {"benchmark": "quick_bench_speed", "baseline": args.baseline, "baseline_wall_s": baseline_s,
                          "current_wall_s": current_s, "wall_ratio": ratio, "baseline_scores": before,
                          "current_scores": after, "rows": len(current_rows), "environment": environment()})


if __name__ == "__main__":
    main()
