"""One generation on the worker thread: find the longest cached prefix, prefill the rest, decode step by step.

Decoding is done here, not by ``engine.generate.decode``, because a server needs three things between steps: text
deltas for streaming (incremental detokenization that never splits a UTF-8 character), stop strings (text held back
while it could still become one, and cut before it), and ``job.check()`` so a disconnect or timeout stops the work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvlab.engine.prefill import empty_cache
from kvlab.engine.runner import ModelRunner
from kvlab.engine.sampling import Sampler, SamplingConfig
from kvlab.errors import ContextTooLongError
from kvlab.server.library import load_into_sessions
from kvlab.server.prompts import Prompt
from kvlab.server.sessions import Entry
from kvlab.server.state import ServerState
from kvlab.server.worker import Job


@dataclass(frozen=True)
class Options:
    max_new_tokens: int | None  # None: the server's default, capped by the window
    sampling: SamplingConfig
    stop: list[str]
    ignore_eos: bool


@dataclass
class Result:
    """Token counts are the model's tokens; ``prompt_tokens`` includes the document; seconds are wall-clock."""

    text: str
    finish_reason: str  # "stop" (end-of-turn token or stop string) or "length"
    document_id: str | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    kv_bytes: int
    prefill_s: float
    decode_s: float
    queue_s: float

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


def generate(state: ServerState, job: Job, prompt: Prompt, options: Options, submitted: float) -> Result:
    """Run ``prompt``; emits ``("start", {prompt_tokens, cached_tokens})`` after prefill and ``("delta", text)``
    while decoding. ``submitted`` is the request's ``time.monotonic()`` arrival."""
    queue_s = time.monotonic() - submitted
    ids = prompt.token_ids
    document_id = prompt.document_id or ""
    entry = state.sessions.lookup(document_id, ids)
    if entry is None and document_id:
        entry = load_into_sessions(state, document_id)
    if entry is None:
        entry = Entry("", (), empty_cache(state.engine.model, state.engine.layout), 0, None)
    document_tokens = entry.cache.num_tokens - entry.fed_tokens
    prompt_tokens = document_tokens + len(ids)
    max_new_tokens = _max_new_tokens(state, prompt_tokens, options.max_new_tokens)

    started = time.perf_counter()
    cache = entry.cache.fork()
    runner = ModelRunner(state.engine.model, cache)
    logits = _feed(runner, ids[entry.fed_tokens:], job, state.settings.chunk_tokens, entry.last_logits)
    prefill_s = time.perf_counter() - started
    cached_tokens = document_tokens + entry.fed_tokens
    if len(ids) > entry.fed_tokens:
        state.sessions.put(document_id, ids, cache.fork(), len(ids), logits)
    state.metrics.inc("kvlab_prefix_cache_hits_total" if cached_tokens else "kvlab_prefix_cache_misses_total")
    job.emit("start", {"prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens})

    started = time.perf_counter()
    tokens, finish_reason, stop_token, text = _decode(state, job, runner, logits, max_new_tokens, options)
    decode_s = time.perf_counter() - started
    if tokens or stop_token is not None:
        state.sessions.put(document_id, ids + tokens + ([stop_token] if stop_token is not None else []),
                           cache.fork(), cache.num_tokens - document_tokens)
    result = Result(text, finish_reason, prompt.document_id, prompt_tokens, cached_tokens, len(tokens),
                    cache.live_bytes, prefill_s, decode_s, queue_s)
    _count(state, result)
    return result


def _max_new_tokens(state: ServerState, prompt_tokens: int, requested: int | None) -> int:
    limit = state.max_context_tokens
    if not limit:
        return requested or state.settings.default_max_tokens
    wanted = requested or max(1, min(state.settings.default_max_tokens, limit - prompt_tokens))
    if prompt_tokens + wanted > limit:
        raise ContextTooLongError(
            f"this model's maximum context length is {limit} tokens; the request needs {prompt_tokens + wanted} "
            f"({prompt_tokens} in the prompt, document included, and {wanted} to generate); shorten the messages "
            f"or lower max_tokens")
    return wanted


def _feed(runner: ModelRunner, token_ids: list[int], job: Job, chunk_tokens: int,
          cached_logits: torch.Tensor | None) -> torch.Tensor:
    logits = cached_logits
    for start in range(0, len(token_ids), chunk_tokens):
        job.check()
        logits = runner.feed(torch.tensor(token_ids[start:start + chunk_tokens], dtype=torch.long))[-1]
    return logits


def _decode(state: ServerState, job: Job, runner: ModelRunner, logits: torch.Tensor, max_new_tokens: int,
            options: Options) -> tuple[list[int], str, int | None, str]:
    """Sample up to ``max_new_tokens``; returns (tokens, finish reason, stop token or None, text)."""
    sampler = Sampler(options.sampling)
    stop_ids = set() if options.ignore_eos else state.engine.stop_ids
    stream = TextStream(state.engine.tokenizer, options.stop)
    tokens: list[int] = []
    finish_reason, stop_token = "length", None
    for step in range(max_new_tokens):
        token = sampler(logits)
        state.metrics.inc("kvlab_generated_tokens_total")
        if token in stop_ids:
            finish_reason, stop_token = "stop", token
            break
        tokens.append(token)
        stream.push(token)
        if stream.stopped:
            finish_reason = "stop"
            break
        delta = stream.take()
        if delta:
            job.emit("delta", delta)
        if step + 1 == max_new_tokens:
            break
        job.check()
        logits = runner.feed(torch.tensor([token], dtype=torch.long))[-1]
    stream.finish()
    delta = stream.take(final=True)
    if delta:
        job.emit("delta", delta)
    return tokens, finish_reason, stop_token, stream.text


def _count(state: ServerState, result: Result) -> None:
    metrics = state.metrics
    metrics.inc("kvlab_prompt_tokens_total", result.prompt_tokens)
    metrics.inc("kvlab_prefilled_tokens_total", result.prefilled_tokens)
    metrics.inc("kvlab_cached_prompt_tokens_total", result.cached_tokens)
    metrics.inc("kvlab_completion_tokens_total", result.completion_tokens)
    metrics.inc("kvlab_prefill_seconds_total", result.prefill_s)
    metrics.inc("kvlab_decode_seconds_total", result.decode_s)
