"""The bench report: ``summary.json``, ``report.md`` and a self-contained ``report.html`` with the plots.

The report opens with the run's header (the same lines `kvlab bench` and `kvlab report` print), a concluding
paragraph (which cells are within noise of the full cache, which lose, the best cell per memory budget), then
the tables and the plots, each with a caption saying what it shows and how to read it. Plots (matplotlib, Agg
backend; Okabe & Ito's colour-blind-safe colours, viridis heatmaps): score vs eviction ratio; the budget frontier
(score against the KV bytes held, Pareto-optimal cells joined); needle score by depth and length; fidelity (KL vs
the full cache) against the KV bytes kept.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from kvlab.bench.summary import (
    BUDGET_CAPTION,
    ERROR_BARS,
    FAMILY_CAPTION,
    NOISE_RULE,
    STREAM_CAPTION,
    TASK_TYPE_CAPTION,
    best_cell_table,
    best_per_budget,
    best_per_family_table,
    best_per_task_type_table,
    compare_with_full,
    conclusion,
    family_of,
    fraction_label,
    frontier,
    header_text,
    latency_table,
    markdown_tables,
    overall,
    per_turn,
    run_header,
    score_table,
    stream_table,
    summarize,
    task_table,
    turn_table,
)
from kvlab.fileio import atomic_write_text

NEEDLE_TASK_PREFIX = "niah"
# Okabe & Ito's colour-blind-safe palette; black first (``full``), yellow last (faint on white)
OKABE_ITO = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442")
# one marker and line style per KV quantization of a report, unquantized first (int4:r0 and int4:g64:r0 differ)
QUANT_MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")
QUANT_LINES = ("-", "-.", "--", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2, 1, 2)))
MARKED_BUDGETS = (0.25, 0.125, 0.0625)
HEATMAP_COLUMNS = 6
SCORES_CAPTION = ("One row per cell (eviction policy @ fraction of the document's tokens evicted, then the KV "
                  "quantization), best score first. Score: mean over the n answers (1 = every answer right). KL vs "
                  "full: mean KL divergence of the next-token distributions from the full cache's, along the full "
                  "cache's answer (0 = the same distributions). Same answer as full: share of greedy answers "
                  "identical to the full cache's. KV MiB held: mean bytes held while decoding; compression: the "
                  "full cache's bytes at fp16 over those; kept tok: document tokens kept (mean).")
TASK_CAPTION = ("Score (± s.e.) of each cell on each task, all context lengths together. A task where one cell "
                "drops while the others hold shows what that policy throws away.")
TURN_CAPTION = ("Score (± s.e.) of each cell on the k-th question of a sample (multi-request: every question from "
                "the same persisted cache; multi-turn: follow-ups in one conversation). A row that falls from left "
                "to right serves later questions worse than the first.")
LATENCY_CAPTION = ("Mean seconds per answer. Prefill: the document's one prefill, shared by every cell of a sample. "
                   "Compress: scoring, eviction and quantization. Question: feeding the question onto the compressed "
                   "cache (0 when the question was in the prefix). Decode: the greedy answer. In single mode the "
                   "cells of a sample decode together, one batched forward pass per step (cells per decode loop), so "
                   "decode s is that loop's time until the cell's answer ended, not the cell's own speed; decode "
                   "tok/s is given only for cells that decoded alone (benchmarks/decode_throughput.py times one cell "
                   "at a time). KV MiB held: bytes held while decoding; fp16 full MiB: the uncompressed cache at 2 "
                   "bytes per element; compression = fp16 full / held. For an input method (when the grid has "
                   "one), prefill is that of the shortened text, compress is the method's own time, and prefill "
                   "saved = (the full document's prefill - both) / the full document's prefill.")
SCORE_RATIO_CAPTION = ("Mean score (error bars: ± one standard error) against the fraction of the document's tokens "
                       "evicted; colour = policy, line style and marker = KV quantization; horizontal lines are the "
                       "full cache (no eviction). A line that stays level while moving right keeps what the tasks "
                       "need with fewer tokens; where it falls, the policy starts evicting answers.")
FRONTIER_CAPTION = ("Each point is one grid cell (eviction policy x KV quantization), placed by the KV bytes it holds "
                    "against the full cache at fp16 (log scale; top axis: the compression). Colour = policy, marker "
                    "= quantization, error bars ± one standard error. The grey step line joins the Pareto-optimal "
                    "cells (ringed), i.e. the best score reachable within each memory budget; dotted lines mark the "
                    "budgets 1/4, 1/8 and 1/16. Read it from right to left: how much score is left as memory shrinks.")
NEEDLE_CAPTION = ("One panel per cell: the mean needle-task score by the needle's depth in the document (rows; 0% = "
                  "its start) and the context length in tokens (columns). Viridis colours: yellow = the needle was "
                  "always found, dark purple = never; white = not measured. A dark band at some depth shows where "
                  "the policy evicts the needle. A dashed red line marks the model's native window: lengths to "
                  "its right were reached with context extension (--extend).")
FIDELITY_CAPTION = ("Mean KL divergence of the next-token distributions from the full cache's (along the full "
                    "cache's answer; log scale) against the KV MiB held; colour = policy, line "
                    "style and marker = quantization, point labels = eviction ratio. Lower is closer to the full "
                    "cache; further left holds less memory.")


@dataclass(frozen=True)
class Section:
    """One titled block of the report: a markdown table or a PNG (base64), with the caption shown under it."""

    title: str
    caption: str
    table: str = ""
    png: str = ""


def write_report(out_dir: Path, rows: list[dict], meta: dict) -> dict:
    """Write summary.json, report.md and report.html into ``out_dir``; return their paths, the printed tables
    (``table``) and the run's header (``header``, the lines `kvlab bench` and `kvlab report` print). The header
    reads ``out_dir/run.json`` over ``meta``, so a bench run and a later `kvlab report` of it say the same."""
    out_dir = Path(out_dir)
    summary, turns = summarize(rows), per_turn(rows)
    header = run_header(rows, _run_state(out_dir, meta))
    opening = conclusion(rows, summary)
    atomic_write_text(out_dir / "summary.json", json.dumps(
        {"meta": meta, "header": dict(header), "conclusion": opening, "rows": summary, "turns": turns,
         "best_per_budget": best_per_budget(summary), "compared_with_full": compare_with_full(rows)},
        indent=2) + "\n")
    tables = table_sections(summary, turns, rows)
    notes = _notes(meta)
    atomic_write_text(out_dir / "report.md", _markdown(header, opening, notes, tables))
    styles = PlotStyles.of(overall(summary))
    figures = [Section("Score vs eviction ratio", SCORE_RATIO_CAPTION, png=score_vs_ratio(summary, styles) or ""),
               Section("Budget frontier: score vs memory", FRONTIER_CAPTION,
                       png=budget_frontier(summary, styles) or ""),
               Section("Needle retrieval by depth and length", NEEDLE_CAPTION,
                       png=needle_heatmaps(rows, meta.get("native_context_tokens")) or ""),
               Section("Fidelity vs KV bytes kept", FIDELITY_CAPTION, png=fidelity_vs_bytes(summary, styles) or "")]
    atomic_write_text(out_dir / "report.html",
                      _html(header, opening, notes, tables + [figure for figure in figures if figure.png]))
    return {"summary": out_dir / "summary.json", "markdown": out_dir / "report.md",
            "html": out_dir / "report.html", "table": markdown_tables(summary, turns),
            "header": header_text(header)}


def table_sections(summary: list[dict], turns: list[dict], rows: list[dict]) -> list[Section]:
    """The report's tables, each with its caption; a table with nothing to show is left out."""
    sections = [Section("Scores", SCORES_CAPTION, table=score_table(summary)),
                Section("Score per task", TASK_CAPTION, table=task_table(summary)),
                Section("Score per turn", TURN_CAPTION, table=turn_table(turns)),
                Section("Best cell per memory budget", BUDGET_CAPTION, table=best_cell_table(summary)),
                Section("Best cell per budget and method family", FAMILY_CAPTION,
                        table=best_per_family_table(summary)),
                Section("Best cell per budget and task type", TASK_TYPE_CAPTION,
                        table=best_per_task_type_table(rows)),
                Section("Latency and memory", LATENCY_CAPTION, table=latency_table(summary)),
                Section("Streamed prefill under a KV memory limit", STREAM_CAPTION, table=stream_table(rows))]
    return [section for section in sections if section.table]


def _run_state(out_dir: Path, meta: dict) -> dict:
    """``meta`` overlaid with the folder's run.json (what `kvlab bench` recorded), when it is readable."""
    try:
        recorded = json.loads((out_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        recorded = {}
    return {**meta, **(recorded if isinstance(recorded, dict) else {})}


def _notes(meta: dict) -> list[str]:
    """Facts of the run that only some reports carry: what int8 weights cost, which folders were merged."""
    notes = []
    fidelity = meta.get("weights_fidelity_vs_fp")
    if fidelity:
        figures = ", ".join(f"{key} {value}" for key, value in fidelity.items())
        notes.append(f"What the int8 weights cost against the model's own weights (weights_fidelity_vs_fp): {figures}.")
    if meta.get("runs"):
        notes.append(f"Merged from the runs {', '.join(map(str, meta['runs']))}.")
    return notes


def _markdown(header: list[tuple[str, str]], opening: list[str], notes: list[str], sections: list[Section]) -> str:
    lines = ["# kvlab bench report", ""] + [f"- {label}: {text}" for label, text in header]
    lines += ["", "### Summary", ""] + [f"- {sentence}" for sentence in opening]
    lines += ["", f"{ERROR_BARS} {NOISE_RULE}"] + [f"\n{note}" for note in notes]
    for section in sections:
        lines += ["", f"### {section.title}", "", section.table, "", section.caption]
    lines += ["", "The plots, each with its caption, are in report.html beside this file."]
    return "\n".join(lines) + "\n"


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _figure().close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


@dataclass(frozen=True)
class PlotStyles:
    """The same look for a cell in every plot of a report: an Okabe-Ito colour per policy (``full`` black), a marker
    and a line style per KV quantization."""

    colours: dict[str, str]
    markers: dict[str | None, str]
    lines: dict[str | None, object]

    @classmethod
    def of(cls, cells: list[dict]) -> PlotStyles:
        names = sorted({cell["policy"] for cell in cells}, key=lambda name: (name != "full", name))
        schemes = sorted({cell["quantization"] for cell in cells}, key=lambda q: (q is not None, str(q)))
        return cls({name: OKABE_ITO[index % len(OKABE_ITO)] for index, name in enumerate(names)},
                   {q: QUANT_MARKERS[index % len(QUANT_MARKERS)] for index, q in enumerate(schemes)},
                   {q: QUANT_LINES[index % len(QUANT_LINES)] for index, q in enumerate(schemes)})


def _series(cells: list[dict]) -> list[tuple[str, str | None]]:
    return sorted({(cell["policy"], cell["quantization"]) for cell in cells},
                  key=lambda key: (key[0] != "full", key[0], str(key[1])))


def _outside_legend(axis) -> None:
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, frameon=False)


def score_vs_ratio(summary: list[dict], styles: PlotStyles | None = None) -> str | None:
    totals = overall(summary)
    if not totals:
        return None
    styles = styles or PlotStyles.of(totals)
    plt = _figure()
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for policy, quantization in _series(totals):
        points = sorted((row["ratio"], row["score"], row["stderr"]) for row in totals
                        if row["policy"] == policy and row["quantization"] == quantization)
        label = f"{policy} {quantization}" if quantization else policy
        style = styles.lines[quantization]
        if policy == "full":
            axis.axhline(points[0][1], color=styles.colours[policy], linestyle=style, linewidth=1,
                         label=f"{label} (no eviction)")
            continue
        ratios, scores, errors = zip(*points)
        axis.errorbar(ratios, scores, yerr=errors, marker=styles.markers[quantization], linestyle=style, capsize=3,
                      color=styles.colours[policy], label=label)
    axis.set_xlabel("eviction ratio (fraction of the document's tokens evicted)")
    axis.set_ylabel("task score (mean ± s.e.)")
    axis.set_ylim(-0.03, 1.03)
    axis.grid(alpha=0.3)
    _outside_legend(axis)
    return _png(figure)


def budget_frontier(summary: list[dict], styles: PlotStyles | None = None) -> str | None:
    """Score (mean ± s.e.) against memory fraction (KV bytes held / full bytes at fp16, log2 axis; compression on
    top) for every overall cell: colour by policy, marker by quantization, the Pareto frontier as a step line with
    its cells ringed, dotted lines at the budgets 1/4, 1/8 and 1/16. None when no cell has byte figures."""
    cells = [cell for cell in frontier(summary) if cell["memory_fraction"] is not None]
    if not cells:
        return None
    plt = _figure()
    figure, axis = plt.subplots(figsize=(7, 4.2))
    styles = styles or PlotStyles.of(cells)
    for cell in cells:
        axis.errorbar(cell["memory_fraction"], cell["score"], yerr=cell["stderr"], capsize=3, linestyle="none",
                      marker=styles.markers[cell["quantization"]], color=styles.colours[cell["policy"]],
                      markersize=6)
    _draw_pareto(axis, cells)
    for budget in MARKED_BUDGETS:
        axis.axvline(budget, color="grey", linestyle=":", linewidth=1)
    _fraction_axes(axis, [cell["memory_fraction"] for cell in cells] + list(MARKED_BUDGETS))
    axis.set_xlabel("KV bytes held / full cache bytes at fp16 (log scale; dotted: budgets 1/4, 1/8, 1/16)")
    axis.set_ylabel("task score (mean ± s.e.)")
    axis.set_ylim(-0.03, 1.03)
    axis.grid(alpha=0.3)
    axis.legend(handles=_frontier_legend(styles, cells), fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1),
                borderaxespad=0)
    return _png(figure)


def _draw_pareto(axis, cells: list[dict]) -> None:
    """The frontier as a step function (best score within each memory) up to the largest memory, cells ringed."""
    points = sorted((cell["memory_fraction"], cell["score"]) for cell in cells if cell["pareto"])
    xs, ys = [x for x, _ in points], [y for _, y in points]
    axis.step(xs + [max(cell["memory_fraction"] for cell in cells)], ys + ys[-1:], where="post", color="grey",
              linewidth=1.2, zorder=1)
    axis.scatter(xs, ys, s=170, facecolors="none", edgecolors="black", linewidths=1, zorder=3)


def _fraction_axes(axis, fractions: list[float]) -> None:
    """Log2 x axis with ticks at powers of two labelled 1, 1/2, 1/4 ...; the compression (4x ...) on top."""
    from matplotlib.ticker import NullLocator

    low, high = math.floor(math.log2(min(fractions))), math.ceil(math.log2(max(fractions)))
    ticks = [2.0 ** exponent for exponent in range(low, high + 1)]
    axis.set_xscale("log", base=2)
    axis.set_xlim(ticks[0] / 1.25, ticks[-1] * 1.25)
    axis.set_xticks(ticks, [fraction_label(tick) for tick in ticks])
    axis.xaxis.set_minor_locator(NullLocator())
    top = axis.twiny()
    top.set_xscale("log", base=2)
    top.set_xlim(axis.get_xlim())
    top.set_xticks(ticks, [f"{1 / tick:g}x" for tick in ticks])
    top.xaxis.set_minor_locator(NullLocator())
    top.set_xlabel("compression vs fp16", fontsize=8)


def _frontier_legend(styles: PlotStyles, cells: list[dict]) -> list:
    from matplotlib.lines import Line2D

    placed = {cell["policy"]: family_of(cell) for cell in cells}
    several = len(set(placed.values()) - {"KV policy"}) > 0  # input methods present: say which family each is
    handles = [Line2D([], [], color=colour, marker="o", linestyle="none",
                      label=f"{name} ({placed[name]})" if several and name != "full" else name)
               for name, colour in styles.colours.items() if name in placed]
    for quantization in sorted({cell["quantization"] for cell in cells}, key=lambda q: (q is not None, str(q))):
        handles.append(Line2D([], [], color="grey", marker=styles.markers[quantization], linestyle="none",
                              label=f"KV {quantization or 'not quantized'}"))
    handles.append(Line2D([], [], color="grey", marker="o", markerfacecolor="none", markeredgecolor="black",
                          markersize=10, label="Pareto frontier"))
    return handles


def needle_heatmaps(rows: list[dict], native_tokens: int | None = None) -> str | None:
    """One panel per cell (policy @ ratio, quantization), wrapped into rows of ``HEATMAP_COLUMNS``: mean needle
    score by depth (rows) and context length (columns), viridis from 0 to 1, unmeasured cells white. Where some
    lengths pass the model's native window (``native_tokens``; reached with ``--extend``), a dashed red line
    separates them from the lengths within it."""
    needle_rows = [row for row in rows if row["task"].startswith(NEEDLE_TASK_PREFIX) and row["depth"] is not None]
    if not needle_rows:
        return None
    panels = sorted({(row["policy"], row["ratio"], row.get("quantization")) for row in needle_rows},
                    key=lambda cell: (cell[0] != "full", cell[0], cell[1], str(cell[2])))
    depths = sorted({round(row["depth"], 2) for row in needle_rows})
    lengths = sorted({row["length_tokens"] for row in needle_rows})
    cells = defaultdict(list)
    for row in needle_rows:
        cells[(row["policy"], row["ratio"], row.get("quantization"), round(row["depth"], 2),
               row["length_tokens"])].append(row["score"])
    plt = _figure()
    columns = min(len(panels), HEATMAP_COLUMNS)
    grid_rows = math.ceil(len(panels) / columns)
    width, height = max(1.7, 0.55 + 0.4 * len(lengths)), 1.2 + 0.22 * len(depths)
    figure, axes = plt.subplots(grid_rows, columns, figsize=(1.2 + width * columns, 0.5 + height * grid_rows),
                                squeeze=False, sharey=True, layout="constrained")
    colour_map = plt.get_cmap("viridis").with_extremes(bad="white")
    image = None
    for index, axis in enumerate(axes.flat):
        if index >= len(panels):
            axis.set_visible(False)
            continue
        policy, ratio, quantization = panels[index]
        grid = [[_mean(cells[(policy, ratio, quantization, depth, length)]) for length in lengths]
                for depth in depths]
        image = axis.imshow(grid, vmin=0, vmax=1, cmap=colour_map, aspect="auto")
        title = [policy] + ([] if policy == "full" else [f"@ {ratio:g}"]) + ([quantization] if quantization else [])
        axis.set_title(" ".join(title) if len(" ".join(title)) <= 14 else "\n".join(title), fontsize=8)
        axis.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7, rotation=90)
        axis.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        within = sum(length <= native_tokens for length in lengths) if native_tokens else len(lengths)
        if 0 < within < len(lengths):
            axis.axvline(within - 0.5, color="red", linestyle="--", linewidth=1.2)
            axis.text(within - 0.45, -0.6, "window", color="red", fontsize=6, va="bottom")
        if index % columns == 0:
            axis.set_ylabel("needle depth", fontsize=8)
    figure.supxlabel("context tokens", fontsize=8)
    figure.colorbar(image, ax=axes.ravel().tolist(), shrink=min(0.8, 1.6 / grid_rows), aspect=15,
                    label="mean score (1 = always found)")
    return _png(figure)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def fidelity_vs_bytes(summary: list[dict], styles: PlotStyles | None = None) -> str | None:
    totals = [row for row in overall(summary) if row["kl_vs_full"] is not None and row["kv_bytes_kept"] is not None
              and not (row["policy"] == "full" and not row["quantization"])]
    if not totals:
        return None
    styles = styles or PlotStyles.of(totals)
    plt = _figure()
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for policy, quantization in _series(totals):
        points = sorted((row["kv_bytes_kept"] / 2**20, row["kl_vs_full"], row["ratio"]) for row in totals
                        if row["policy"] == policy and row["quantization"] == quantization)
        mib, kl, _ = zip(*points)
        axis.plot(mib, kl, marker=styles.markers[quantization], linestyle=styles.lines[quantization],
                  color=styles.colours[policy], label=f"{policy} {quantization}" if quantization else policy)
        for x, y, ratio in points:
            axis.annotate(f"{ratio:g}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    _mib_axis(axis, [row["kv_bytes_kept"] / 2**20 for row in totals])
    axis.set_xlabel("KV cache held (MiB, mean per sample, log scale; point labels: eviction ratio)")
    axis.set_ylabel("KL(full || cell), nats/token")
    _kl_axis(axis, [row["kl_vs_full"] for row in totals])
    axis.grid(alpha=0.3)
    _outside_legend(axis)
    return _png(figure)


def _mib_axis(axis, values: list[float]) -> None:
    """Log x axis with ticks at 1, 2 and 5 per decade of MiB, labelled plainly."""
    from matplotlib.ticker import NullLocator

    axis.set_xscale("log")
    ticks = [tick for tick in _ticks_125() if min(values) / 1.5 <= tick <= max(values) * 1.5]
    axis.set_xticks(ticks, [f"{tick:g}" for tick in ticks])
    axis.xaxis.set_minor_locator(NullLocator())


def _ticks_125() -> list[float]:
    return [step * 10.0 ** exponent for exponent in range(-5, 6) for step in (1, 2, 5)]


def _kl_axis(axis, values: list[float]) -> None:
    """Log scale (symlog, linear below 0.001, when a KL is 0) with ticks at 1, 2 and 5 per decade, labelled plainly."""
    from matplotlib.ticker import NullLocator

    positive = [value for value in values if value > 0] or [1e-3]
    if len(positive) == len(values):
        axis.set_yscale("log")
    else:
        axis.set_yscale("symlog", linthresh=1e-3)
    low, high = min(positive) / 1.5, max(positive) * 1.5
    ticks = [tick for tick in _ticks_125() if low <= tick <= high]
    ticks = ([0.0] if len(positive) < len(values) else []) + ticks
    axis.set_yticks(ticks, [f"{tick:g}" for tick in ticks])
    axis.yaxis.set_minor_locator(NullLocator())


STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;line-height:1.45}"
         "table{border-collapse:collapse;margin:0.5em 0;font-size:88%}"
         "td,th{border:1px solid #ccc;padding:3px 6px;white-space:nowrap}th{background:#f3f3f3;text-align:left}"
         "td{text-align:left}td.number{text-align:right}img{max-width:100%}"
         "figure{margin:0 0 1.5em 0;overflow-x:auto}figcaption,.caption{font-size:90%;color:#444;max-width:850px}"
         "dl.header{display:grid;grid-template-columns:max-content auto;gap:2px 1em}dl.header dt{font-weight:bold}"
         "dl.header dd{margin:0}.summary{background:#f5f8ff;border-left:4px solid #0072B2;padding:0.6em 1em 0.6em 2em;"
         "max-width:1050px}.summary li{margin:0.3em 0}")


def _html(header: list[tuple[str, str]], opening: list[str], notes: list[str], sections: list[Section]) -> str:
    """The page: the header, the summary with how to read its numbers, then each table or plot under its title
    with its caption."""
    items = "".join(f"<dt>{html.escape(label)}</dt><dd>{html.escape(text)}</dd>" for label, text in header)
    extra = "".join(f"<p>{html.escape(note)}</p>" for note in notes)
    summary = "".join(f"<li>{html.escape(sentence)}</li>" for sentence in opening)
    body = "".join(_html_section(section) for section in sections)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>kvlab bench report</title>"
            f"<style>{STYLE}</style></head><body><h1>kvlab bench report</h1><dl class='header'>{items}</dl>"
            f"<h2>Summary</h2><ul class='summary'>{summary}</ul>"
            f"<p class='caption'>{html.escape(ERROR_BARS + ' ' + NOISE_RULE)}</p>{extra}{body}</body></html>\n")


def _html_section(section: Section) -> str:
    title = html.escape(section.title)
    content = (f"<img alt='{title}' src='data:image/png;base64,{section.png}'>" if section.png
               else _html_table(section.table))
    return (f"<h2>{title}</h2><figure>{content}<figcaption>{html.escape(section.caption)}</figcaption>"
            "</figure>")


def _html_table(markdown: str) -> str:
    """One markdown table (header, rule, rows) as an HTML table."""
    lines = [line.strip().strip("|").split("|") for line in markdown.strip().splitlines()]
    head, rows = lines[0], lines[2:]
    cells = "".join(f"<th>{html.escape(cell.strip())}</th>" for cell in head)
    body = "".join("<tr>" + "".join(_html_cell(cell.strip()) for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _html_cell(text: str) -> str:
    """A table cell: numbers (and "-") right-aligned so their digits line up, words left-aligned."""
    numeric = text == "-" or text[:1].isdigit() or (text[:1] in "+-" and text[1:2].isdigit())
    return f"<td class='number'>{html.escape(text)}</td>" if numeric else f"<td>{html.escape(text)}</td>"
