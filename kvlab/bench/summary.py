"""Aggregate result rows into summary rows (policy x ratio x task x length) and render the markdown tables."""

from __future__ import annotations

import math
from collections import defaultdict

ALL = "all"
MEANS = ("kl_vs_full", "kv_bytes_kept", "kv_bytes_full", "kept_tokens", "compress_s", "decode_s", "prefill_s")


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n); 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((value - mean) ** 2 for value in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def summarize(rows: list[dict]) -> list[dict]:
    """One summary row per (policy, ratio, task, length), plus ``task="all"`` and ``length=0`` aggregates."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        for task in (row["task"], ALL):
            for length in (row["length_tokens"], 0):
                groups[(row["policy"], row["ratio"], task, length)].append(row)
    summary = []
    for (policy, ratio, task, length), members in sorted(groups.items(), key=_order):
        score, stderr = mean_and_stderr([row["score"] for row in members])
        entry = {"policy": policy, "ratio": ratio, "task": task, "length": length, "score": score,
                 "stderr": stderr, "n": len(members),
                 "matches_full": sum(bool(row["matches_full"]) for row in members) / len(members)}
        for name in MEANS:
            entry[name] = sum(row[name] for row in members) / len(members)
        summary.append(entry)
    return summary


def _order(item):
    (policy, ratio, task, length), _ = item
    return (policy != "full", policy, ratio, task != ALL, task, length)


def overall(summary: list[dict]) -> list[dict]:
    return [row for row in summary if row["task"] == ALL and row["length"] == 0]


def cell_label(row: dict) -> str:
    return row["policy"] if row["policy"] == "full" else f"{row['policy']} @ {row['ratio']:g}"


def markdown_tables(summary: list[dict]) -> str:
    """Overall table (score ± stderr, fidelity, memory) and a per-task score table, both policy x ratio."""
    totals = overall(summary)
    tasks = sorted({row["task"] for row in summary if row["task"] != ALL})
    lines = ["| policy @ ratio | score | n | KL vs full (nats/tok) | same answer as full | KV MiB kept | kept tok |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in sorted(totals, key=lambda r: (-r["score"], r["policy"], r["ratio"])):
        lines.append(f"| {cell_label(row)} | {row['score']:.3f} ± {row['stderr']:.3f} | {row['n']} "
                     f"| {row['kl_vs_full']:.4f} | {row['matches_full']:.0%} | {row['kv_bytes_kept'] / 2**20:.2f} "
                     f"| {row['kept_tokens']:.0f} |")
    by_cell = {(row["policy"], row["ratio"], row["task"]): row for row in summary if row["length"] == 0}
    per_task = ["", "| policy @ ratio | " + " | ".join(tasks) + " |", "| --- |" + " --- |" * len(tasks)]
    for row in sorted(totals, key=lambda r: (r["policy"] != "full", r["policy"], r["ratio"])):
        cells = [by_cell.get((row["policy"], row["ratio"], task)) for task in tasks]
        per_task.append(f"| {cell_label(row)} | " + " | ".join(
            f"{cell['score']:.2f} ± {cell['stderr']:.2f}" if cell else "-" for cell in cells) + " |")
    return "\n".join(lines + (per_task if len(tasks) > 1 else []))
