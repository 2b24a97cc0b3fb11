"""One prefill per sample vs one prefill per cell: wall time of the same policy x ratio grid both ways.

The grid way is `kvlab bench`'s runner (prefill once, compress a copy per cell, answer, teacher-force for
fidelity). The per-cell way calls `Engine.ask` for every cell, which prefills the context each time and skips
fidelity scoring, so the ratio printed is, if anything, conservative. Also checks that both ways give the same
answers.

    python benchmarks/sweep_speedup.py --model smollm2-135m --length 1024 --samples 2 \
        --out benchmarks/results/sweep_speedup.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import environment, write_json

from kvlab.bench.results import ResultsFile
from kvlab.bench.runner import grid, run_grid
from kvlab.bench.tasks import make_samples
from kvlab.engine import Engine
from kvlab.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="niah_single_2")
    parser.add_argument("--length", type=int, default=1024, help="context tokens per sample")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--policies", default="full,streaming_llm,snapkv,knorm,tova")
    parser.add_argument("--ratios", default="0.5,0.75,0.9")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()

    loaded = load_model(args.model, progress=False)
    engine = Engine(loaded)
    count = lambda text: len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    samples = make_samples(args.task, count, args.length, args.samples, seed=0)
    cells = grid(args.policies.split(","), [float(r) for r in args.ratios.split(",")])

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        outcome = run_grid(engine, samples, cells, ResultsFile(Path(folder) / "results.jsonl"), progress=False)
        grid_s = time.perf_counter() - started

    started = time.perf_counter()
    separate_answers = {}
    for sample in samples:
        for cell in cells:
            answer = engine.ask(sample.context, sample.questions[0], cell.policy,
                                ratio=None if cell.policy.name == "full" else cell.ratio,
                                max_new_tokens=sample.max_new_tokens, answer_prefix=sample.answer_prefix)
            separate_answers[(sample.id, cell.policy.name, cell.ratio)] = answer.answer
    separate_s = time.perf_counter() - started

    same = sum(separate_answers[(row["sample_id"], row["policy"], row["ratio"])] == row["prediction"]
               for row in outcome.rows)
    speedup = separate_s / grid_s
    print(f"{args.model}: {len(samples)} samples x {len(cells)} cells at {args.length} tokens ({args.task})")
    print(f"  grid (one prefill per sample):  {grid_s:7.1f} s, {outcome.prefills} prefills, with fidelity scoring")
    print(f"  separate (one prefill per cell): {separate_s:7.1f} s, {len(samples) * len(cells)} prefills")
    print(f"  speedup x{speedup:.2f}; identical answers in {same}/{len(outcome.rows)} cells")
    write_json(args.out, {"benchmark": "sweep_speedup", "model": args.model, "task": args.task,
                          "length_tokens": args.length, "samples": len(samples), "cells": len(cells),
                          "grid_s": grid_s, "separate_s": separate_s, "speedup": speedup,
                          "grid_prefills": outcome.prefills, "identical_answers": same, "rows": len(outcome.rows),
                          "environment": environment()})


if __name__ == "__main__":
    main()
