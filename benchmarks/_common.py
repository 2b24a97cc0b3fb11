"""Shared bits of the benchmark scripts: environment metadata for the JSON they write, and robust timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def environment() -> dict:
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "git_commit": commit, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "machine": platform.machine(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def timed_runs(run: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``run`` (after one untimed warm-up call)."""
    run()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - started)
    return times


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "runs_s": times}
