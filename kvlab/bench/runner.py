"""The bench runner: one prefill per sample serves a whole policy x ratio (x quantization) grid.

For every sample the context is prefilled once, recording what any policy of the grid observes (the union of their
observation requests). The full cache answers first: its greedy answer is the fidelity reference. Then every cell
compresses a copy (tensors are shared copy-on-write, see ``KVCache.fork``), answers, is scored, and is
teacher-forced along the reference answer to measure KL divergence. In single mode the cells of one question
answer together in one decode loop whose steps share the weight reads (``Engine.decode_rows``; a row's
``decode_s`` is that loop's time until the row ended, ``decode_rows`` how many answered together).
Modes (SCBench's shared-context settings):

- ``single``: every question is asked on its own, on top of the compressed context (query-aware: the question is
  part of the prefix, so each question needs its own prefill);
- ``multi-request``: each cell's cache is written to a ``.kv`` file once and every question is answered from the
  file, reloaded (the persisted path, exactly as ``kvlab ask --cache`` runs it);
- ``multi-turn``: the questions are follow-ups of one conversation; each sees the previous answers (the cell's
  own), and the cache is compressed again when the conversation outgrows the budget. KL is not measured there
  (histories differ between cells); ``matches_full`` compares each turn's answer with the full cache's.

Input-level methods (``kvlab.inputs``: retrieval, prompt compression) are cells too: a cell shortens the context
*text* to its ratio's share of tokens, prefills what is left with the full cache and answers from it. Its row says
``family: "input"`` (``"kv"`` for policies), ``input_context_tokens`` (the context tokens the model was given),
``prefill_s`` of the shortened context and, in ``compress_s``, the seconds the method took (scoring passes through
the model included); the byte figures compare its cache with the full cache of the *original* context, like every
other row. ``method_query_aware`` says whether the cell's choice read the question (retrieval always does; a policy
only in a query-aware run). A query-agnostic method shortens a sample's context once; a query-aware one, once per
question, in multi-request mode too (its cache is then kept in memory, not written to a file). Multi-turn mode has
no place for them: the context would have to be chosen before the follow-ups are known.

Streamed cells (``--max-kv-memory``): a KV cell may also run under a limit on the KV memory held while reading the
document. Its document is prefilled chunk by chunk and compressed to the cell's budget as it goes
(``engine.streaming``, chunk from ``store.documents.streaming_chunk``; once per sample, shared by its questions and
quantizations), then the question is fed and answered as in the cell without the limit. Where the sample's full cache
fits the limit it is not streamed (``kvlab compress`` would prefill it whole too): the row says ``streamed: false`` and
reuses the plain cell's cache and answer. The limit is part of the cell's label (``snapkv stream≤64MiB``), so
summaries and resume keep the two apart; rows add ``max_kv_memory`` (bytes), ``streamed``, ``peak_kv_bytes`` (the KV
held at most while reading), ``stream_chunk_tokens`` and ``stream_compressions``. Query-agnostic only.

Rows are appended to ``results.jsonl`` as each cell finishes, so an interrupted run leaves whole rows and a
rerun with the same output folder skips what is done.
"""

from __future__ import annotations

import difflib
import resource
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvlab.bench.fidelity import mean_kl_divergence, teacher_forced_log_probs
from kvlab.bench.results import ResultsFile, cell_key
from kvlab.bench.scoring import score
from kvlab.bench.summary import stream_label
from kvlab.bench.tasks.base import Sample
from kvlab.cache.kvcache import KVCache
from kvlab.cache.observations import ObservationRequest
from kvlab.cache.quant import parse_quantization, quantize_cache
from kvlab.cache.quantized import quantize_in_memory
from kvlab.engine import Engine, SamplingConfig, context_kept_tokens, memory_figures, resolve_budget
from kvlab.engine.conversation import CompressionRule, Conversation
from kvlab.engine.prefill import PrefillResult
from kvlab.errors import ParameterError, UnknownPolicyError
from kvlab.inputs import INPUT_METHODS, make_input_method
from kvlab.inputs.base import InputMethod, Reduction
from kvlab.policies import POLICIES, make_policy
from kvlab.policies.base import Policy

GREEDY = SamplingConfig()
MODES = ("single", "multi-request", "multi-turn")


@dataclass(frozen=True)
class Cell:
    """One grid cell: a policy (or an input method) with its parameters, an eviction ratio (0 for ``full``), and a
    KV quantization the cache is held in while decoding (``--kv-quant``; None: the model's dtype), and a limit on
    the KV bytes held while reading the document (``--max-kv-memory``; None: prefill whole, then compress)."""

    policy: Policy | InputMethod
    ratio: float
    quantization: str | None = None
    max_kv_bytes: int | None = None

    @property
    def is_reference(self) -> bool:
        return self.policy.name == "full" and self.quantization is None

    @property
    def family(self) -> str:
        """``"input"``: the context text is shortened before prefill; ``"kv"``: the cache is compressed after."""
        return "input" if isinstance(self.policy, InputMethod) else "kv"

    @property
    def label(self) -> str:
        """The policy as the grid names it: its name, then any parameter that differs from the default
        (``kvzip:heads=shared``), so variants of one policy are separate rows of the report."""
        defaults = type(self.policy)()
        changed = [f"{key}={value}" for key, value in self.policy.params().items()
                   if getattr(defaults, key) != value]
        label = ":".join([self.policy.name, *changed])
        return label if self.max_kv_bytes is None else f"{label} {stream_label(self.max_kv_bytes)}"


def grid(policy_names: list[str], ratios: list[float], quantizations: Sequence[str | None] = (None,),
         max_kv_bytes: Sequence[int] = ()) -> list[Cell]:
    """The cells of a sweep: ``full`` once per quantization (ratio 0), every other policy at every ratio; each KV
    cell of a policy that evicts is followed by its streamed variants, one per limit of ``max_kv_bytes``."""
    if not policy_names:
        raise ParameterError("give at least one policy (e.g. --policies full,snapkv)")
    for ratio in ratios:
        if not 0.0 <= ratio < 1.0:
            raise ParameterError(f"ratios must be in [0, 1): the fraction of context tokens evicted (got {ratio})")
    quantizations = [None if scheme is None else parse_quantization(scheme).label for scheme in quantizations]
    limits = list(dict.fromkeys(max_kv_bytes))
    if any(limit <= 0 for limit in limits):
        raise ParameterError(f"--max-kv-memory limits must be above 0 bytes (got {limits})")
    cells = []
    for name in dict.fromkeys(policy_names):
        policy = policy_from_spec(name)
        streams = isinstance(policy, Policy) and not policy.keeps_all_tokens
        for scheme in quantizations:
            for ratio in [0.0] if name == "full" else ratios:
                cells.append(Cell(policy, ratio, scheme))
                cells.extend(Cell(policy, ratio, scheme, limit) for limit in limits if streams)
    if limits and not any(cell.max_kv_bytes is not None for cell in cells):
        raise ParameterError("--max-kv-memory streams the cells of policies that evict, and --policies has none "
                             "(full and input methods keep or shorten the text instead); add one, e.g. snapkv")
    return cells


def policy_from_spec(spec: str) -> Policy | InputMethod:
    """``NAME[:KEY=VALUE...]``, e.g. ``kvzip``, ``kvzip:heads=free:chunk_tokens=1024`` or ``rag_bm25:chunk_tokens=64``:
    a KV policy or an input method."""
    name, *settings = spec.strip().split(":")
    params = {}
    for setting in settings:
        key, equals, value = setting.partition("=")
        if not equals or not key:
            raise ParameterError(f"cannot read policy {spec!r}: write NAME[:KEY=VALUE...], e.g. kvzip:heads=shared")
        params[key.strip()] = value.strip()
    if name in INPUT_METHODS:
        return make_input_method(name, **params)
    if name not in POLICIES:
        known = POLICIES.names() + INPUT_METHODS.names()
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownPolicyError(f"unknown policy or input method {name!r}.{hint} Policies: "
                                 f"{', '.join(POLICIES.names())}; input methods: {', '.join(INPUT_METHODS.names())}.")
    return make_policy(name, **params)


@dataclass
class BenchProgress:
    """What one call of ``run_grid`` did: rows written, prefills run, cells skipped because already done."""

    rows_written: int = 0
    prefills: int = 0
    cells_skipped: int = 0
    wall_s: float = 0.0
    interrupted: bool = False
    rows: list[dict] = field(default_factory=list)
    failures: list = field(default_factory=list)  # Ray runs: samples given up (distributed.Failure)
    worker_restarts: int = 0  # Ray runs: workers that died mid-sample and were restarted


@dataclass
class _Context:
    """One sample's shared state: the prefill, its prompt, and the full cache's reference answers."""

    sample: Sample
    context_tokens: int
    result: PrefillResult
    suffix_ids: torch.Tensor | None
    question_index: int = 0
    prefix_ids: torch.Tensor | None = None  # the document's prompt (query-agnostic runs): what a streamed cell reads
    streamed: dict = field(default_factory=dict)  # streamed prefills of this sample, by (policy, budget, chunk)


@dataclass(frozen=True)
class GridSettings:
    """What every row of a run shares, besides its model (``run_info``): checked once, stamped on each row."""

    mode: str = "single"
    query_aware: bool = False
    seed: int = 0
    force: bool = False
    run_info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ParameterError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.query_aware and self.mode != "single":
            raise ParameterError(f"--query-aware needs mode single: in {self.mode} mode the context is shared by "
                                 f"questions it cannot know in advance")

    @property
    def stamp(self) -> dict:
        return {"mode": self.mode, "query_aware": self.query_aware, "seed": self.seed, **self.run_info}

    def check_cells(self, cells: list[Cell]) -> None:
        if self.query_aware and any(cell.max_kv_bytes is not None for cell in cells):
            raise ParameterError("--max-kv-memory streams the document before its question is known, so it needs a "
                                 "query-agnostic run: drop --query-aware (or pass --no-query-aware)")
        if self.mode == "multi-turn" and any(cell.family == "input" for cell in cells):
            names = ", ".join(sorted({cell.policy.name for cell in cells if cell.family == "input"}))
            raise ParameterError(f"input methods ({names}) choose the context before it is prefilled, which "
                                 f"multi-turn follow-ups cannot wait for; run them with --mode single or "
                                 f"multi-request")


@dataclass(frozen=True)
class SampleJob:
    """One unit of work: a sample and the (question index, cell index) pairs it still owes; ``cells`` indexes the
    run's grid, so a remote worker that built the same grid from the same specs reads the same cells."""

    sample: Sample
    wanted: tuple[tuple[int, int], ...]

    @property
    def answers(self) -> int:
        return len(self.wanted)


def plan_jobs(samples: list[Sample], cells: list[Cell], done_rows: list[dict],
              settings: GridSettings) -> tuple[list[SampleJob], int]:
    """The samples with work left, each with the answers it owes, and how many answers are already done."""
    done = {cell_key(row) for row in done_rows}
    jobs, skipped = [], 0
    for sample in samples:
        wanted = tuple((index, number) for index in range(len(sample.questions))
                       for number, cell in enumerate(cells)
                       if cell_key(_identity(sample, index, cell, settings.stamp)) not in done)
        skipped += len(sample.questions) * len(cells) - len(wanted)
        if wanted:
            jobs.append(SampleJob(sample, wanted))
    return jobs, skipped


def run_sample(engine: Engine, job: SampleJob, cells: list[Cell], settings: GridSettings,
               request: ObservationRequest | None = None) -> tuple[list[dict], int]:
    """Every answer ``job`` owes, as finished rows, and the prefills it took: what a worker of
    ``kvlab.bench.distributed`` returns for one sample."""
    counter = BenchProgress()
    rows = list(sample_rows(engine, job, cells, settings, request or observation_request(cells), counter))
    return rows, counter.prefills


def sample_rows(engine: Engine, job: SampleJob, cells: list[Cell], settings: GridSettings,
                request: ObservationRequest, outcome: BenchProgress) -> Iterator[dict]:
    """The one place a sample is run, serially or on a worker: its rows as each is measured, stamped with the run
    settings and this process's peak RSS; ``outcome`` counts the prefills."""
    wanted = {(index, cells[number]) for index, number in job.wanted}
    mode, query_aware, force = settings.mode, settings.query_aware, settings.force
    if mode == "single":
        produced = _single(engine, job.sample, cells, wanted, request, query_aware, force, outcome)
    elif mode == "multi-request":
        produced = _multi_request(engine, job.sample, cells, wanted, request, force, outcome)
    else:
        produced = _multi_turn(engine, job.sample, cells, wanted, request, force, outcome)
    for row in produced:
        row.update(settings.stamp)
        if row["family"] == "kv":
            row["method_query_aware"] = query_aware
        row["peak_rss_mib"] = peak_rss_mib()
        yield row


def observation_request(cells: list[Cell]) -> ObservationRequest:
    """What the grid's policies observe during a prefill: the union of their requests, recorded once."""
    request = ObservationRequest()
    for cell in cells:
        if isinstance(cell.policy, Policy):
            request = request.union(cell.policy.observation_request())
    return request


def run_grid(engine: Engine, samples: list[Sample], cells: list[Cell], results: ResultsFile, *,
             mode: str = "single", query_aware: bool = False, seed: int = 0, force: bool = False,
             run_info: dict | None = None, progress: bool = True) -> BenchProgress:
    """Answer every question of every sample under every cell; append one row per answer to ``results``."""
    settings = GridSettings(mode, query_aware, seed, force, dict(run_info or {}))
    settings.check_cells(cells)
    started = time.perf_counter()
    outcome = BenchProgress()
    request = observation_request(cells)
    total = sum(len(sample.questions) for sample in samples) * len(cells)
    bar = tqdm(total=total, unit="answer", desc=f"bench {mode}", disable=not progress, dynamic_ncols=True)
    try:
        jobs, outcome.cells_skipped = plan_jobs(samples, cells, results.rows, settings)
        bar.update(outcome.cells_skipped)
        for job in jobs:
            for row in sample_rows(engine, job, cells, settings, request, outcome):  # written as measured
                results.append(row)
                outcome.rows.append(row)
                outcome.rows_written += 1
                bar.update(1)
                bar.set_postfix_str(f"{row['task']} {row['policy']}@{row['ratio']:g}: {row['score']:.2f}")
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        bar.close()
        outcome.wall_s = time.perf_counter() - started
    return outcome


def _identity(sample: Sample, question_index: int, cell: Cell, settings: dict) -> dict:
    return {"sample_id": sample.id, "question_index": question_index, "policy": cell.label,
            "policy_params": cell.policy.params(), "ratio": cell.ratio, "quantization": cell.quantization,
            "mode": settings["mode"], "query_aware": settings["query_aware"]}


def _prefill(engine: Engine, sample: Sample, question_index: int, request: ObservationRequest, query_aware: bool,
             force: bool, outcome: BenchProgress, conversation: bool = False) -> _Context:
    parts = engine.prompt(sample.context, sample.questions[question_index], sample.answer_prefix)
    needed = parts.total_tokens + sample.max_new_tokens
    if conversation:  # every question and answer stays in the cache
        needed += sum(int(engine.question_ids(q, sample.answer_prefix, follow_up=True).numel())
                      + sample.max_new_tokens for q in sample.questions[1:])
    engine.check_length(needed, force=force)
    outcome.prefills += 1
    if query_aware:
        result = engine.prefill(torch.cat([parts.prefix_ids, parts.suffix_ids]), request)
        return _Context(sample, int(parts.prefix_ids.numel()), result, None, question_index)
    return _Context(sample, int(parts.prefix_ids.numel()), engine.prefill(parts.prefix_ids, request),
                    parts.suffix_ids, question_index, parts.prefix_ids)


def _compressed(engine: Engine, context: _Context, cell: Cell) -> tuple[KVCache, dict]:
    """A compressed (and, for quantized cells, held-quantized) copy with its cost columns; the byte columns are
    those of ``engine.memory_figures``. A streamed cell whose sample does not fit its limit compresses while it
    reads (``_stream``); one that fits is the plain cell, with the stream columns saying so."""
    assert isinstance(cell.policy, Policy)  # input cells go through ``_input_cell``
    chunk = _stream_chunk(engine, context, cell)
    if chunk is None:
        cache, budget, compress_s = engine.compress(context.result, cell.policy, ratio=cell.ratio,
                                                    compressible_tokens=context.context_tokens)
        extra = _stream_columns(context, cell)
    else:
        cache, budget, compress_s, extra = _stream(engine, context, cell, chunk)
    if cell.quantization is not None:
        started = time.perf_counter()
        cache = quantize_in_memory(cache, parse_quantization(cell.quantization))
        compress_s += time.perf_counter() - started
    figures = memory_figures(context.result.cache.held_bytes, cache.held_bytes, cache.kv_bytes_full_fp16)
    return cache, {"budget_tokens": budget, "compress_s": compress_s, **figures,
                   "kv_bytes_read": cache.decode_read_bytes,
                   "kept_tokens": context_kept_tokens(cache, context.context_tokens), **extra}


def _stream_chunk(engine: Engine, context: _Context, cell: Cell) -> int | None:
    """The chunk a streamed cell reads its sample's document with; None for a plain cell, or when the sample's full
    cache fits the limit (it is then prefilled whole, as ``kvlab compress --max-kv-memory`` does)."""
    from kvlab.store.documents import streaming_chunk

    if cell.max_kv_bytes is None:
        return None
    assert isinstance(cell.policy, Policy)
    budget = resolve_budget(cell.ratio, None, context.context_tokens)
    return streaming_chunk(engine, cell.policy, context.context_tokens, budget, cell.max_kv_bytes)


def _stream_columns(context: _Context, cell: Cell, chunk: int | None = None, peak_kv_bytes: int | None = None,
                    compressions: int = 0) -> dict:
    """The row columns of a streamed cell (none for a plain cell); not streamed, the peak is the full prefill's."""
    if cell.max_kv_bytes is None:
        return {}
    peak = context.result.cache.held_bytes if peak_kv_bytes is None else peak_kv_bytes
    return {"max_kv_memory": cell.max_kv_bytes, "streamed": chunk is not None, "peak_kv_bytes": peak,
            "stream_chunk_tokens": chunk, "stream_compressions": compressions}


def _stream(engine: Engine, context: _Context, cell: Cell, chunk: int) -> tuple[KVCache, int, float, dict]:
    """A copy of the sample's document streamed under ``cell``'s limit (prefilled once per policy, budget and chunk,
    whatever the question or quantization): (cache, budget tokens, compress seconds, extra row columns, with
    ``prefill_s`` the streamed prefill's own seconds net of compression)."""
    from kvlab.engine.streaming import streaming_prefill

    assert isinstance(cell.policy, Policy) and context.prefix_ids is not None
    budget = resolve_budget(cell.ratio, None, context.context_tokens)
    key = (cell.policy, budget, chunk)
    if key not in context.streamed:
        context.streamed[key] = streaming_prefill(engine, context.prefix_ids, cell.policy, budget, chunk_tokens=chunk)
    streamed = context.streamed[key]
    extra = {**_stream_columns(context, cell, chunk, streamed.peak_kv_bytes, streamed.compressions),
             "prefill_s": streamed.seconds - streamed.compress_s}
    return streamed.cache.fork(), budget, streamed.compress_s, extra


@dataclass
class _Shortened:
    """An input cell's shortened context, prefilled once for every question it serves; ``context_tokens`` are the
    prompt's prefix tokens (template included, as a ``_Context``'s)."""

    reduction: Reduction
    result: PrefillResult
    context_tokens: int


def _shortened(engine: Engine, context: _Context, index: int, cell: Cell, query_aware: bool,
               memo: dict) -> _Shortened:
    """The shortened prefill of ``cell`` for question ``index``: per question when the method reads the question
    (or the run prefills the question with the context), else one per sample; ``memo`` holds them."""
    method = cell.policy
    assert isinstance(method, InputMethod)
    per_question = method.query_aware or query_aware
    key = (method, cell.ratio, index if per_question else None)
    if key not in memo:
        sample = context.sample
        reduction = method.reduce(engine, sample.context, sample.questions[index], ratio=cell.ratio)
        parts = engine.prompt(reduction.text, sample.questions[index], sample.answer_prefix)
        ids = torch.cat([parts.prefix_ids, parts.suffix_ids]) if query_aware else parts.prefix_ids
        memo[key] = _Shortened(reduction, engine.prefill(ids), int(parts.prefix_ids.numel()))
    return memo[key]


def _input_cell(engine: Engine, context: _Context, index: int, cell: Cell, query_aware: bool,
                memo: dict) -> tuple[KVCache, dict, torch.Tensor, float]:
    """An input cell ready to answer question ``index``: (its cache, a fork of the shortened prefill, held quantized
    if the cell says so; its cost columns; the logits that start the answer; seconds spent feeding the question).
    Byte figures compare with the full cache of the original context (``context.result``)."""
    shortened = _shortened(engine, context, index, cell, query_aware, memo)
    method = cell.policy
    assert isinstance(method, InputMethod)
    cache, compress_s = shortened.result.cache.fork(), shortened.reduction.seconds
    if cell.quantization is not None:
        started = time.perf_counter()
        cache = quantize_in_memory(cache, parse_quantization(cell.quantization))
        compress_s += time.perf_counter() - started
    full = context.result.cache
    costs = {"budget_tokens": shortened.reduction.budget_tokens, "compress_s": compress_s,
             **memory_figures(full.held_bytes, cache.held_bytes, full.kv_bytes_full_fp16),
             "kept_tokens": float(shortened.context_tokens), "input_context_tokens": shortened.context_tokens,
             "prefill_s": shortened.result.seconds, "method_query_aware": method.query_aware}
    started = time.perf_counter()
    if query_aware:
        first_logits = shortened.result.last_logits
    else:
        sample = context.sample
        first_logits = engine.feed(cache, engine.question_ids(sample.questions[index], sample.answer_prefix))
    return cache, costs, first_logits, time.perf_counter() - started


def _row(context: _Context, question_index: int, cell: Cell, prediction: str, costs: dict, **measured) -> dict:
    sample = context.sample
    answers = sample.answers[question_index]
    return {"sample_id": sample.id, "task": sample.task, "length_tokens": sample.length_tokens, "depth": sample.depth,
            "question_index": question_index, "question": sample.questions[question_index], "answers": list(answers),
            "metric": sample.metric, "prediction": prediction, "score": score(prediction, answers, sample.metric),
            "policy": cell.label, "policy_params": cell.policy.params(), "ratio": cell.ratio, "family": cell.family,
            "quantization": cell.quantization, "context_tokens": context.context_tokens,
            "input_context_tokens": context.context_tokens, "prefill_s": context.result.seconds,
            **costs, **measured}


def _answer(engine: Engine, cache: KVCache, first_logits: torch.Tensor, max_new_tokens: int):
    """Greedy answer on a fork of ``cache``; returns (generation, answer ids with the stop token if sampled)."""
    generation = engine.continue_and_decode(cache.fork(), None, first_logits, max_new_tokens=max_new_tokens,
                                            sampling=GREEDY)
    stop = [generation.stop_token] if generation.stop_token is not None else []
    return generation, generation.token_ids + stop


def _ordered(cells: list[Cell]) -> list[Cell]:
    """The reference (full, unquantized) first, always: every other cell is compared with its answer."""
    reference = next((cell for cell in cells if cell.is_reference), Cell(make_policy("full"), 0.0))
    return [reference] + [cell for cell in cells if not cell.is_reference]


def _single(engine, sample, cells, wanted, request, query_aware, force, outcome):
    shared = None
    memo: dict = {}  # input cells' shortened prefills
    for index in range(len(sample.questions)):
        if not any((index, cell) in wanted for cell in cells):
            continue
        memo = {key: value for key, value in memo.items() if key[2] is None}  # drop the last question's
        if query_aware or shared is None:
            shared = _prefill(engine, sample, index, request, query_aware, force, outcome)
        context = shared
        suffix = None if query_aware else engine.question_ids(sample.questions[index], sample.answer_prefix)
        ordered = _ordered(cells)
        # the reference answers first; cells nobody asked for (already done) are skipped
        ordered = ordered[:1] + [cell for cell in ordered[1:] if (index, cell) in wanted]
        prepared = []  # distinct caches: (cache, first logits, seconds feeding the question)
        answering = []  # (cell, its cache's index in prepared, its costs)
        made: dict[Cell, tuple[int, dict]] = {}  # a streamed cell whose sample fits its limit is its plain cell
        for cell in ordered:
            if cell.family == "input":
                cache, costs, first_logits, question_s = _input_cell(engine, context, index, cell, query_aware, memo)
            else:
                plain = cell if _stream_chunk(engine, context, cell) else replace(cell, max_kv_bytes=None)
                if plain in made:
                    number, plain_costs = made[plain]
                    answering.append((cell, number, {**plain_costs, **_stream_columns(context, cell)}))
                    continue
                cache, costs = _compressed(engine, context, cell)
                made[plain] = (len(prepared), costs)
                question_started = time.perf_counter()
                first_logits = context.result.last_logits if suffix is None else engine.feed(cache, suffix)
                question_s = time.perf_counter() - question_started
            answering.append((cell, len(prepared), costs))
            prepared.append((cache, first_logits, question_s))
        # every cache answers in one shared decode loop: each step reads the weights once for all of them
        generations = engine.decode_rows([item[0].fork() for item in prepared], [item[1] for item in prepared],
                                         max_new_tokens=sample.max_new_tokens, sampling=GREEDY)
        answers = []  # per prepared cache: (generation, produced ids, teacher-forced log-probs)
        for (cache, first_logits, _), generation in zip(prepared, generations):
            produced = generation.token_ids + ([generation.stop_token] if generation.stop_token is not None else [])
            reference_ids = answers[0][1] if answers else produced  # the reference (full) answers first
            answers.append((generation, produced, teacher_forced_log_probs(engine.model, cache, first_logits,
                                                                           reference_ids)))
        reference_ids, reference_log_probs = answers[0][1], answers[0][2]
        for cell, number, costs in answering:
            if (index, cell) not in wanted:
                continue
            generation, produced, log_probs = answers[number]
            prediction = engine.tokenizer.decode(generation.token_ids, skip_special_tokens=True).strip()
            yield _row(context, index, cell, prediction, costs, question_s=prepared[number][2],
                       decode_s=generation.seconds, decode_tokens=len(generation.token_ids),
                       decode_rows=len(prepared), matches_full=produced == reference_ids,
                       kl_vs_full=mean_kl_divergence(reference_log_probs, log_probs))


def _multi_request(engine, sample, cells, wanted, request, force, outcome):
    from kvlab.store.format import load_cache, meta_for, save_cache

    context = _prefill(engine, sample, 0, request, False, force, outcome)
    references: dict[int, tuple] = {}
    memo: dict = {}
    with tempfile.TemporaryDirectory(prefix="kvlab-bench-") as folder:
        for cell in _ordered(cells):
            if cell.family == "input":  # the reference (full) came first: every question has its answer
                yield from _input_requests(engine, context, cell, wanted, references, memo)
                continue
            cache, costs = _compressed(engine, context, cell)
            if cell.quantization is None:
                stored = cache
            else:
                params = parse_quantization(cell.quantization)
                stored = quantize_cache(cache.dense(), params.scheme, params.group_size, params.residual_tokens,
                                        params.quantize_tail)
            path = Path(folder) / "cell.kv"
            meta = meta_for(engine.loaded, stored, text=sample.context, policy=cell.policy, ratio=cell.ratio,
                            budget_tokens=costs["budget_tokens"], query_aware=False,
                            context_tokens=context.context_tokens)
            file_bytes = save_cache(path, stored, meta, None)
            for index, question in enumerate(sample.questions):
                load_started = time.perf_counter()
                loaded = load_cache(path, expected_model_fingerprint=engine.loaded.fingerprint,
                                    expected_extension=engine.loaded.extension_label,
                                    device=engine.loaded.device).cache
                load_s = time.perf_counter() - load_started
                question_started = time.perf_counter()
                suffix = engine.question_ids(question, sample.answer_prefix)
                first_logits = engine.feed(loaded, suffix)
                question_s = time.perf_counter() - question_started
                generation, produced = _answer(engine, loaded, first_logits, sample.max_new_tokens)
                reference_ids, reference_log_probs = references.get(index, (produced, None))
                log_probs = teacher_forced_log_probs(engine.model, loaded, first_logits, reference_ids)
                references.setdefault(index, (produced, log_probs))
                if (index, cell) not in wanted:
                    continue
                prediction = engine.tokenizer.decode(generation.token_ids, skip_special_tokens=True).strip()
                yield _row(context, index, cell, prediction, costs, load_s=load_s, file_bytes=file_bytes,
                           question_s=question_s, decode_s=generation.seconds, decode_tokens=len(generation.token_ids),
                           matches_full=produced == references[index][0],
                           kl_vs_full=mean_kl_divergence(references[index][1], log_probs))


def _input_requests(engine, context, cell, wanted, references, memo):
    """Multi-request mode for an input cell: every question answered from the cell's shortened prefill (one per
    question for a method that reads it), from memory."""
    sample = context.sample
    for index in range(len(sample.questions)):
        if (index, cell) not in wanted:
            continue
        cache, costs, first_logits, question_s = _input_cell(engine, context, index, cell, False, memo)
        generation, produced = _answer(engine, cache, first_logits, sample.max_new_tokens)
        reference_ids, reference_log_probs = references[index]
        log_probs = teacher_forced_log_probs(engine.model, cache, first_logits, reference_ids)
        prediction = engine.tokenizer.decode(generation.token_ids, skip_special_tokens=True).strip()
        yield _row(context, index, cell, prediction, costs, question_s=question_s, decode_s=generation.seconds,
                   decode_tokens=len(generation.token_ids), matches_full=produced == reference_ids,
                   kl_vs_full=mean_kl_divergence(reference_log_probs, log_probs))


def _multi_turn(engine, sample, cells, wanted, request, force, outcome):
    context = _prefill(engine, sample, 0, request, False, force, outcome, conversation=True)
    reference_answers: list[list[int]] = []
    for cell in _ordered(cells):
        cache, costs = _compressed(engine, context, cell)
        kv_quant = None if cell.quantization is None else parse_quantization(cell.quantization)
        conversation = Conversation(engine, cache, rule=CompressionRule(cell.policy, costs["budget_tokens"],
                                                                        kv_quant=kv_quant))
        for index, question in enumerate(sample.questions):
            turn = conversation.ask(question, max_new_tokens=sample.max_new_tokens, sampling=GREEDY,
                                    answer_prefix=sample.answer_prefix, force=force)
            if len(reference_answers) <= index:
                reference_answers.append(turn.token_ids)
            if (index, cell) not in wanted:
                continue
            yield _row(context, index, cell, turn.answer, {**costs, "kept_tokens": turn.kept_tokens},
                       question_s=turn.question_s, decode_s=turn.decode_s, decode_tokens=len(turn.token_ids),
                       recompressed=turn.recompressed, matches_full=turn.token_ids == reference_answers[index],
                       kl_vs_full=None)


def peak_rss_mib() -> float:
    """The process's resident-memory high-water mark so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_info_for(engine: Engine) -> dict:
    return {"model": engine.loaded.name, "model_fingerprint": engine.loaded.fingerprint,
            "weights": engine.loaded.weights, "native_context_tokens": engine.loaded.native_context_tokens}


__all__ = ["MODES", "BenchProgress", "Cell", "GridSettings", "SampleJob", "grid", "observation_request", "plan_jobs",
           "run_grid", "run_info_for", "run_sample", "sample_rows"]
