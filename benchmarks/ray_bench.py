"""`kvlab bench --ray` against a serial `kvlab bench` on the same grid, on this machine, in one run.

Three runs of one grid, each into its own folder:
1. serial: `kvlab bench GRID` (one process, torch on every core);
2. Ray: `kvlab bench GRID --ray --ray-workers W` (a local cluster started for the run, W workers of 1 CPU each);
3. failure: the same Ray run driven from this process, which SIGKILLs every worker process once, right after the
   first sample finishes (so at least one sample dies mid-run and must be run again).
Runs 1 and 2 are timed as whole commands (model loading, and for Ray the cluster's start and stop, included);
`grid_s` is the grid alone as each run's run.json records it. Every Ray row is compared with the serial row of the
same sample, question and cell: prediction, score and greedy agreement must be equal, KL to float rounding
(workers run 1 torch thread, the serial run several). Targets (issue 13): results identical, Ray wall <= 0.8x
serial; after the kill, the run finishes and every answer appears once. Prints met / NOT met; writes JSON.

    python benchmarks/ray_bench.py --out benchmarks/results/ray_bench_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import environment, write_json

TIMINGS = {"prefill_s", "compress_s", "decode_s", "question_s", "load_s", "peak_rss_mib", "kl_vs_full"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="niah_single_1,niah_multikey_1,vt")
    parser.add_argument("--lengths", default="1024")
    parser.add_argument("--samples", type=int, default=4, help="samples per task and length")
    parser.add_argument("--policies", default="full,snapkv,knorm,streaming_llm")
    parser.add_argument("--ratios", default="0.5,0.75")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-failure", action="store_true", help="skip run 3 (the killed workers)")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()
    grid = ["--model", args.model, "--tasks", args.tasks, "--lengths", args.lengths, "--samples", str(args.samples),
            "--policies", args.policies, "--ratios", args.ratios]
    with tempfile.TemporaryDirectory(prefix="kvlab-ray-bench-") as folder:
        root = Path(folder)
        serial_s = timed_command([*grid, "--out", str(root / "serial")])
        ray_s = timed_command([*grid, "--ray", "--ray-workers", str(args.workers), "--out", str(root / "ray")])
        serial, distributed = rows(root / "serial"), rows(root / "ray")
        compared = compare(serial, distributed)
        report = {"grid": " ".join(shlex.quote(part) for part in grid), "workers": args.workers,
                  "samples": len({key[0] for key in serial}), "answers": len(serial),
                  "serial": {"wall_s": round(serial_s, 2), "grid_s": grid_seconds(root / "serial")},
                  "ray": {"wall_s": round(ray_s, 2), "grid_s": grid_seconds(root / "ray")},
                  "wall_ratio": round(ray_s / serial_s, 3), "identical": compared}
        report["grid_ratio"] = round(report["ray"]["grid_s"] / report["serial"]["grid_s"], 3)
        if not args.skip_failure:
            report["failure"] = failure_run(args, root / "killed", serial)
    met = lambda ok: "met" if ok else "NOT met"
    print(f"grid: {report['grid']} ({report['samples']} samples, {report['answers']} answers)")
    print(f"serial: {report['serial']['wall_s']:.1f} s (grid {report['serial']['grid_s']:.1f} s); "
          f"Ray, {args.workers} workers: {report['ray']['wall_s']:.1f} s (grid {report['ray']['grid_s']:.1f} s)")
    print(f"Ray / serial wall: {report['wall_ratio']:.2f} (target <= 0.8: {met(report['wall_ratio'] <= 0.8)}); "
          f"grid alone: {report['grid_ratio']:.2f}")
    print(f"results identical to serial: {compared['identical']} ({compared['equal']}/{compared['answers']} rows; "
          f"max |KL difference| {compared['max_kl_difference']:.2e}): {met(compared['identical'])}")
    if "failure" in report:
        failure = report["failure"]
        print(f"killed {failure['killed']} worker processes after the first sample: {failure['worker_restarts']} "
              f"restarts, {failure['failed_samples']} failed samples, every answer once: "
              f"{failure['every_answer_once']}, identical to serial: {failure['identical']} "
              f"({failure['wall_s']:.1f} s): {met(failure['every_answer_once'] and failure['identical'])}")
    write_json(args.out, {"environment": environment(), **report})


def timed_command(arguments: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kvlab", "bench", *arguments], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"kvlab bench {shlex.join(arguments)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def rows(folder: Path) -> dict:
    lines = (folder / "results.jsonl").read_text(encoding="utf-8").splitlines()
    found = [json.loads(line) for line in lines]
    keyed = {(row["sample_id"], row["question_index"], row["policy"], row["ratio"], row["quantization"]): row
             for row in found}
    if len(keyed) != len(found):
        raise SystemExit(f"{folder}: a row appears twice")
    return keyed


def grid_seconds(folder: Path) -> float:
    return round(json.loads((folder / "run.json").read_text(encoding="utf-8"))["wall_s"], 2)


def compare(serial: dict, distributed: dict) -> dict:
    same_keys = serial.keys() == distributed.keys()
    equal, kl_difference = 0, 0.0
    for key, row in distributed.items():
        reference = serial.get(key)
        if reference is None:
            continue
        strip = lambda values: {name: value for name, value in values.items() if name not in TIMINGS}
        equal += strip(row) == strip(reference)
        if row["kl_vs_full"] is not None:
            kl_difference = max(kl_difference, abs(row["kl_vs_full"] - reference["kl_vs_full"]))
    return {"identical": same_keys and equal == len(serial) and kl_difference < 1e-3, "equal": equal,
            "answers": len(serial), "same_answers_present": same_keys, "max_kl_difference": kl_difference}


def failure_run(args, folder: Path, serial: dict) -> dict:
    from kvlab.bench.distributed import RayOptions
    from kvlab.bench.session import BenchRequest, run_bench

    request = BenchRequest(model=args.model, tasks=tuple(args.tasks.split(",")),
                           lengths=tuple(int(length) for length in args.lengths.split(",")), samples=args.samples,
                           policies=tuple(args.policies.split(",")),
                           ratios=tuple(float(ratio) for ratio in args.ratios.split(",")), out_dir=str(folder))
    killed: list[int] = []

    def kill_every_worker_once(pool, outcome) -> None:
        if not killed:
            for pid in pool.pids:
                os.kill(pid, signal.SIGKILL)
            killed.extend(pool.pids)

    started = time.perf_counter()
    outcome = run_bench(request, progress=False, ray=RayOptions(workers=args.workers),
                        on_sample=kill_every_worker_once)
    wall_s = time.perf_counter() - started
    found = [json.loads(line) for line in (folder / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    keys = [(row["sample_id"], row["question_index"], row["policy"], row["ratio"], row["quantization"])
            for row in found]
    compared = compare(serial, rows(folder)) if len(set(keys)) == len(keys) else {"identical": False}
    return {"killed": len(killed), "worker_restarts": outcome.worker_restarts,
            "failed_samples": len(outcome.failures), "every_answer_once": sorted(keys) == sorted(serial),
            "identical": compared["identical"], "wall_s": round(wall_s, 2)}


if __name__ == "__main__":
    main()
