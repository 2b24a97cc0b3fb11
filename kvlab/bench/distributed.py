"""``kvlab bench --ray``: the grid's samples on a Ray cluster, one sample (its prefill and all its cells) per task.

Ray does the scheduling, the worker processes and their restarts; this module only decides what a unit of work is
and keeps the driver the single writer of ``results.jsonl``:

- each worker is a Ray actor that loads the model once, with torch threads matching the CPUs it reserved (or on
  the GPU it reserved), and builds the same grid from the same specs, so a job names its cells by index;
- the driver plans the jobs exactly as a serial run does (``runner.plan_jobs``: what ``results.jsonl`` already
  holds is skipped), keeps one job in flight per worker, and appends each finished sample's rows as it arrives.
  Every row is computed by ``runner.run_sample``, the code a serial run uses, so the rows equal a serial run's
  (greedy decoding, same seeds), apart from timings and each process's peak RSS;
- a job whose worker died (Ray restarts the actor, a bounded number of times) or whose task raised is retried up
  to ``retries`` times, then recorded as failed with its error; the run goes on. A rerun retries it, since a
  failed sample has no rows.

``address`` None starts a local cluster for the run (and stops it after); ``"auto"`` or an address joins an
existing one, which stays up. Workers need kvlab and its dependencies installed on every node; ``KVLAB_*``
environment variables of the driver are passed to them.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass

from tqdm.auto import tqdm

from kvlab.bench.results import ResultsFile
from kvlab.bench.runner import BenchProgress, Cell, GridSettings, SampleJob, plan_jobs
from kvlab.bench.tasks.base import Sample
from kvlab.errors import KvlabError, ParameterError

# A worker process that dies is restarted this many times (by Ray); a restarted worker is probed every
# PROBE_INTERVAL_S and takes jobs again once it answers; one that does not answer within RECOVERY_S (its model load
# included) is left out, and its jobs go to the others.
WORKER_RESTARTS = 3
PROBE_INTERVAL_S = 0.5
RECOVERY_S = 300.0


@dataclass(frozen=True)
class RayOptions:
    """How the bench uses Ray: ``address`` None starts a local cluster; ``workers`` None: as many as the cluster's
    CPUs (or GPUs, with ``gpus_per_worker``) allow, at most one per sample."""

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    retries: int = 2

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ParameterError(f"--ray-workers must be >= 1 (got {self.workers})")
        if self.cpus_per_worker <= 0:
            raise ParameterError(f"--ray-cpus-per-worker must be > 0 (got {self.cpus_per_worker})")
        if self.gpus_per_worker < 0:
            raise ParameterError(f"--ray-gpus-per-worker must be >= 0 (got {self.gpus_per_worker})")
        if self.retries < 0:
            raise ParameterError(f"--ray-retries must be >= 0 (got {self.retries})")


@dataclass
class Failure:
    """A sample given up after its retries: it has no rows, so a rerun tries it again."""

    sample_id: str
    attempts: int
    error: str


@dataclass
class RayProgress(BenchProgress):
    workers: int = 0


def import_ray():
    try:
        import ray
    except ImportError:
        raise KvlabError("kvlab bench --ray needs Ray: pip install 'kvlab[ray]'") from None
    return ray


class BenchWorker:
    """The body of a Ray actor (wrapped by ``ray.remote`` at run time, so this module imports without Ray): one
    model, one engine, the run's grid."""

    def __init__(self, request, cpus: float, gpus: float) -> None:
        import torch

        from kvlab.bench.runner import observation_request
        from kvlab.engine import Engine
        from kvlab.models import load_model

        if gpus <= 0:
            torch.set_num_threads(max(1, int(cpus)))  # the CPUs Ray reserved for this actor, no more
        self.request = request
        device = request.device if request.device or gpus > 0 else "cpu"
        self.loaded = load_model(request.model, device=device, dtype=request.dtype, weights=request.weights,
                                 progress=False, extension=request.extension)
        self.engine = Engine(self.loaded, chunk_tokens=request.chunk_tokens)
        self.cells = request.cells()  # the driver's grid, cell for cell (session.BenchRequest.cells)
        self.observations = observation_request(self.cells)

    def describe(self) -> dict:
        from kvlab.bench.runner import run_info_for
        from kvlab.bench.session import machine_description

        device = str(self.loaded.device)
        return {"run_info": run_info_for(self.engine), "device": device, "pid": os.getpid(),
                "machine": machine_description(device)}

    def samples(self) -> list[Sample]:
        from kvlab.bench.session import build_samples

        return build_samples(self.request, self.loaded.tokenizer)

    def weights_fidelity(self, text: str) -> dict:
        from kvlab.bench.session import weights_fidelity

        return weights_fidelity(self.request, self.loaded, text)

    def run(self, job: SampleJob, settings: GridSettings) -> tuple[list[dict], int]:
        from kvlab.bench.runner import run_sample

        return run_sample(self.engine, job, self.cells, settings, self.observations)


class RayPool:
    """The workers of one bench run; a context manager that connects to (or starts) the cluster and stops what it
    started."""

    def __init__(self, request, options: RayOptions, *, progress: bool = True) -> None:
        self.request, self.options, self.progress = request, options, progress
        self.ray = import_ray()
        self._started_cluster = False
        self.workers: list = []
        self.description: dict = {}
        self.pids: list[int] = []
        self._samples = None

    def __enter__(self) -> RayPool:
        ray = self.ray
        if not ray.is_initialized():
            env = {key: value for key, value in os.environ.items() if key.startswith("KVLAB_")}
            runtime_env = {"env_vars": env} if env else None
            try:
                if self.options.address is None:
                    ray.init(include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
                    self._started_cluster = True
                else:
                    ray.init(address=self.options.address, log_to_driver=False, runtime_env=runtime_env)
            except ConnectionError as error:
                raise KvlabError(f"cannot join the Ray cluster at {self.options.address!r} ({error}); start one "
                                 f"with `ray start --head`, or run --ray without an address for a local "
                                 f"cluster") from None
        try:
            self._start_workers()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start_workers(self) -> None:
        ray, options = self.ray, self.options
        resources = ray.cluster_resources()
        if options.gpus_per_worker > 0:
            available = resources.get("GPU", 0.0)
            if available < options.gpus_per_worker:
                raise KvlabError(f"the Ray cluster has {available:g} GPUs; --ray-gpus-per-worker "
                                 f"{options.gpus_per_worker:g} needs at least that many")
            fitting = int(available // options.gpus_per_worker)
        else:
            fitting = int(resources.get("CPU", 0.0) // options.cpus_per_worker)
        if fitting < 1:
            raise KvlabError(f"the Ray cluster has {resources.get('CPU', 0.0):g} CPUs; --ray-cpus-per-worker "
                             f"{options.cpus_per_worker:g} needs at least that many")
        count = options.workers or fitting
        actor = ray.remote(BenchWorker).options(num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker,
                                                max_restarts=WORKER_RESTARTS)
        self.workers = [actor.remote(self.request, options.cpus_per_worker, options.gpus_per_worker)
                        for _ in range(count)]
        # generated tasks are built by the first worker while the others still load the model
        self._samples = None if self.request.data_file else self.workers[0].samples.remote()
        descriptions = self._get([worker.describe.remote() for worker in self.workers], "loading the model")
        self.description = descriptions[0]
        self.pids = [description["pid"] for description in descriptions]  # at start; a restart changes them

    def _get(self, reference, doing: str):
        try:
            return self.ray.get(reference)
        except self.ray.exceptions.RayError as error:
            raise KvlabError(f"a Ray worker failed while {doing}: {_error_text(error)}") from None

    def __exit__(self, *exc_info) -> None:
        for worker in self.workers:
            self.ray.kill(worker)
        self.workers = []
        if self._started_cluster:
            self.ray.shutdown()
            self._started_cluster = False

    @property
    def run_info(self) -> dict:
        return self.description["run_info"]

    @property
    def machine(self) -> str:
        options = self.options
        share = (f"{options.gpus_per_worker:g} GPU" if options.gpus_per_worker > 0
                 else f"{options.cpus_per_worker:g} CPU")
        return f"Ray: {len(self.workers)} workers x {share}, first on {self.description['machine']}"

    def samples(self) -> list[Sample]:
        reference = self._samples if self._samples is not None else self.workers[0].samples.remote()
        return self._get(reference, "building the samples")

    def weights_fidelity(self, text: str) -> dict:
        return self._get(self.workers[0].weights_fidelity.remote(text), "measuring the weights' fidelity")

    def run(self, samples: list[Sample], cells: list[Cell], results: ResultsFile, settings: GridSettings,
            on_sample=None) -> RayProgress:
        """Every job on the workers, one in flight per worker; rows are appended as each sample finishes.
        ``on_sample(pool, outcome)`` is called after each finished sample (tests and the failure benchmark kill
        workers from there)."""
        ray = self.ray
        settings.check_cells(cells)
        started = time.perf_counter()
        outcome = RayProgress(workers=len(self.workers))
        jobs, outcome.cells_skipped = plan_jobs(samples, cells, results.rows, settings)
        queue: deque[tuple[SampleJob, int]] = deque((job, 1) for job in jobs)
        idle = list(range(len(self.workers)))
        in_flight: dict = {}  # job task -> (worker, job, attempt)
        probes: dict = {}  # describe() task of a worker that died -> worker
        recovering: dict[int, tuple[float, float]] = {}  # worker -> (when to probe next, when to give it up)
        bar = tqdm(total=len(jobs), unit="sample", desc=f"bench {settings.mode} on Ray", disable=not self.progress,
                   dynamic_ncols=True)
        try:
            while queue or in_flight:
                while idle and queue:
                    worker, (job, attempt) = idle.pop(0), queue.popleft()
                    in_flight[self.workers[worker].run.remote(job, settings)] = (worker, job, attempt)
                now = time.monotonic()
                for worker, (due, _) in list(recovering.items()):
                    if due <= now and worker not in probes.values():
                        probes[self.workers[worker].describe.remote()] = worker
                if not in_flight and not probes and not recovering:  # every worker was given up
                    for job, attempt in queue:
                        outcome.failures.append(Failure(job.sample.id, attempt - 1, "every Ray worker died"))
                    queue.clear()
                    break
                ready, _ = ray.wait([*in_flight, *probes], num_returns=1, timeout=PROBE_INTERVAL_S)
                if not ready:
                    continue
                [reference] = ready
                if reference in probes:
                    self._probed(probes.pop(reference), reference, idle, recovering)
                    continue
                worker, job, attempt = in_flight.pop(reference)
                try:
                    rows, prefills = ray.get(reference)
                except ray.exceptions.RayActorError as error:
                    # the process died (or is restarting): Ray restarts it, a bounded number of times; it takes
                    # jobs again once it answers a probe, so no job is spent on a worker that is not back
                    outcome.worker_restarts += 1
                    recovering[worker] = (time.monotonic() + PROBE_INTERVAL_S, time.monotonic() + RECOVERY_S)
                    self._retry_or_fail(queue, outcome, bar, job, attempt, error)
                    continue
                except ray.exceptions.RayTaskError as error:  # the sample raised: the worker is fine
                    idle.append(worker)
                    # kvlab's own errors (a sample longer than the window, ...) would fail the same way again
                    self._retry_or_fail(queue, outcome, bar, job, attempt, error,
                                        retry=not isinstance(error.cause, KvlabError))
                    continue
                idle.append(worker)
                for row in rows:
                    results.append(row)
                    outcome.rows.append(row)
                outcome.rows_written += len(rows)
                outcome.prefills += prefills
                bar.update(1)
                bar.set_postfix_str(f"{outcome.rows_written} rows, {len(outcome.failures)} failed")
                if on_sample is not None:
                    on_sample(self, outcome)
        except KeyboardInterrupt:
            outcome.interrupted = True
            for reference in in_flight:
                ray.cancel(reference, force=True)
        finally:
            bar.close()
            outcome.wall_s = time.perf_counter() - started
        return outcome

    def _probed(self, worker: int, reference, idle: list[int], recovering: dict) -> None:
        """A restarted worker answered (it takes jobs again), or not yet (probe again later, until its time is
        up: then it is left out)."""
        try:
            self.pids[worker] = self.ray.get(reference)["pid"]
        except self.ray.exceptions.RayError:
            due, give_up = recovering[worker]
            if time.monotonic() < give_up:
                recovering[worker] = (time.monotonic() + PROBE_INTERVAL_S, give_up)
            else:
                del recovering[worker]
            return
        del recovering[worker]
        idle.append(worker)

    def _retry_or_fail(self, queue, outcome: RayProgress, bar, job: SampleJob, attempt: int, error,
                       retry: bool = True) -> None:
        text = _error_text(error)
        if retry and attempt <= self.options.retries:
            queue.append((job, attempt + 1))
            bar.write(f"kvlab: sample {job.sample.id} failed (attempt {attempt}: {text}); retrying")
            return
        outcome.failures.append(Failure(job.sample.id, attempt, text))
        bar.update(1)
        bar.write(f"kvlab: sample {job.sample.id} failed (attempt {attempt}); recorded as failed: {text}")


def _error_text(error: BaseException) -> str:
    """One line: the task's own exception where Ray wraps one, else Ray's first line."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


__all__ = ["Failure", "RayOptions", "RayPool", "RayProgress", "import_ray"]
