"""The bench report: ``summary.json``, ``report.md`` and a self-contained ``report.html`` with the plots.

Plots (matplotlib, Agg backend): score vs eviction ratio per policy; the budget frontier (score against the KV
bytes held, every policy x quantization cell, Pareto-optimal cells joined); needle-in-a-haystack score by depth and
length per policy; fidelity (KL vs the full cache) against the KV bytes kept.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import defaultdict
from pathlib import Path

from kvlab.bench.summary import (
    best_per_budget,
    budget_table,
    fraction_label,
    frontier,
    markdown_tables,
    overall,
    per_turn,
    summarize,
)
from kvlab.fileio import atomic_write_text

NEEDLE_TASK_PREFIX = "niah"
# Okabe & Ito's colour-blind-safe palette; black first (``full``), yellow last (faint on white)
OKABE_ITO = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442")
QUANT_MARKERS = {None: "o", "int8": "s", "int4": "^", "int2": "D"}
MARKED_BUDGETS = (0.25, 0.125, 0.0625)
FRONTIER_CAPTION = ("Each point is one grid cell (eviction policy x KV quantization), placed by the KV bytes it holds "
                    "against the full cache at fp16; the step line joins the Pareto-optimal cells, i.e. the best "
                    "score reachable within each memory budget.")


def write_report(out_dir: Path, rows: list[dict], meta: dict) -> dict:
    """Write summary.json, report.md and report.html into ``out_dir``; return the paths and the main table (the
    files also carry the best cell per memory budget)."""
    out_dir = Path(out_dir)
    summary = summarize(rows)
    turns = per_turn(rows)
    table = markdown_tables(summary, turns)
    tables = "\n\n".join(block for block in (table, budget_table(summary)) if block)
    atomic_write_text(out_dir / "summary.json", json.dumps(
        {"meta": meta, "rows": summary, "turns": turns, "best_per_budget": best_per_budget(summary)}, indent=2) + "\n")
    atomic_write_text(out_dir / "report.md", f"# kvlab bench report\n\n{_meta_lines(meta)}\n\n{tables}\n")
    frontier_png = budget_frontier(summary)
    figures = {"Score vs eviction ratio": score_vs_ratio(summary),
               "Budget frontier: score vs memory": (frontier_png, FRONTIER_CAPTION) if frontier_png else None,
               "Needle retrieval by depth and length": needle_heatmaps(rows),
               "Fidelity vs KV bytes kept": fidelity_vs_bytes(summary)}
    atomic_write_text(out_dir / "report.html", _html(meta, tables, {k: v for k, v in figures.items() if v}))
    return {"summary": out_dir / "summary.json", "markdown": out_dir / "report.md",
            "html": out_dir / "report.html", "table": table}


def _meta_lines(meta: dict) -> str:
    keys = ("model", "weights", "weights_fidelity_vs_fp", "mode", "query_aware", "quantizations", "tasks", "lengths",
            "samples", "policies", "ratios", "prefills", "rows", "wall_s")
    return "\n".join(f"- {key}: {meta[key]}" for key in keys if meta.get(key) is not None)


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


def score_vs_ratio(summary: list[dict]) -> str | None:
    totals = overall(summary)
    if not totals:
        return None
    plt = _figure()
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for policy, quantization in sorted({(row["policy"], row["quantization"]) for row in totals}, key=str):
        points = sorted((row["ratio"], row["score"], row["stderr"]) for row in totals
                        if row["policy"] == policy and row["quantization"] == quantization)
        label = f"{policy} {quantization}" if quantization else policy
        if policy == "full":
            axis.axhline(points[0][1], color="black", linestyle="--" if not quantization else ":", linewidth=1,
                         label=f"{label} (no eviction)")
            continue
        ratios, scores, errors = zip(*points)
        axis.errorbar(ratios, scores, yerr=errors, marker="o", capsize=3, label=label)
    axis.set_xlabel("eviction ratio (fraction of context tokens evicted)")
    axis.set_ylabel("task score (mean ± s.e.)")
    axis.set_ylim(-0.03, 1.03)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower left")
    return _png(figure)


def budget_frontier(summary: list[dict]) -> str | None:
    """Score (mean ± s.e.) against memory fraction (KV bytes held / full bytes at fp16, log2 axis; compression on
    top) for every overall cell: colour by policy, marker by quantization, the Pareto frontier as a step line with
    its cells ringed, dotted lines at the budgets 1/4, 1/8 and 1/16. None when no cell has byte figures."""
    cells = [cell for cell in frontier(summary) if cell["memory_fraction"] is not None]
    if not cells:
        return None
    plt = _figure()
    figure, axis = plt.subplots(figsize=(7, 4.2))
    policies = sorted({cell["policy"] for cell in cells}, key=lambda name: (name != "full", name))
    colours = {name: OKABE_ITO[i % len(OKABE_ITO)] for i, name in enumerate(policies)}
    for cell in cells:
        axis.errorbar(cell["memory_fraction"], cell["score"], yerr=cell["stderr"], capsize=3, linestyle="none",
                      marker=_marker(cell["quantization"]), color=colours[cell["policy"]], markersize=6)
    _draw_pareto(axis, cells)
    for budget in MARKED_BUDGETS:
        axis.axvline(budget, color="grey", linestyle=":", linewidth=1)
    _fraction_axes(axis, [cell["memory_fraction"] for cell in cells] + list(MARKED_BUDGETS))
    axis.set_xlabel("KV bytes held / full cache bytes at fp16 (log scale; dotted: budgets 1/4, 1/8, 1/16)")
    axis.set_ylabel("task score (mean ± s.e.)")
    axis.set_ylim(-0.03, 1.03)
    axis.grid(alpha=0.3)
    axis.legend(handles=_frontier_legend(colours, cells), fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1),
                borderaxespad=0)
    return _png(figure)


def _marker(quantization: str | None) -> str:
    """By scheme (``int4:r0`` draws as ``int4``)."""
    scheme = None if quantization is None else quantization.split(":")[0]
    return QUANT_MARKERS.get(scheme, "X")


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


def _frontier_legend(colours: dict[str, str], cells: list[dict]) -> list:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colour, marker="o", linestyle="none", label=name)
               for name, colour in colours.items()]
    for quantization in sorted({cell["quantization"] for cell in cells}, key=lambda q: (q is not None, str(q))):
        handles.append(Line2D([], [], color="grey", marker=_marker(quantization), linestyle="none",
                              label=f"KV {quantization or 'not quantized'}"))
    handles.append(Line2D([], [], color="grey", marker="o", markerfacecolor="none", markeredgecolor="black",
                          markersize=10, label="Pareto frontier"))
    return handles


def needle_heatmaps(rows: list[dict]) -> str | None:
    """One panel per cell (policy @ ratio): mean needle score by depth (rows) and context length (columns)."""
    needle_rows = [row for row in rows if row["task"].startswith(NEEDLE_TASK_PREFIX) and row["depth"] is not None]
    if not needle_rows:
        return None
    panels = sorted({(row["policy"], row["ratio"], row.get("quantization")) for row in needle_rows},
                    key=lambda cell: (cell[0] != "full", cell[0], cell[1], str(cell[2])))
    depths = sorted({round(row["depth"], 2) for row in needle_rows})
    lengths = sorted({row["length_tokens"] for row in needle_rows})
    plt = _figure()
    width = 0.5 + 0.45 * len(lengths)
    figure, axes = plt.subplots(1, len(panels), figsize=(1.5 + width * len(panels), 3.4), squeeze=False,
                                sharey=True)
    image = None
    for axis, (policy, ratio, quantization) in zip(axes[0], panels):
        cells = defaultdict(list)
        for row in needle_rows:
            if (row["policy"], row["ratio"], row.get("quantization")) == (policy, ratio, quantization):
                cells[(round(row["depth"], 2), row["length_tokens"])].append(row["score"])
        grid = [[sum(cells[(d, n)]) / len(cells[(d, n)]) if cells[(d, n)] else float("nan") for n in lengths]
                for d in depths]
        image = axis.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        title = policy if policy == "full" else f"{policy}\n@ {ratio:g}"
        axis.set_title(f"{title} {quantization}" if quantization else title, fontsize=8)
        axis.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7, rotation=90)
        axis.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
    axes[0][0].set_ylabel("needle depth", fontsize=8)
    figure.supxlabel("context tokens", fontsize=8, y=-0.06)
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="score")
    return _png(figure)


def fidelity_vs_bytes(summary: list[dict]) -> str | None:
    totals = [row for row in overall(summary) if row["kl_vs_full"] is not None
              and not (row["policy"] == "full" and not row["quantization"])]
    if not totals:
        return None
    plt = _figure()
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for policy, quantization in sorted({(row["policy"], row["quantization"]) for row in totals}, key=str):
        points = sorted((row["kv_bytes_kept"] / 2**20, row["kl_vs_full"], row["ratio"]) for row in totals
                        if row["policy"] == policy and row["quantization"] == quantization)
        mib, kl, ratios = zip(*points)
        axis.plot(mib, kl, marker="o", label=f"{policy} {quantization}" if quantization else policy)
        for x, y, ratio in points:
            axis.annotate(f"{ratio:g}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    axis.set_xlabel("KV cache kept (MiB, mean per sample; labels: eviction ratio)")
    axis.set_ylabel("KL(full || policy), nats/token")
    axis.set_yscale("symlog", linthresh=1e-3)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _png(figure)


def _html(meta: dict, table_markdown: str, figures: dict[str, str | tuple[str, str]]) -> str:
    """The page: meta list, the markdown blocks, then each figure under its title; a figure given as
    ``(png, caption)`` gets the caption under the image."""
    tables = "".join(_html_block(block) for block in table_markdown.split("\n\n") if block.strip())
    meta_items = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in meta.items()
                         if v is not None)
    images = "".join(_html_figure(title, figure) for title, figure in figures.items())
    return ("<!doctype html><html><head><meta charset='utf-8'><title>kvlab bench report</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;"
            "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
            "td:first-child,th:first-child{text-align:left}img{max-width:100%}figure{margin:0}"
            "figcaption{font-size:90%;color:#444;max-width:800px}</style></head><body>"
            f"<h1>kvlab bench report</h1><ul>{meta_items}</ul>{tables}{images}</body></html>\n")


def _html_figure(title: str, figure: str | tuple[str, str]) -> str:
    png, caption = figure if isinstance(figure, tuple) else (figure, "")
    caption_html = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (f"<h2>{html.escape(title)}</h2><figure><img alt='{html.escape(title)}' "
            f"src='data:image/png;base64,{png}'>{caption_html}</figure>")


def _html_block(markdown: str) -> str:
    """One markdown block: a ``#`` heading, a table (lines starting with ``|``) or a paragraph."""
    text = markdown.strip()
    if text.startswith("#"):
        return f"<h2>{html.escape(text.lstrip('#').strip())}</h2>"
    return _html_table(text) if text.startswith("|") else f"<p>{html.escape(text)}</p>"


def _html_table(markdown: str) -> str:
    """One markdown table (header, rule, rows) as an HTML table."""
    lines = [line.strip().strip("|").split("|") for line in markdown.strip().splitlines()]
    head, rows = lines[0], lines[2:]
    cells = "".join(f"<th>{html.escape(cell.strip())}</th>" for cell in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell.strip())}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"
