"""Record what policies need while a feed runs: observation-window queries, accumulated attention, and the
policies' own probes (``cache.observations.Probe``), which may replay extra passes on a fork of the cache."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from kvlab.cache.kvcache import PADDING_POSITION, KVCache
from kvlab.cache.layout import LayerSpec
from kvlab.cache.observations import (
    AttentionObserver,
    LayerObservation,
    ObservationRequest,
    Observations,
    ProbeContext,
    Replay,
)

# Attention sums are computed for this many queries at a time: memory is query_heads x 256 x keys floats.
ATTENTION_SUM_QUERY_CHUNK = 256


class ObservationRecorder:
    """An attention observer (see ``engine.attention``) that fills an Observations object.

    ``total_tokens`` is the length of the whole prefix being prefilled, so the recorder knows which queries fall
    in the observation window (the last ``request.window_tokens`` positions). ``first_position`` is where the
    feed starts (0 for a prefill). Call ``finish`` once the feed is over: the probes then complete their work.
    """

    def __init__(self, request: ObservationRequest, layout: list[LayerSpec], total_tokens: int, *,
                 first_position: int = 0, model_fingerprint: str | None = None) -> None:
        self.request = request
        self.window_start = total_tokens - request.window_tokens
        self.total_tokens = total_tokens
        self.observations = Observations(layers=[None] * len(layout), request=request)
        context = ProbeContext(layout, total_tokens, first_position, model_fingerprint)
        self.probe_states = {probe: probe.start(context) for probe in request.probes}

    def finish(self, replay: Replay | None) -> Observations:
        """Let every probe complete (extra passes included, timed per probe); returns the observations."""
        for probe, state in self.probe_states.items():
            started = time.perf_counter()
            state.finish(self.observations, replay)
            self.observations.seconds[probe] = time.perf_counter() - started
        return self.observations

    def __call__(self, layer_index: int, spec: LayerSpec, queries: torch.Tensor, keys: torch.Tensor,
                 slot_positions: torch.Tensor, query_positions: torch.Tensor, scaling: float) -> None:
        if spec.kind != "full":
            return  # policies compress full-attention layers only; sliding layers keep their window
        observation = self.observations.layers[layer_index]
        if observation is None:
            observation = self.observations.layers[layer_index] = LayerObservation(scaling=float(scaling))
        if self.request.window_tokens:
            self._record_window(observation, queries, query_positions)
        if self.request.attention_sums:
            self._accumulate(observation, spec, queries, keys, slot_positions, query_positions, scaling)
        for state in self.probe_states.values():
            state.on_attention(layer_index, spec, queries, keys, slot_positions, query_positions, scaling)

    def _record_window(self, observation: LayerObservation, queries: torch.Tensor,
                       query_positions: torch.Tensor) -> None:
        in_window = query_positions >= self.window_start
        if not bool(in_window.any()):
            return
        new_queries = queries[:, in_window].detach().clone()
        new_positions = query_positions[in_window].clone()
        if observation.window_queries is None:
            observation.window_queries, observation.window_positions = new_queries, new_positions
        else:
            assert observation.window_positions is not None  # recorded together with window_queries
            observation.window_queries = torch.cat([observation.window_queries, new_queries], dim=1)
            observation.window_positions = torch.cat([observation.window_positions, new_positions])

    def _accumulate(self, observation: LayerObservation, spec: LayerSpec, queries: torch.Tensor,
                    keys: torch.Tensor, slot_positions: torch.Tensor, query_positions: torch.Tensor,
                    scaling: float) -> None:
        if observation.attention_sums is None:
            observation.attention_sums = torch.zeros((spec.kv_heads, self.total_tokens), dtype=torch.float32,
                                                     device=keys.device)
        grouped_keys = keys.float().repeat_interleave(spec.group_size, dim=0)  # (query_heads, K, d)
        received = torch.zeros(slot_positions.shape, dtype=torch.float32, device=keys.device)  # (kv_heads, K)
        for start in range(0, queries.shape[1], ATTENTION_SUM_QUERY_CHUNK):
            chunk = queries[:, start:start + ATTENTION_SUM_QUERY_CHUNK].float()
            chunk_positions = query_positions[start:start + ATTENTION_SUM_QUERY_CHUNK]
            logits = chunk @ grouped_keys.transpose(1, 2) * scaling
            slots = slot_positions.repeat_interleave(spec.group_size, dim=0)[:, None, :]
            visible = (slots <= chunk_positions[None, :, None]) & (slots != PADDING_POSITION)
            probabilities = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
            received += probabilities.sum(dim=1).reshape(spec.kv_heads, spec.group_size, -1).sum(dim=1)
        index = slot_positions.clamp(min=0)
        observation.attention_sums.scatter_add_(-1, index, received * (slot_positions != PADDING_POSITION))


class ForkReplay:
    """The engine's ``Replay``: extra passes fed on throwaway forks of ``cache`` (see ``cache.observations``)."""

    def __init__(self, feed: Callable[[KVCache, torch.Tensor, AttentionObserver], None], cache: KVCache,
                 context_ids: torch.Tensor, first_position: int, question_ids: Callable[[str], torch.Tensor],
                 decode: Callable[[list[int]], str]) -> None:
        self._feed, self._cache, self._question_ids, self._decode = feed, cache, question_ids, decode
        self.context_ids, self.first_position = context_ids, first_position

    def question_ids(self, text: str) -> torch.Tensor:
        return self._question_ids(text)

    def text(self, token_ids: torch.Tensor) -> str:
        return self._decode(token_ids.tolist())

    def feed_fork(self, token_ids: torch.Tensor, observer: AttentionObserver) -> None:
        fork = self._cache.fork()
        fork.reserve(int(token_ids.numel()))
        self._feed(fork, token_ids, observer)


def dispatch_full_layers(observer: AttentionObserver) -> AttentionObserver:
    """An observer that only sees full-attention layers (what probes score; sliding layers keep their window)."""

    def observe(layer_index, spec, queries, keys, slot_positions, query_positions, scaling) -> None:
        if spec.kind == "full":
            observer(layer_index, spec, queries, keys, slot_positions, query_positions, scaling)

    return observe
