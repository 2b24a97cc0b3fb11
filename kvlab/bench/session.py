"""A whole bench run: settings (preset + overrides), samples, the grid, resume bookkeeping and the report."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvlab.bench.formats import load_data
from kvlab.bench.presets import PRESETS, get_preset
from kvlab.bench.report import write_report
from kvlab.bench.results import ResultsFile
from kvlab.bench.runner import BenchProgress, Cell, GridSettings, grid, run_grid, run_info_for
from kvlab.errors import KvlabError, ParameterError
from kvlab.fileio import atomic_write_text
from kvlab.models.extension import extension_label

DEFAULT_GRID = PRESETS["quick"]


@dataclass(frozen=True)
class BenchRequest:
    """Everything that defines a bench run. ``tasks`` is ignored when ``data_file`` is given."""

    model: str
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    samples: int
    policies: tuple[str, ...]
    ratios: tuple[float, ...]
    out_dir: str
    query_aware: bool = False
    mode: str = "single"
    quantizations: tuple[str | None, ...] = (None,)
    data_file: str | None = None
    haystack_dir: str | None = None
    seed: int = 0
    device: str | None = None
    dtype: str = "auto"  # weights' dtype (models.dtypes); part of the fingerprint, so of the results folder
    weights: str = "fp"  # "int8": weight-only int8 linear layers (its own fingerprint, its own results folder)
    chunk_tokens: int = 4096
    force: bool = False
    extension: str | None = None  # --extend (models.extension): part of the fingerprint, so of the results folder
    max_kv_memory: tuple[int, ...] = ()  # --max-kv-memory limits (bytes): each adds a streamed variant of KV cells

    @classmethod
    def from_cli(cls, args) -> BenchRequest:
        base = get_preset(args.preset) if args.preset else DEFAULT_GRID
        samples = base.samples if args.samples is None else args.samples
        if samples < 1:
            raise ParameterError(f"--samples must be >= 1 (got {samples})")
        lengths = _parse_list(args.lengths, int, "--lengths") if args.lengths else base.lengths
        if any(length < 64 for length in lengths):
            raise ParameterError(f"--lengths must be at least 64 tokens each (got {args.lengths})")
        return cls(
            model=args.model, tasks=_parse_list(args.tasks, str, "--tasks") if args.tasks else base.tasks,
            lengths=lengths, samples=samples,
            policies=_parse_list(args.policies, str, "--policies") if args.policies else base.policies,
            ratios=_parse_list(args.ratios, float, "--ratios") if args.ratios else base.ratios,
            out_dir=args.out,
            query_aware=(bool(args.preset) and base.query_aware and args.mode == "single")
            if args.query_aware is None else args.query_aware,
            mode=args.mode, quantizations=_quantizations(args.quantize), data_file=args.data,
            haystack_dir=args.haystack_dir, seed=args.seed, device=args.device, dtype=args.dtype, weights=args.weights,
            chunk_tokens=args.chunk_tokens, force=args.force, extension=extension_label(getattr(args, "extend", None)),
            max_kv_memory=_limits(getattr(args, "max_kv_memory", None)))

    def cells(self) -> list[Cell]:
        """The run's grid, built the same way by the driver and by every Ray worker (jobs name cells by index)."""
        return grid(list(self.policies), list(self.ratios), list(self.quantizations), list(self.max_kv_memory))


def _limits(text: str | None) -> tuple[int, ...]:
    """``--max-kv-memory 64MiB,256MiB`` → bytes, each with a unit (``store.store.parse_size``)."""
    from kvlab.store.store import parse_size

    return () if not text else tuple(parse_size(item, require_unit=True)
                                     for item in _parse_list(text, str, "--max-kv-memory"))


def _quantizations(text: str | None) -> tuple[str | None, ...]:
    if not text:
        return (None,)
    return tuple(None if item.lower() == "none" else item.lower() for item in _parse_list(text, str, "--kv-quant"))


def _parse_list(text: str, kind, flag: str) -> tuple:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ParameterError(f"{flag} needs a comma-separated list (got {text!r})")
    try:
        return tuple(kind(item) for item in items)
    except ValueError:
        raise ParameterError(f"{flag} expects comma-separated {kind.__name__} values (got {text!r})") from None


@dataclass
class BenchOutcome:
    table: str
    status_line: str
    paths: dict
    interrupted: bool
    prefills: int
    rows_written: int
    failures: list[dict] = field(default_factory=list)  # samples given up after their retries (Ray runs)
    worker_restarts: int = 0  # Ray runs: workers that died mid-sample and were restarted


def build_samples(request: BenchRequest, tokenizer) -> list:
    from kvlab.bench.tasks import make_samples

    if request.data_file:
        return load_data(request.data_file)  # [FORMAT:]FILE or FORMAT:hub:NAME (see kvlab.bench.formats)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return [sample for task in request.tasks for length in request.lengths
            for sample in make_samples(task, count_tokens, length, request.samples, seed=request.seed,
                                       haystack_dir=request.haystack_dir)]


def run_bench(request: BenchRequest, *, progress: bool = True, loaded=None, ray=None,
              on_sample=None) -> BenchOutcome:
    """Run (or resume) the grid of ``request`` into ``request.out_dir``; ``loaded`` reuses a loaded model;
    ``ray`` (``distributed.RayOptions``) runs the samples on Ray workers instead of in this process
    (``on_sample`` is then called after each finished sample)."""
    cells = request.cells()  # fails before loading
    GridSettings(request.mode, request.query_aware, request.seed, request.force).check_cells(cells)
    out_dir = Path(request.out_dir)
    results = ResultsFile(out_dir / "results.jsonl")
    started = time.time()
    outcome: BenchProgress
    if ray is not None:
        from kvlab.bench.distributed import RayPool

        with RayPool(request, ray, progress=progress) as pool:
            run_info = pool.run_info
            _check_folder(out_dir, run_info, request)
            samples = load_data(request.data_file) if request.data_file else pool.samples()
            meta_fidelity = pool.weights_fidelity(samples[0].context) if request.weights != "fp" and samples else None
            settings = GridSettings(request.mode, request.query_aware, request.seed, request.force, run_info)
            outcome = pool.run(samples, cells, results, settings, on_sample=on_sample)
            machine = pool.machine
    else:
        from kvlab.engine import Engine
        from kvlab.models import load_model

        loaded = loaded or load_model(request.model, device=request.device, dtype=request.dtype,
                                      weights=request.weights, progress=progress, extension=request.extension)
        engine = Engine(loaded, chunk_tokens=request.chunk_tokens)
        run_info = run_info_for(engine)
        _check_folder(out_dir, run_info, request)
        samples = build_samples(request, loaded.tokenizer)
        if loaded.weights != "fp" and samples:
            meta_fidelity = weights_fidelity(request, loaded, samples[0].context)
        else:
            meta_fidelity = None
        outcome = run_grid(engine, samples, cells, results, mode=request.mode, query_aware=request.query_aware,
                           seed=request.seed, force=request.force, run_info=run_info, progress=progress)
        machine = machine_description(str(engine.loaded.device))
    failures = [asdict(failure) for failure in outcome.failures]
    state = _update_run_file(out_dir, run_info, request, outcome, started, machine, failures)
    meta = {**run_info, "mode": request.mode, "query_aware": request.query_aware,
            "quantizations": [q or "none" for q in request.quantizations],
            "tasks": [request.data_file] if request.data_file else list(request.tasks),
            "lengths": list(request.lengths), "samples": request.samples, "policies": list(request.policies),
            "ratios": list(request.ratios), "max_kv_memory": list(request.max_kv_memory),
            "prefills": state["prefills"], "rows": len(results.rows),
            "wall_s": round(state["wall_s"], 1), "weights_fidelity_vs_fp": meta_fidelity,
            "cells_per_prefill": round(len(results.rows) / max(1, state["prefills"]), 2)}
    paths = write_report(out_dir, _rows_of(results.rows, request), meta)
    status = (f"{outcome.rows_written} rows from {outcome.prefills} prefills in {outcome.wall_s:.0f} s"
              f" ({outcome.cells_skipped} cells already done); {len(results.rows)} rows in {out_dir}/results.jsonl")
    if failures:
        status += (f"; {len(failures)} samples failed after retries (listed in {out_dir}/run.json under "
                   f"failed_samples): rerun the same command to retry them")
    if outcome.interrupted:
        status += "; interrupted: rerun the same command to resume"
    restarts = outcome.worker_restarts
    if restarts:
        status += f"; {restarts} Ray workers died mid-sample and were restarted (their samples ran again)"
    return BenchOutcome(paths["table"], status, paths, outcome.interrupted, outcome.prefills, outcome.rows_written,
                        failures, restarts)


def weights_fidelity(request: BenchRequest, loaded, text: str, max_tokens: int = 1024) -> dict:
    """How far the quantized-weights model is from the model's own weights (KL and greedy agreement, per
    ``models.weights.weight_fidelity``) on the first sample's context: the bench's rows compare cells with the
    quantized model's own full cache, so this is the one figure that shows what ``--weights`` itself costs."""
    import torch

    from kvlab.models import load_model
    from kvlab.models.weights import weight_fidelity

    reference = load_model(request.model, device=request.device, dtype=request.dtype, progress=False,
                           extension=request.extension)
    ids = torch.tensor(loaded.tokenizer(text, add_special_tokens=True)["input_ids"][:max_tokens])
    fidelity = weight_fidelity(reference.model, loaded.model, ids)
    del reference
    return {key: round(value, 5) if isinstance(value, float) else value for key, value in fidelity.items()}


def _rows_of(rows: list[dict], request: BenchRequest) -> list[dict]:
    """The rows of this run's setting (a folder may hold rows of several modes; report one)."""
    return [row for row in rows if row["query_aware"] == request.query_aware
            and row.get("mode", "single") == request.mode]


def _check_folder(out_dir: Path, run_info: dict, request: BenchRequest) -> None:
    run_file = out_dir / "run.json"
    if not run_file.exists():
        return
    try:
        previous = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise KvlabError(f"{run_file} is unreadable; remove it or choose another --out folder") from None
    if previous.get("model_fingerprint") != run_info["model_fingerprint"]:
        raise KvlabError(f"{out_dir} holds results of model {previous.get('model')!r} (another fingerprint); "
                         f"choose another --out folder for {request.model!r}")


def _update_run_file(out_dir: Path, run_info: dict, request: BenchRequest, outcome, started: float,
                     machine: str, failures: list[dict]) -> dict:
    run_file = out_dir / "run.json"
    state = json.loads(run_file.read_text(encoding="utf-8")) if run_file.exists() else {"prefills": 0, "wall_s": 0.0}
    state.update(run_info)
    state["prefills"] = state.get("prefills", 0) + outcome.prefills
    state["wall_s"] = state.get("wall_s", 0.0) + outcome.wall_s
    state["query_aware"] = request.query_aware
    state["mode"] = request.mode
    state["last_request"] = asdict(request)
    state["last_run_started"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))
    state["machine"] = machine
    state["failed_samples"] = failures  # of the last run; a rerun retries them
    atomic_write_text(run_file, json.dumps(state, indent=2) + "\n")
    return state


def machine_description(device: str | None = None) -> str:
    """Where the run ran, in words: the GPU's name, or the CPU's architecture, cores and torch threads."""
    import os
    import platform

    import torch

    if device and device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA), torch {torch.__version__}"
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def report_folder(folder: str) -> dict:
    out_dir = Path(folder)
    results_file = out_dir / "results.jsonl"
    if not results_file.is_file():
        raise KvlabError(f"{folder} has no results.jsonl; run `kvlab bench --out {folder}` first")
    rows = ResultsFile(results_file).rows
    if not rows:
        raise KvlabError(f"{results_file} holds no rows yet; run `kvlab bench --out {folder}`")
    run_file = out_dir / "run.json"
    meta = json.loads(run_file.read_text(encoding="utf-8")) if run_file.exists() else {}
    meta.pop("last_request", None)
    query_aware = meta.get("query_aware", rows[-1]["query_aware"])
    mode = meta.get("mode", rows[-1].get("mode", "single"))
    return write_report(out_dir, [row for row in rows if row["query_aware"] == query_aware
                                  and row.get("mode", "single") == mode], meta)


def list_tasks_text() -> str:
    from kvlab.bench.tasks import TASKS

    width = max(len(name) for name in TASKS.names())
    return "\n".join(f"{name:<{width}}  {TASKS.get(name).description}" for name in TASKS.names())
