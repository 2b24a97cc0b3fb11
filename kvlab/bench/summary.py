"""Aggregate result rows into summary rows (policy x ratio x task x length), find the memory-budget frontier and
render the markdown tables."""

from __future__ import annotations

import math
from collections import defaultdict

ALL = "all"
BUDGETS = (1.0, 0.5, 0.25, 0.125, 0.0625)  # memory budgets, as fractions of the full cache's bytes at fp16
MEANS = ("kl_vs_full", "kv_bytes_kept", "kv_bytes_full", "kv_bytes_full_fp16", "kept_tokens", "compress_s",
         "decode_s", "prefill_s")


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n); 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((value - mean) ** 2 for value in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def summarize(rows: list[dict]) -> list[dict]:
    """One summary row per (policy, ratio, quantization, task, length), plus ``task="all"`` and ``length=0``
    aggregates. Means skip missing values (KL is not measured in multi-turn mode); None when none is present."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        cell = (row["policy"], row["ratio"], row.get("quantization"))
        # each row counts once per group: --data rows have length 0, the all-lengths key (their n was doubled)
        for task in dict.fromkeys((row["task"], ALL)):
            for length in dict.fromkeys((row["length_tokens"], 0)):
                groups[(*cell, task, length)].append(row)
    summary = []
    for (policy, ratio, quantization, task, length), members in sorted(groups.items(), key=_order):
        score, stderr = mean_and_stderr([row["score"] for row in members])
        entry = {"policy": policy, "ratio": ratio, "quantization": quantization, "task": task, "length": length,
                 "score": score, "stderr": stderr, "n": len(members),
                 "matches_full": sum(bool(row["matches_full"]) for row in members) / len(members)}
        for name in MEANS:
            present = [row[name] for row in members if row.get(name) is not None]
            entry[name] = sum(present) / len(present) if present else None
        full_fp16, kept = entry["kv_bytes_full_fp16"], entry["kv_bytes_kept"]
        entry["compression"] = full_fp16 / kept if full_fp16 and kept else None
        summary.append(entry)
    return summary


def per_turn(rows: list[dict]) -> list[dict]:
    """Score per (cell, question index) for samples with several questions (multi-turn / multi-request)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        groups[(row["policy"], row["ratio"], row.get("quantization"), row["question_index"])].append(row["score"])
    return [{"policy": policy, "ratio": ratio, "quantization": quantization, "turn": turn + 1,
             "score": mean_and_stderr(scores)[0], "stderr": mean_and_stderr(scores)[1], "n": len(scores)}
            for (policy, ratio, quantization, turn), scores in sorted(
                groups.items(), key=lambda item: (item[0][0] != "full", item[0][0], item[0][1], str(item[0][2]),
                                                  item[0][3]))]


def _order(item):
    (policy, ratio, quantization, task, length), _ = item
    return (policy != "full", policy, ratio, str(quantization), task != ALL, task, length)


def overall(summary: list[dict]) -> list[dict]:
    return [row for row in summary if row["task"] == ALL and row["length"] == 0]


def cell_label(row: dict) -> str:
    label = row["policy"] if row["policy"] == "full" else f"{row['policy']} @ {row['ratio']:g}"
    return f"{label} {row['quantization']}" if row.get("quantization") else label


def _number(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_tables(summary: list[dict], turns: list[dict] | None = None) -> str:
    """Overall table (score ± stderr, fidelity, memory) and a per-task score table, both policy x ratio; a
    per-turn table when samples asked several questions."""
    totals = overall(summary)
    tasks = sorted({row["task"] for row in summary if row["task"] != ALL})
    lines = ["| policy @ ratio | score | n | KL vs full (nats/tok) | same answer as full | KV MiB held | "
             "compression vs fp16 | kept tok |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in sorted(totals, key=lambda r: (-r["score"], r["policy"], r["ratio"], str(r["quantization"]))):
        lines.append(f"| {cell_label(row)} | {row['score']:.3f} ± {row['stderr']:.3f} | {row['n']} "
                     f"| {_number(row['kl_vs_full'], 4)} | {row['matches_full']:.0%} "
                     f"| {row['kv_bytes_kept'] / 2**20:.2f} "
                     f"| {_number(row.get('compression'), 2)}x | {row['kept_tokens']:.0f} |")
    by_cell = {(row["policy"], row["ratio"], row["quantization"], row["task"]): row
               for row in summary if row["length"] == 0}
    per_task = ["", "| policy @ ratio | " + " | ".join(tasks) + " |", "| --- |" + " --- |" * len(tasks)]
    for row in sorted(totals, key=lambda r: (r["policy"] != "full", r["policy"], r["ratio"], str(r["quantization"]))):
        cells = [by_cell.get((row["policy"], row["ratio"], row["quantization"], task)) for task in tasks]
        per_task.append(f"| {cell_label(row)} | " + " | ".join(
            f"{cell['score']:.2f} ± {cell['stderr']:.2f}" if cell else "-" for cell in cells) + " |")
    return "\n".join(lines + (per_task if len(tasks) > 1 else []) + turn_table(turns or []))


def turn_table(turns: list[dict]) -> list[str]:
    if len({row["turn"] for row in turns}) < 2:
        return []
    count = max(row["turn"] for row in turns)
    by_cell: dict[str, dict[int, dict]] = defaultdict(dict)
    for row in turns:
        by_cell[cell_label(row)][row["turn"]] = row
    lines = ["", "| policy @ ratio | " + " | ".join(f"turn {n}" for n in range(1, count + 1)) + " |",
             "| --- |" + " --- |" * count]
    for label, by_turn in by_cell.items():
        lines.append(f"| {label} | " + " | ".join(
            f"{by_turn[n]['score']:.2f} ± {by_turn[n]['stderr']:.2f}" if n in by_turn else "-"
            for n in range(1, count + 1)) + " |")
    return lines


def memory_fraction(row: dict) -> float | None:
    """KV bytes held over the full cache's bytes at fp16: ``kv_bytes_kept / kv_bytes_full_fp16``, both per-sample
    means, so it is ``1 / compression``. It can exceed 1 (an fp32 cache on CPU holds 2). None when either is
    missing or the fp16 size is 0."""
    kept, full_fp16 = row.get("kv_bytes_kept"), row.get("kv_bytes_full_fp16")
    return kept / full_fp16 if kept is not None and full_fp16 else None


def frontier(summary: list[dict]) -> list[dict]:
    """The overall cells (``task="all"``, ``length=0``) with ``memory_fraction`` and ``pareto`` added, smallest
    memory first. A cell is Pareto-optimal when no other cell has a memory fraction <= and a score >= with at
    least one strict; two identical cells are therefore both marked. A cell without a fraction is never marked."""
    cells = [{**row, "memory_fraction": memory_fraction(row)} for row in overall(summary)]
    placed = [cell for cell in cells if cell["memory_fraction"] is not None]
    for cell in cells:
        cell["pareto"] = cell["memory_fraction"] is not None and not any(_dominates(other, cell) for other in placed)
    return sorted(cells, key=lambda cell: (cell["memory_fraction"] is None, cell["memory_fraction"] or 0.0,
                                           -cell["score"], cell_label(cell)))


def _dominates(a: dict, b: dict) -> bool:
    """Whether cell ``a`` holds no more memory than ``b``, scores no less, and is strictly better in one."""
    no_worse = a["memory_fraction"] <= b["memory_fraction"] and a["score"] >= b["score"]
    return no_worse and (a["memory_fraction"] < b["memory_fraction"] or a["score"] > b["score"])


def best_per_budget(summary: list[dict], budgets: tuple[float, ...] = BUDGETS) -> list[dict]:
    """For each budget (a fraction of the full cache's bytes at fp16) the highest-scoring overall cell whose memory
    fraction is <= the budget, smaller memory first on equal scores: ``{"budget": b, "best": cell or None}``.
    ``best`` holds the cell's policy, ratio, quantization, label, score, stderr, n, memory_fraction, compression
    (``1 / memory_fraction``) and ``share_of_full``: its score over the score of ``full`` without quantization
    (None when that cell is absent or scored 0)."""
    cells = [cell for cell in frontier(summary) if cell["memory_fraction"] is not None]
    reference = next((cell["score"] for cell in cells if cell["policy"] == "full" and not cell["quantization"]), None)
    entries = []
    for budget in budgets:
        fitting = [cell for cell in cells if cell["memory_fraction"] <= budget]
        best = min(fitting, key=lambda cell: (-cell["score"], cell["memory_fraction"], cell_label(cell)), default=None)
        entries.append({"budget": budget, "best": None if best is None else _budget_entry(best, reference)})
    return entries


def _budget_entry(cell: dict, full_score: float | None) -> dict:
    fraction = cell["memory_fraction"]
    return {"policy": cell["policy"], "ratio": cell["ratio"], "quantization": cell["quantization"],
            "label": cell_label(cell), "score": cell["score"], "stderr": cell["stderr"], "n": cell["n"],
            "memory_fraction": fraction, "compression": 1 / fraction if fraction else None,
            "share_of_full": cell["score"] / full_score if full_score else None}


def fraction_label(fraction: float) -> str:
    """``1``, ``2``, ``1/2``, ``1/16`` for powers of two; three significant digits otherwise."""
    exponent = math.log2(fraction) if fraction > 0 else math.nan
    if not exponent.is_integer():
        return f"{fraction:.3g}"
    return str(2 ** int(exponent)) if exponent >= 0 else f"1/{2 ** -int(exponent)}"


def budget_table(summary: list[dict], budgets: tuple[float, ...] = BUDGETS) -> str:
    """The "Best cell per memory budget" section (heading, definition, table); empty with fewer than two cells."""
    if sum(memory_fraction(row) is not None for row in overall(summary)) < 2:
        return ""
    lines = ["### Best cell per memory budget", "",
             "Memory = KV bytes held / the full cache's bytes at fp16 (per-sample means); best = highest mean score "
             "among the cells within the budget, the smaller memory on equal scores; share of full = score / score "
             "of the full cache without quantization.", "",
             "| budget (of fp16 full) | best cell | score | n | memory held | compression vs fp16 | share of full |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for entry in best_per_budget(summary, budgets):
        budget, best = f"≤ {fraction_label(entry['budget'])} ({1 / entry['budget']:g}x)", entry["best"]
        if best is None:
            lines.append(f"| {budget} | nothing fits | - | - | - | - | - |")
            continue
        share = "-" if best["share_of_full"] is None else f"{best['share_of_full']:.0%}"
        lines.append(f"| {budget} | {best['label']} | {best['score']:.3f} ± {best['stderr']:.3f} | {best['n']} "
                     f"| {best['memory_fraction']:.3f} | {_number(best['compression'], 2)}x | {share} |")
    return "\n".join(lines)
