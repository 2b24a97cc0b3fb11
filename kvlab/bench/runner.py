"""The bench runner: one prefill per sample serves a whole policy x ratio grid.

For every sample the context is prefilled once, recording what any policy of the grid observes (the union of their
observation requests). The full cache answers first: its greedy answer is the fidelity reference. Then for every
(policy, ratio) cell a compressed copy is made (tensors are shared copy-on-write, see ``KVCache.fork``), the
question is prefilled on top of it, the answer is decoded and scored, and the copy is teacher-forced along the
reference answer to measure KL divergence. In query-aware mode the question is part of the prefix, so each
question of a sample needs its own prefill.

Rows are appended to ``results.jsonl`` as each cell finishes (one fsynced line each), so an interrupted run
leaves a consistent file and a rerun with the same output folder skips what is done.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from kvlab.bench.fidelity import mean_kl_divergence, teacher_forced_log_probs
from kvlab.bench.results import ResultsFile, cell_key
from kvlab.bench.scoring import score
from kvlab.bench.tasks.base import Sample
from kvlab.cache.observations import ObservationRequest
from kvlab.engine import Engine, SamplingConfig, context_kept_tokens
from kvlab.engine.prefill import PrefillResult
from kvlab.errors import ParameterError
from kvlab.policies import make_policy
from kvlab.policies.base import Policy

GREEDY = SamplingConfig()


@dataclass(frozen=True)
class Cell:
    """One grid cell: a policy with its parameters and an eviction ratio (0 for ``full``)."""

    policy: Policy
    ratio: float

    @property
    def label(self) -> str:
        return self.policy.name if self.policy.name == "full" else f"{self.policy.name}@{self.ratio:g}"


def grid(policy_names: list[str], ratios: list[float]) -> list[Cell]:
    """The cells of a sweep: ``full`` once (ratio 0), every other policy at every ratio."""
    if not policy_names:
        raise ParameterError("give at least one policy (e.g. --policies full,snapkv)")
    for ratio in ratios:
        if not 0.0 <= ratio < 1.0:
            raise ParameterError(f"ratios must be in [0, 1): the fraction of context tokens evicted (got {ratio})")
    cells = []
    for name in dict.fromkeys(policy_names):
        policy = make_policy(name)
        cells.extend([Cell(policy, 0.0)] if name == "full" else [Cell(policy, ratio) for ratio in ratios])
    return cells


@dataclass
class BenchProgress:
    """What one call of ``run_grid`` did: rows written, prefills run, cells skipped because already done."""

    rows_written: int = 0
    prefills: int = 0
    cells_skipped: int = 0
    wall_s: float = 0.0
    interrupted: bool = False
    rows: list[dict] = field(default_factory=list)


def run_grid(engine: Engine, samples: list[Sample], cells: list[Cell], results: ResultsFile, *,
             query_aware: bool = False, seed: int = 0, force: bool = False, run_info: dict | None = None,
             progress: bool = True) -> BenchProgress:
    """Answer every question of every sample under every cell; append one row per answer to ``results``."""
    started = time.perf_counter()
    done = {cell_key(row) for row in results.rows}
    outcome = BenchProgress()
    request = ObservationRequest()
    for cell in cells:
        request = request.union(cell.policy.observation_request())
    total = sum(len(sample.questions) for sample in samples) * len(cells)
    bar = tqdm(total=total, unit="cell", desc="bench", disable=not progress, dynamic_ncols=True)
    try:
        for sample in samples:
            shared_prefill = None  # query-agnostic: every question of the sample reuses the context's prefill
            for question_index, question in enumerate(sample.questions):
                wanted = [cell for cell in cells
                          if key_of(sample, question_index, cell, query_aware) not in done]
                outcome.cells_skipped += len(cells) - len(wanted)
                bar.update(len(cells) - len(wanted))
                if not wanted:
                    continue
                parts = engine.prompt(sample.context, question, sample.answer_prefix)
                engine.check_length(parts.total_tokens + sample.max_new_tokens, force=force)
                if query_aware:
                    result, suffix_ids = engine.prefill(torch.cat([parts.prefix_ids, parts.suffix_ids]), request), None
                    outcome.prefills += 1
                else:
                    if shared_prefill is None:
                        shared_prefill = engine.prefill(parts.prefix_ids, request)
                        outcome.prefills += 1
                    result, suffix_ids = shared_prefill, parts.suffix_ids
                prompt = _Prompt(int(parts.prefix_ids.numel()), suffix_ids)
                for row in _answer_cells(engine, sample, question_index, prompt, result, wanted, query_aware,
                                         seed):
                    row.update(run_info or {})
                    results.append(row)
                    outcome.rows.append(row)
                    outcome.rows_written += 1
                    bar.update(1)
                    bar.set_postfix_str(f"{sample.task} {row['policy']}@{row['ratio']:g}: {row['score']:.2f}")
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        bar.close()
        outcome.wall_s = time.perf_counter() - started
    return outcome


def key_of(sample: Sample, question_index: int, cell: Cell, query_aware: bool) -> tuple:
    return cell_key({"sample_id": sample.id, "question_index": question_index, "policy": cell.policy.name,
                     "policy_params": cell.policy.params(), "ratio": cell.ratio, "query_aware": query_aware})


@dataclass
class _Prompt:
    context_tokens: int
    suffix_ids: torch.Tensor | None  # None in query-aware mode: the question is in the prefix


def _answer_cells(engine: Engine, sample: Sample, question_index: int, prompt: _Prompt, result: PrefillResult,
                  cells: list[Cell], query_aware: bool, seed: int):
    """Yield one row per cell; the full cache's answer (computed first) is the fidelity reference."""
    answers = sample.answers[question_index]
    reference_ids, reference_log_probs = None, None
    wanted_full = any(cell.policy.name == "full" for cell in cells)
    # The full cache answers first, always: its answer is the reference for every other cell.
    for cell in [Cell(make_policy("full"), 0.0)] + [cell for cell in cells if cell.policy.name != "full"]:
        cache, budget, compress_s = engine.compress(result, cell.policy, ratio=cell.ratio,
                                                    compressible_tokens=prompt.context_tokens, seed=seed)
        kv_bytes_kept, kept = cache.live_bytes, context_kept_tokens(cache, prompt.context_tokens)
        question_started = time.perf_counter()
        first_logits = result.last_logits
        if prompt.suffix_ids is not None:
            first_logits = engine.feed(cache, prompt.suffix_ids)
        question_s = time.perf_counter() - question_started
        generation = engine.continue_and_decode(cache.fork(), None, first_logits,
                                                max_new_tokens=sample.max_new_tokens, sampling=GREEDY)
        produced = generation.token_ids + ([generation.stop_token] if generation.stop_token is not None else [])
        if reference_ids is None:
            reference_ids = produced
            reference_log_probs = teacher_forced_log_probs(engine.model, cache, first_logits, reference_ids)
            kl = 0.0
            if not wanted_full:
                continue  # computed only as the reference
        else:
            kl = mean_kl_divergence(reference_log_probs,
                                    teacher_forced_log_probs(engine.model, cache, first_logits, reference_ids))
        prediction = engine.tokenizer.decode(generation.token_ids, skip_special_tokens=True).strip()
        yield {
            "sample_id": sample.id, "task": sample.task, "length_tokens": sample.length_tokens,
            "depth": sample.depth, "question_index": question_index,
            "question": sample.questions[question_index], "answers": list(answers), "metric": sample.metric,
            "prediction": prediction, "score": score(prediction, answers, sample.metric),
            "policy": cell.policy.name, "policy_params": cell.policy.params(), "ratio": cell.ratio,
            "query_aware": query_aware, "seed": seed, "context_tokens": prompt.context_tokens,
            "budget_tokens": budget, "kept_tokens": kept, "kv_bytes_full": result.cache.live_bytes,
            "kv_bytes_kept": kv_bytes_kept, "kl_vs_full": kl, "matches_full": produced == reference_ids,
            "prefill_s": result.seconds, "compress_s": compress_s, "question_s": question_s,
            "decode_s": generation.seconds, "decode_tokens": len(generation.token_ids),
            "peak_rss_mib": peak_rss_mib(),
        }


def peak_rss_mib() -> float:
    """The process's resident-memory high-water mark so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_info_for(engine: Engine) -> dict:
    return {"model": engine.loaded.name, "model_fingerprint": engine.loaded.fingerprint}


__all__ = ["BenchProgress", "Cell", "grid", "run_grid", "run_info_for"]
