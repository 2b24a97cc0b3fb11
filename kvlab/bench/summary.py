"""Aggregate result rows into summary rows (policy x ratio x task x length), find the memory-budget frontier, compare
every cell with the full cache (within noise or not), and render the markdown tables, the report's concluding
sentences and the run's header in words."""

from __future__ import annotations

import math
import time
from collections import defaultdict

from kvlab.units import format_exact_size

ALL = "all"
BUDGETS = (1.0, 0.5, 0.25, 0.125, 0.0625)  # memory budgets, as fractions of the full cache's bytes at fp16
BUDGET_CAPTION = ("For each memory budget, the highest-scoring cell whose KV bytes held fit in it (the smaller memory "
                  "on equal scores). Memory held = KV bytes held while decoding / the full cache's bytes at fp16 "
                  "(per-sample means), so 0.125 is 8x smaller; share of full = score / the score of the full cache "
                  "without quantization. A row reads: within this much memory, this is the best any measured cell "
                  "did.")
MEANS = ("kl_vs_full", "kv_bytes_kept", "kv_bytes_read", "kv_bytes_full", "kv_bytes_full_fp16", "kept_tokens",
         "compress_s", "decode_s", "prefill_s", "question_s", "decode_tokens", "decode_rows")


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
                 "family": members[0].get("family", "kv"),
                 "method_query_aware": any(bool(row.get("method_query_aware")) for row in members),
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
    """``snapkv @ 0.5``, ``snapkv @ 0.5 int4``, ``snapkv @ 0.5 stream≤64MiB`` (a streamed cell's policy column ends
    with its limit, see ``stream_label``; the label names it last)."""
    policy, mark, limit = row["policy"].partition(STREAM_MARK)
    label = policy if policy == "full" else f"{policy} @ {row['ratio']:g}"
    label = f"{label} {row['quantization']}" if row.get("quantization") else label
    return f"{label}{mark}{limit}"


STREAM_MARK = " stream≤"  # ends the policy column of a --max-kv-memory cell: "snapkv stream≤64MiB"
def stream_label(max_kv_bytes: int) -> str:
    """``stream≤64MiB``: the suffix of a streamed cell's policy column, with the limit exact
    (``units.format_exact_size``), so two limits never share a label."""
    return f"{STREAM_MARK.strip()}{format_exact_size(max_kv_bytes)}"


def _number(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_tables(summary: list[dict], turns: list[dict] | None = None) -> str:
    """The tables `kvlab bench` and `kvlab report` print: scores, per task (several tasks) and per turn (several
    questions per sample), separated by blank lines."""
    return "\n\n".join(table for table in (score_table(summary), task_table(summary), turn_table(turns or []))
                       if table)


def score_table(summary: list[dict]) -> str:
    """One row per overall cell, best score first: score ± s.e., n, fidelity against the full cache, memory."""
    lines = ["| policy @ ratio | score | n | KL vs full (nats/tok) | same answer as full | KV MiB held | "
             "compression vs fp16 | kept tok |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in sorted(overall(summary), key=lambda r: (-r["score"], r["policy"], r["ratio"], str(r["quantization"]))):
        lines.append(f"| {cell_label(row)} | {row['score']:.3f} ± {row['stderr']:.3f} | {row['n']} "
                     f"| {_number(row['kl_vs_full'], 4)} | {row['matches_full']:.0%} "
                     f"| {_number(_mib(row['kv_bytes_kept']), 2)} "
                     f"| {_times(row.get('compression'))} | {_number(row['kept_tokens'], 0)} |")
    return "\n".join(lines)


def task_table(summary: list[dict]) -> str:
    """Score ± s.e. of every overall cell on each task (all lengths together); empty with a single task."""
    tasks = sorted({row["task"] for row in summary if row["task"] != ALL})
    if len(tasks) < 2:
        return ""
    by_cell = {(row["policy"], row["ratio"], row["quantization"], row["task"]): row
               for row in summary if row["length"] == 0}
    lines = ["| policy @ ratio | " + " | ".join(tasks) + " |", "| --- |" + " --- |" * len(tasks)]
    for row in sorted(overall(summary), key=_cell_order):
        cells = [by_cell.get((row["policy"], row["ratio"], row["quantization"], task)) for task in tasks]
        lines.append(f"| {cell_label(row)} | " + " | ".join(
            f"{cell['score']:.2f} ± {cell['stderr']:.2f}" if cell else "-" for cell in cells) + " |")
    return "\n".join(lines)


def _cell_order(row: dict) -> tuple:
    return row["policy"] != "full", row["policy"], row["ratio"], str(row["quantization"])


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mib(num_bytes: float | None) -> float | None:
    return None if num_bytes is None else num_bytes / 2**20


def turn_table(turns: list[dict]) -> str:
    """Score ± s.e. of every cell on the k-th question of its samples; empty unless samples asked several."""
    if len({row["turn"] for row in turns}) < 2:
        return ""
    count = max(row["turn"] for row in turns)
    by_cell: dict[str, dict[int, dict]] = defaultdict(dict)
    for row in turns:
        by_cell[cell_label(row)][row["turn"]] = row
    lines = ["| policy @ ratio | " + " | ".join(f"turn {n}" for n in range(1, count + 1)) + " |",
             "| --- |" + " --- |" * count]
    for label, by_turn in by_cell.items():
        lines.append(f"| {label} | " + " | ".join(
            f"{by_turn[n]['score']:.2f} ± {by_turn[n]['stderr']:.2f}" if n in by_turn else "-"
            for n in range(1, count + 1)) + " |")
    return "\n".join(lines)


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
    """The "Best cell per memory budget" section (heading, table, caption); empty with fewer than two cells."""
    table = best_cell_table(summary, budgets)
    return f"### Best cell per memory budget\n\n{table}\n\n{BUDGET_CAPTION}" if table else ""


def best_cell_table(summary: list[dict], budgets: tuple[float, ...] = BUDGETS) -> str:
    """The table of ``best_per_budget``; empty with fewer than two cells placed by memory."""
    if sum(memory_fraction(row) is not None for row in overall(summary)) < 2:
        return ""
    lines = ["| budget (of fp16 full) | best cell | score | n | memory held | compression vs fp16 | share of full |",
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


FAMILY_CAPTION = ("The best cell of each method family within each memory budget (same rules as the table above). "
                  "KV policies evict from (and quantize) the cache of the whole document; input methods shorten the "
                  "text before it is prefilled. Methods that read the question to decide what to keep (retrieval) "
                  "have their own column: they cannot build a cache before the question is known.")
TASK_TYPE_CAPTION = ("The best cell within each memory budget on each task type (tasks that differ only in their "
                     "number, such as qa_1 and qa_2, pooled), with its score. Where the winners differ, no one "
                     "method fits every kind of question.")


def family_of(cell: dict) -> str:
    """``KV policy``, ``input, query-agnostic`` or ``input, reads the question`` (for tables and legends)."""
    if cell.get("family", "kv") != "input":
        return "KV policy"
    return "input, reads the question" if cell.get("method_query_aware") else "input, query-agnostic"


def task_type(task: str) -> str:
    """``qa_1`` → ``qa``, ``niah_multikey_2`` → ``niah_multikey``, ``vt`` → ``vt``."""
    head, _, tail = task.rpartition("_")
    return head if head and tail.isdigit() else task


def best_per_family_table(summary: list[dict], budgets: tuple[float, ...] = BUDGETS) -> str:
    """Budgets x families: the best cell of each family that fits (the full cache counts in every family, as the
    reference each can fall back to); empty unless the grid has more than one family."""
    families = sorted({family_of(cell) for cell in overall(summary) if cell["policy"] != "full"})
    if len(families) < 2:
        return ""
    return _best_by_column({family: best_per_budget([cell for cell in summary if cell["policy"] == "full"
                                                     or family_of(cell) == family], budgets)
                            for family in families}, budgets)


def best_per_task_type_table(rows: list[dict], budgets: tuple[float, ...] = BUDGETS) -> str:
    """Budgets x task types: the best cell on that type's rows; empty with a single task type."""
    types = sorted({task_type(row["task"]) for row in rows})
    if len(types) < 2:
        return ""
    return _best_by_column({kind: best_per_budget(summarize([{**row, "task": kind} for row in rows
                                                              if task_type(row["task"]) == kind]), budgets)
                            for kind in types}, budgets)


def _best_by_column(columns: dict[str, list[dict]], budgets: tuple[float, ...]) -> str:
    """A budgets x columns table of ``best_per_budget`` results (one list per column, in the order of
    ``budgets``): each cell is the best cell's label and score, or "nothing fits"."""
    lines = ["| budget (of fp16 full) | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for index, budget in enumerate(budgets):
        winners = [entries[index]["best"] for entries in columns.values()]
        lines.append(f"| ≤ {fraction_label(budget)} | " + " | ".join(
            "nothing fits" if best is None else f"{best['label']}: {best['score']:.3f}" for best in winners) + " |")
    return "\n".join(lines)


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; beyond 30, 1.96 + 2.4 / df is within 0.002
T_95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
NOISE_RULE = ("A cell is compared with the full cache on the questions both answered: the mean of the per-question "
              "score differences, with its 95% interval (Student t on the paired differences; in brackets). Within "
              "noise: the interval contains 0, so this run cannot tell the two apart, even when the cell's score "
              "is higher. Below or above beyond noise: the whole interval lies below or above 0.")
ERROR_BARS = ("± (and the error bars) is one standard error of the mean score over the cell's n answers: the sample "
              "standard deviation / √n, roughly a 68% interval, not a 95% one.")


def t_95(degrees_of_freedom: int) -> float:
    """The two-sided 95% quantile of Student's t distribution (``degrees_of_freedom`` >= 1)."""
    if degrees_of_freedom <= len(T_95):
        return T_95[degrees_of_freedom - 1]
    return 1.96 + 2.4 / degrees_of_freedom


def compare_with_full(rows: list[dict]) -> dict[str, dict]:
    """Each cell's score difference from the full cache without quantization, keyed by cell label: paired by
    (sample, question) over the answers both have, or unpaired (difference of means, Welch-style standard error,
    the smaller n - 1 degrees of freedom) when fewer than two are shared. Each value holds ``difference``,
    ``low``/``high`` (the 95% interval), ``n`` (answers compared), ``paired`` and ``verdict``: "within noise",
    "below", "above" or "too few" (under two answers). Empty without a full-cache cell."""
    scores: dict[tuple, dict[tuple, float]] = defaultdict(dict)
    for row in rows:
        cell = (row["policy"], row["ratio"], row.get("quantization"))
        scores[cell][(row["sample_id"], row.get("question_index", 0))] = row["score"]
    reference = next((cell for cell in scores if cell[0] == "full" and cell[2] is None), None)
    if reference is None:
        return {}
    full = scores[reference]
    comparisons = {}
    for cell, answers in scores.items():
        if cell == reference:
            continue
        shared = [key for key in answers if key in full]
        if len(shared) >= 2:
            difference, stderr = mean_and_stderr([answers[key] - full[key] for key in shared])
            n, degrees = len(shared), len(shared) - 1
        else:
            (mean, stderr_a), (full_mean, stderr_b) = mean_and_stderr(list(answers.values())), mean_and_stderr(
                list(full.values()))
            difference, stderr = mean - full_mean, math.hypot(stderr_a, stderr_b)
            n, degrees = min(len(answers), len(full)), min(len(answers), len(full)) - 1
        label = cell_label({"policy": cell[0], "ratio": cell[1], "quantization": cell[2]})
        comparisons[label] = _verdict(difference, stderr, n, degrees, paired=len(shared) >= 2)
    return comparisons


def _verdict(difference: float, stderr: float, n: int, degrees: int, paired: bool) -> dict:
    if degrees < 1:
        return {"difference": difference, "low": None, "high": None, "n": n, "paired": paired, "verdict": "too few"}
    half_width = t_95(degrees) * stderr
    low, high = difference - half_width, difference + half_width
    verdict = "below" if high < 0 else "above" if low > 0 else "within noise"
    return {"difference": difference, "low": low, "high": high, "n": n, "paired": paired, "verdict": verdict}


def conclusion(rows: list[dict], summary: list[dict], listed: int = 8) -> list[str]:
    """The report's opening sentences: the full cache's score; which cells are within noise of it and which are
    below or above it beyond noise (``compare_with_full``; at most ``listed`` named per group: within noise the
    smallest memory first, below it the highest score first); then the best cell per memory budget."""
    reference = next((row for row in overall(summary) if row["policy"] == "full" and not row["quantization"]), None)
    comparisons = compare_with_full(rows)
    if reference is None:
        sentences = ["No full-cache cell (policy full without quantization) was measured, so no cell is compared "
                     "with it."]
    else:
        compared = f"{plural(len(comparisons), 'other cell')} {'is' if len(comparisons) == 1 else 'are'}"
        sentences = [f"The full cache scores {reference['score']:.3f} on {plural(reference['n'], 'answer')}; "
                     f"{compared} compared with it."]
        cells = {cell_label(cell): cell for cell in frontier(summary)}
        for verdict, heading in (("within noise", "Within noise of it"), ("below", "Below it beyond noise"),
                                 ("above", "Above it beyond noise"), ("too few", "Too few answers to compare")):
            labels = [label for label, found in comparisons.items() if found["verdict"] == verdict]
            labels.sort(key=lambda label: (-cells[label]["score"], label) if verdict == "below"
                        else (cells[label]["memory_fraction"] or math.inf, label))
            if labels:
                named = [_compared(cells[label], comparisons[label]) for label in labels[:listed]]
                more = f"; and {len(labels) - listed} more (see the score table)" if len(labels) > listed else ""
                sentences.append(f"{heading} ({len(labels)}): {'; '.join(named)}{more}.")
            elif verdict == "within noise" and comparisons:
                sentences.append("No other cell is within noise of it.")
    budgets = _budget_sentence(summary, comparisons)
    return sentences + ([budgets] if budgets else [])


def _compared(cell: dict, found: dict) -> str:
    memory = "" if cell["memory_fraction"] is None else f", memory {cell['memory_fraction']:.2f} of fp16 full"
    if found["low"] is None:
        return f"{cell_label(cell)} ({cell['score']:.3f}{memory})"
    if found["low"] == found["high"] == 0:
        return f"{cell_label(cell)} ({cell['score']:.3f}{memory}; the same score on every answer)"
    return (f"{cell_label(cell)} ({cell['score']:.3f}{memory}; {found['difference']:+.3f} "
            f"[{found['low']:+.3f}, {found['high']:+.3f}])")


def _budget_sentence(summary: list[dict], comparisons: dict[str, dict]) -> str:
    """"Best cell per memory budget: ≤ 1 and 1/2: ...; ≤ 1/4: ... ." Budgets won by the same cell share a
    clause; empty with fewer than two cells placed by memory."""
    if sum(memory_fraction(row) is not None for row in overall(summary)) < 2:
        return ""
    phrases = {"within noise": "within noise of the full cache", "below": "below the full cache beyond noise",
               "above": "above the full cache beyond noise", "too few": "too few answers to compare"}
    groups: list[tuple[list[str], dict | None]] = []
    for entry in best_per_budget(summary):
        budget, best = fraction_label(entry["budget"]), entry["best"]
        if groups and (groups[-1][1] or {}).get("label") == (best or {}).get("label"):
            groups[-1][0].append(budget)
        else:
            groups.append(([budget], best))
    parts = []
    for budgets, best in groups:
        if best is None:
            parts.append(f"≤ {and_list(budgets)}: nothing fits")
            continue
        found = comparisons.get(best["label"])
        verdict = "the full cache itself" if found is None else phrases[found["verdict"]]
        parts.append(f"≤ {and_list(budgets)}: {best['label']} ({best['score']:.3f}, "
                     f"{_number(best['compression'], 1)}x smaller than the fp16 full cache, {verdict})")
    return "Best cell per memory budget (of the fp16 full cache's bytes): " + "; ".join(parts) + "."


def plural(count: int, noun: str) -> str:
    """``1 answer``, ``2 answers``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def and_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def latency_table(summary: list[dict]) -> str:
    """Mean seconds per answer (prefill, compress, question, decode), how many cells shared the decode loop,
    decode tokens per second (only for a cell that decoded alone: a shared loop's time is not the cell's), and
    the KV bytes held against the fp16 full cache, one row per overall cell in grid order."""
    cells = sorted(overall(summary), key=_cell_order)
    inputs = any(row.get("family") == "input" for row in cells)
    full_prefill = next((row.get("prefill_s") for row in cells if row["policy"] == "full"), None)
    lines = ["| policy @ ratio | prefill s | compress s | question s | decode s | cells per decode loop "
             "| decode tok/s | KV MiB held | fp16 full MiB | compression vs fp16 |"
             + (" prefill saved |" if inputs else ""),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if inputs else "")]
    for row in cells:
        tokens, seconds, together = row.get("decode_tokens"), row.get("decode_s"), row.get("decode_rows") or 1
        rate = tokens / seconds if tokens is not None and seconds and together <= 1 else None
        lines.append(f"| {cell_label(row)} | {_number(row.get('prefill_s'), 2)} | {_number(row.get('compress_s'), 3)} "
                     f"| {_number(row.get('question_s'), 3)} | {_number(seconds, 2)} | {together:.0f} "
                     f"| {_number(rate, 1)} | {_number(_mib(row.get('kv_bytes_kept')), 2)} "
                     f"| {_number(_mib(row.get('kv_bytes_full_fp16')), 2)} | {_times(row.get('compression'))} |"
                     + (f" {_saved(row, full_prefill)} |" if inputs else ""))
    return "\n".join(lines)


STREAM_CAPTION = ("One row per --max-kv-memory cell: the document was prefilled chunk by chunk under that limit and "
                  "compressed to the cell's budget as it went (kvlab compress --max-kv-memory), then the question was "
                  "asked as in the other cells. Streamed: the answers whose full cache exceeded the limit; the others "
                  "fit it, were prefilled whole and are the same as the cell without the limit. Peak KV: the most KV "
                  "bytes held while reading the document (streamed answers; the question and answer come on top). "
                  "After full prefill: the same policy, ratio and quantization compressed after a full prefill, on "
                  "the same questions.")


def stream_table(rows: list[dict]) -> str:
    """The streamed cells (rows with ``max_kv_memory``) against the same cell compressed after a full prefill;
    empty without them."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        cells[(row["policy"], row["ratio"], row.get("quantization"))].append(row)
    lines = ["| cell | streamed | chunk tok | peak KV MiB while reading | full cache MiB | score "
             "| after full prefill |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (policy, ratio, quantization), members in sorted(cells.items(), key=lambda item: str(item[0])):
        if members[0].get("max_kv_memory") is None:
            continue
        streamed = [row for row in members if row.get("streamed")]
        peak = max((row["peak_kv_bytes"] for row in streamed), default=None)
        chunks = sorted({row["stream_chunk_tokens"] for row in streamed})
        base = {(row["sample_id"], row["question_index"]): row["score"]
                for row in cells.get((policy.partition(STREAM_MARK)[0], ratio, quantization), [])}
        shared = [base[key] for key in ((row["sample_id"], row["question_index"]) for row in members) if key in base]
        score, stderr = mean_and_stderr([row["score"] for row in members])
        after = f"{mean_and_stderr(shared)[0]:.3f} (n={len(shared)})" if shared else "-"
        full = sum(row["kv_bytes_full"] for row in members) / len(members)
        lines.append(f"| {cell_label(members[0])} | {len(streamed)} of {len(members)} "
                     f"| {', '.join(map(str, chunks)) or '-'} | {_number(_mib(peak), 2)} | {_mib(full):.2f} "
                     f"| {score:.3f} ± {stderr:.3f} | {after} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _saved(row: dict, full_prefill: float | None) -> str:
    """An input method's prefill time saved against the full document's, net of its own time (compress s)."""
    prefill, method = row.get("prefill_s"), row.get("compress_s") or 0.0
    if row.get("family") != "input" or prefill is None or not full_prefill:
        return "-"
    return f"{(full_prefill - prefill - method) / full_prefill:+.0%}"


def run_header(rows: list[dict], state: dict) -> list[tuple[str, str]]:
    """The run in words, as (label, text) lines: model, tasks, context lengths, samples, setting, machine, date
    and wall time. The grid comes from the rows; the machine, date and wall time from ``state`` (run.json)."""
    models = sorted({str(row["model"]) for row in rows if row.get("model")}) or [str(state.get("model", "?"))]
    weights = {row.get("weights", state.get("weights", "fp")) for row in rows} or {"fp"}
    fingerprints = sorted({row["model_fingerprint"] for row in rows if row.get("model_fingerprint")})
    model = ", ".join(models) + (", weight-only int8 linear layers" if "int8" in weights else ", its own weights")
    if fingerprints:
        model += f" (fingerprint {', '.join(fingerprints)})"
    tasks = sorted({row["task"] for row in rows})
    lengths = sorted({row["length_tokens"] for row in rows if row["length_tokens"]})
    per_group = defaultdict(set)
    for row in rows:
        per_group[(row["task"], row["length_tokens"])].add(row["sample_id"])
    counts = sorted({len(ids) for ids in per_group.values()}) or [0]
    each = str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    cells = {(row["policy"], row["ratio"], row.get("quantization")) for row in rows}
    samples = len({row["sample_id"] for row in rows})
    return [("Model", model),
            ("Tasks", f"{len(tasks)} ({', '.join(tasks)})"),
            ("Context lengths", and_list([f"{length:,}" for length in lengths]) + " tokens" if lengths
             else "as given in the data file"),
            ("Samples", f"{samples} ({each} per task and length); {plural(len(rows), 'answer')} over "
                        f"{plural(len(cells), 'cell')}"),
            ("Setting", _setting(rows, state)),
            ("Machine", str(state.get("machine") or "not recorded for this run")),
            ("Date", _date(state)),
            ("Wall time", _wall_time(state))]


def header_text(header: list[tuple[str, str]]) -> str:
    return "\n".join(f"{label}: {text}" for label, text in header)


def _setting(rows: list[dict], state: dict) -> str:
    mode = rows[0].get("mode", "single") if rows else state.get("mode", "single")
    if rows and rows[0].get("query_aware", state.get("query_aware")):
        return "query-aware: the question is part of the prefix the policy compresses"
    return {"multi-request": "query-agnostic, multi-request: every question of a sample from the same persisted .kv "
                             "file, reloaded each time",
            "multi-turn": "query-agnostic, multi-turn: a sample's questions asked as follow-ups in one conversation"
            }.get(mode, "query-agnostic: each document is compressed before its question is seen")


def _date(state: dict) -> str:
    started = state.get("last_run_started")
    if not started:
        return "not recorded for this run"
    try:
        when = time.strptime(started, "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return str(started)
    return time.strftime("%Y-%m-%d %H:%M", when) + " (start of the last run into this folder, local time)"


def _wall_time(state: dict) -> str:
    seconds = state.get("wall_s")
    if seconds is None:
        return "not recorded for this run"
    prefills = state.get("prefills")
    return duration_words(float(seconds)) + (f", {prefills} prefills" if prefills is not None else "")


def duration_words(seconds: float) -> str:
    """``0.4 s``, ``42 s``, ``3 min 56 s``, ``2 h 5 min``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    minutes, whole = divmod(round(seconds), 60)
    if not minutes:
        return f"{whole} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {whole} s"
