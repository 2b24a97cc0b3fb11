"""Chunked prefill: run the prefix through the model once, building a KVCache and the policies' observations."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from kvlab.cache.kvcache import KVCache, empty_layer
from kvlab.cache.layout import LayerSpec
from kvlab.cache.observations import AttentionObserver, ObservationRequest, Observations
from kvlab.engine.observe import ForkReplay, ObservationRecorder, dispatch_full_layers
from kvlab.engine.runner import ModelRunner

DEFAULT_CHUNK_TOKENS = 4096


@dataclass
class PrefillResult:
    """The full cache after prefill, what was observed, and the logits at the last prefix position (fp32, vocab).
    ``seconds`` is the prefill itself; probes' extra passes are in ``observations.seconds``."""

    cache: KVCache
    observations: Observations
    last_logits: torch.Tensor
    seconds: float


def empty_cache(model, layout: list[LayerSpec]) -> KVCache:
    parameter = next(model.parameters())
    return KVCache(layers=[empty_layer(spec, parameter.dtype, parameter.device) for spec in layout], num_tokens=0)


def prefill(model, layout: list[LayerSpec], token_ids: torch.Tensor, *,
            request: ObservationRequest = ObservationRequest(), chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
            progress: bool = False, question_ids: Callable[[str], torch.Tensor] | None = None,
            decode: Callable[[list[int]], str] | None = None, model_fingerprint: str | None = None,
            check: Callable[[], None] | None = None) -> PrefillResult:
    """Prefill ``token_ids`` (1-D) from an empty cache in chunks of ``chunk_tokens``.

    Only the last position's logits are computed. Observations cover the whole prefix: the window is its last
    ``request.window_tokens`` tokens. Probes that replay (``cache.observations.Replay``) format their prompts with
    ``question_ids`` and ``decode`` (the tokenizer's); without them they get no replay. ``check`` runs before every
    forward pass (prefill chunks and replays) and may raise to cancel.
    """
    started = time.perf_counter()
    cache = empty_cache(model, layout)
    cache.reserve(int(token_ids.numel()), chunk_tokens)
    runner = ModelRunner(model, cache)
    wants_observations = not request.empty
    recorder = ObservationRecorder(request, layout, total_tokens=int(token_ids.numel()),
                                   model_fingerprint=model_fingerprint)
    logits = None
    starts = range(0, int(token_ids.numel()), chunk_tokens)
    bar = tqdm(total=int(token_ids.numel()), unit="tok", desc="prefill", disable=not progress, leave=False)
    for start in starts:
        if check is not None:
            check()
        chunk = token_ids[start:start + chunk_tokens]
        is_last = start + chunk_tokens >= token_ids.numel()
        logits = runner.feed(chunk, observer=recorder if wants_observations else None,
                             logits_to_keep=1 if is_last else 0)
        bar.update(int(chunk.numel()))
    bar.close()
    assert logits is not None  # the last chunk asks for logits
    seconds = time.perf_counter() - started
    replay = None
    if question_ids is not None and decode is not None:
        def feed_fork(fork: KVCache, ids: torch.Tensor, observer: AttentionObserver) -> None:
            fork_runner, watch = ModelRunner(model, fork), dispatch_full_layers(observer)
            for begin in range(0, int(ids.numel()), chunk_tokens):
                if check is not None:
                    check()
                fork_runner.feed(ids[begin:begin + chunk_tokens], observer=watch, logits_to_keep=0)

        replay = ForkReplay(feed_fork, cache, token_ids, 0, question_ids, decode)
    observations = recorder.finish(replay) if wants_observations else recorder.observations
    return PrefillResult(cache, observations, logits[-1], seconds)
