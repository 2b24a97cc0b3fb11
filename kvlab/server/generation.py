"""One generation on the worker thread: find the longest cached prefix, prefill the rest, decode step by step.

Decoding is ``engine.generate.decode``, the loop ``kvlab ask`` and ``kvlab chat`` use, given the three things a
server needs between steps: text deltas for streaming, stop strings, and ``job.check()`` so a disconnect or timeout
stops the work. A document session follows the conversation rule of ``kvlab chat`` (``CompressionRule``): once the
conversation outgrows the document's budget by the headroom, the document's policy compresses it again.

``/v1/completions`` with ``echo`` and ``logprobs`` scores every prompt token: the prompt then runs from an empty
cache in one forward pass that keeps all positions' logits (``logprobs.py``), bypassing the prefix cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvlab.engine.conversation import feed_under_rule
from kvlab.engine.generate import decode
from kvlab.engine.prefill import empty_cache
from kvlab.engine.runner import ModelRunner
from kvlab.engine.sampling import Sampler, SamplingConfig
from kvlab.engine.text import TextStream
from kvlab.errors import ContextTooLongError
from kvlab.server.errors import ApiError
from kvlab.server.library import load_into_sessions
from kvlab.server.logprobs import (
    MAX_ECHO_LOGIT_BYTES,
    LogprobSampler,
    TokenLogprobs,
    completion_logprobs,
    prompt_logprobs,
)
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
    route: str = "/v1/chat/completions"  # labels the latency histograms
    logprobs: int | None = None  # return each token's logprob and this many alternatives (/v1/completions)
    echo: bool = False  # the text (and logprobs) start with the prompt's (/v1/completions)


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
    kv_bytes_full_fp16: int
    prefill_s: float
    decode_s: float
    queue_s: float
    recompressed: bool = False
    logprobs: dict | None = None  # OpenAI's completion logprobs object, when the request asked for it

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


def generate(state: ServerState, job: Job, prompt: Prompt, options: Options, submitted: float,
             fresh_tokens: int = 0) -> Result:
    """Run ``prompt``; emits ``("start", {prompt_tokens, cached_tokens})`` after prefill and ``("delta", text)``
    while decoding. ``submitted`` is the request's ``time.monotonic()`` arrival. ``fresh_tokens``: tokens of the
    prompt's base that this request computed itself just before (a context compressed on arrival): they are counted
    as prefilled, not as cached, in the answer and in the metrics."""
    queue_s = time.monotonic() - submitted
    ids = prompt.token_ids
    document_id = prompt.document_id or ""
    scoring = options.echo and options.logprobs is not None  # every prompt position's logits are needed
    entry = None if scoring else state.sessions.lookup(document_id, ids)
    if entry is None and document_id:
        entry = load_into_sessions(state, document_id)
    if entry is None:
        entry = Entry("", (), empty_cache(state.engine.model, state.engine.layout), 0, None)
    document_tokens = entry.document_tokens
    prompt_tokens = document_tokens + len(ids)
    max_new_tokens = _max_new_tokens(state, prompt_tokens, options.max_new_tokens)

    started = time.perf_counter()
    cache = entry.cache.fork()
    new_ids = ids[entry.fed_tokens:]
    recompressed, logits, scored = False, entry.last_logits, None
    if scoring:
        logits, scored = _score_prompt(state, cache, ids, options.logprobs or 0)
    elif new_ids:  # the conversation rule of `kvlab chat`, with cancellation between chunks
        fed = feed_under_rule(state.engine, cache, torch.tensor(new_ids, dtype=torch.long), entry.rule,
                              check=job.check, chunk_tokens=state.settings.chunk_tokens)
        cache, logits, recompressed = fed.cache, fed.logits, fed.recompressed
        if recompressed:
            state.metrics.inc("kvlab_session_recompressions_total")
    # PrefixCache.lookup never returns an entry with nothing left to feed and no logits
    assert logits is not None
    runner = ModelRunner(state.engine.model, cache)
    prefill_s = time.perf_counter() - started
    cached_tokens = document_tokens + entry.fed_tokens - fresh_tokens
    if new_ids:
        state.sessions.put(document_id, ids, cache.fork(), len(ids), logits, rule=entry.rule)
    state.metrics.inc("kvlab_prefix_cache_hits_total" if cached_tokens else "kvlab_prefix_cache_misses_total")
    if max_new_tokens:  # the first token's logits are ready: only sampling it is left
        state.metrics.observe("kvlab_time_to_first_token_seconds", time.monotonic() - submitted, route=options.route)
    job.emit("start", {"prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens})

    stop_ids = set() if options.ignore_eos else state.engine.stop_ids
    sampler = Sampler(options.sampling) if options.logprobs is None else LogprobSampler(options.sampling,
                                                                                         options.logprobs)
    generation = decode(runner, logits, max_new_tokens=max_new_tokens, sampler=sampler,
                        stop_token_ids=stop_ids, text=TextStream(state.engine.tokenizer, options.stop),
                        on_text=lambda delta: job.emit("delta", delta), check=job.check)
    tokens, stop_token = generation.token_ids, generation.stop_token
    state.metrics.inc("kvlab_generated_tokens_total", len(tokens) + (stop_token is not None))
    if tokens or stop_token is not None:
        state.sessions.put(document_id, ids + tokens + ([stop_token] if stop_token is not None else []),
                           cache.fork(), cache.num_tokens - document_tokens, rule=entry.rule)
    finish_reason = "length" if generation.stopped_by == "max_new_tokens" else "stop"
    text, logprobs = generation.text or "", None
    if isinstance(sampler, LogprobSampler):
        text, logprobs = completion_logprobs(state.engine.tokenizer, ids, scored, sampler.entries, text,
                                             cut_by_stop_string=generation.stopped_by == "stop_string",
                                             echo=options.echo)
    elif options.echo:
        text = state.engine.tokenizer.decode(ids, clean_up_tokenization_spaces=False) + text
    result = Result(text, finish_reason, prompt.document_id, prompt_tokens, cached_tokens,
                    len(tokens), cache.held_bytes, cache.kv_bytes_full_fp16, prefill_s, generation.seconds, queue_s,
                    recompressed, logprobs)
    _count(state, result)
    state.metrics.observe("kvlab_request_latency_seconds", time.monotonic() - submitted, route=options.route)
    return result


def _score_prompt(state: ServerState, cache, ids: list[int], k: int) -> tuple[torch.Tensor, TokenLogprobs]:
    """Feed the whole prompt to the empty ``cache`` in one forward pass keeping every position's logits; returns
    the last position's logits (vocab,) and the prompt tokens' logprobs."""
    vocab = int(state.engine.loaded.config.vocab_size)
    if len(ids) * vocab * 4 > MAX_ECHO_LOGIT_BYTES:
        raise ApiError(400, f"echo with logprobs scores at most {MAX_ECHO_LOGIT_BYTES // (vocab * 4)} prompt tokens "
                            f"on this model (their logits are held at once); the prompt has {len(ids)}: shorten it",
                       param="prompt", code="context_length_exceeded")
    all_logits = ModelRunner(state.engine.model, cache).feed(torch.tensor(ids, dtype=torch.long),
                                                             logits_to_keep=len(ids))
    assert all_logits is not None  # logits_to_keep >= 1
    return all_logits[-1], prompt_logprobs(all_logits, ids, k)


def _max_new_tokens(state: ServerState, prompt_tokens: int, requested: int | None) -> int:
    """``requested`` (0: only score the prompt, with echo), else the server's default within the window."""
    limit = state.max_context_tokens
    if not limit:
        return state.settings.default_max_tokens if requested is None else requested
    wanted = requested if requested is not None else max(1, min(state.settings.default_max_tokens,
                                                                 limit - prompt_tokens))
    if prompt_tokens + wanted > limit:
        raise ContextTooLongError(
            f"this model's maximum context length is {limit} tokens; the request needs {prompt_tokens + wanted} "
            f"({prompt_tokens} in the prompt, document included, and {wanted} to generate); shorten the messages "
            f"or lower max_tokens")
    return wanted


def _count(state: ServerState, result: Result) -> None:
    metrics = state.metrics
    metrics.inc("kvlab_prompt_tokens_total", result.prompt_tokens)
    metrics.inc("kvlab_prefilled_tokens_total", result.prefilled_tokens)
    metrics.inc("kvlab_cached_prompt_tokens_total", result.cached_tokens)
    metrics.inc("kvlab_completion_tokens_total", result.completion_tokens)
    metrics.inc("kvlab_prefill_seconds_total", result.prefill_s)
    metrics.inc("kvlab_decode_seconds_total", result.decode_s)
