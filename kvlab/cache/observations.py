"""What a cache's construction observed about attention, kept for the policies that score with it.

Two observations are built in, because many policies share them. Per full-attention layer:
  window_queries:   (query_heads, W, head_dim), the rotated queries of the last W prefix tokens (SnapKV, TOVA, ...)
  window_positions: (W,), their positions
  attention_sums:   (kv_heads, tokens), attention each key received, summed over all queries of the prefix and
                    over the query heads sharing the KV head (H2O); present only when a policy asked for it
  scaling:          the softmax scale the model uses in that layer

Anything else a policy must observe is a ``Probe`` declared in the policy's own file: query statistics, a
reconstruction pass over the document (KVzip), a per-model head profile (DuoAttention), ... The engine records the
union of what a grid's policies request, once per prefill, without knowing what the probes are: it hands each
probe's ``ProbeState`` every attention call, then calls ``finish`` with a ``Replay`` through which the probe may
run extra forward passes on a throwaway fork of the cache. Results land in ``LayerObservation.extras[probe]`` or
``Observations.extras[probe]`` (a probe is a frozen dataclass, so equal probes share one recording), and the
seconds a probe spent in ``finish`` are counted in the compression time of the policies that asked for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from kvlab.cache.layout import LayerSpec


@dataclass
class LayerObservation:
    scaling: float
    window_queries: torch.Tensor | None = None
    window_positions: torch.Tensor | None = None
    attention_sums: torch.Tensor | None = None
    extras: dict[Any, Any] = field(default_factory=dict)


class AttentionObserver(Protocol):
    def __call__(self, layer_index: int, spec: LayerSpec, queries: torch.Tensor, keys: torch.Tensor,
                 slot_positions: torch.Tensor, query_positions: torch.Tensor, scaling: float) -> None: ...


class Replay(Protocol):
    """What the engine lends a probe after a feed: the tokens fed, the model's prompt format, and extra passes.

    ``context_ids``: the tokens this feed appended (1-D), at positions ``first_position`` onwards.
    ``question_ids(text)``: ``text`` formatted as a question asked after the document (the model's chat format);
    ``text(ids)``: tokens decoded to text.
    ``feed_fork(ids, observer)``: feed ``ids`` on a fork of the cache as it was after the feed (the fork is thrown
    away); ``observer`` sees every full-attention call, as during prefill.
    """

    context_ids: torch.Tensor
    first_position: int

    def question_ids(self, text: str) -> torch.Tensor: ...

    def text(self, token_ids: torch.Tensor) -> str: ...

    def feed_fork(self, token_ids: torch.Tensor, observer: AttentionObserver) -> None: ...


@dataclass(frozen=True)
class ProbeContext:
    """Where a probe is recording: the layer layout, the sequence length once the feed ends, the position of the
    feed's first token (0 for a prefill; the cache length when a conversation appends a turn), and the model's
    fingerprint (for per-model data such as head profiles)."""

    layout: list[LayerSpec]
    total_tokens: int
    first_position: int = 0
    model_fingerprint: str | None = None


class ProbeState:
    """One recording in progress. Override what the probe needs; the defaults observe nothing."""

    def on_attention(self, layer_index: int, spec: LayerSpec, queries: torch.Tensor, keys: torch.Tensor,
                     slot_positions: torch.Tensor, query_positions: torch.Tensor, scaling: float) -> None:
        """Every full-attention call of the feed: queries (query_heads, q, d), keys (kv_heads, K, d) of every slot
        (the new tokens included), slot_positions (kv_heads, K), query_positions (q,)."""

    def finish(self, observations: Observations, replay: Replay | None) -> None:
        """After the feed: store results in ``observations``; ``replay`` is None where no extra pass is possible."""


class Probe:
    """Something a policy must observe, declared in the policy's file as a frozen (hashable) dataclass whose fields
    are the recording's settings. Equal probes are recorded once however many grid cells ask for them; results
    are stored under the probe itself."""

    def start(self, context: ProbeContext) -> ProbeState:
        raise NotImplementedError


@dataclass(frozen=True)
class ObservationRequest:
    """What to record during prefill: the last ``window_tokens`` queries, optionally attention sums, and probes."""

    window_tokens: int = 0
    attention_sums: bool = False
    probes: tuple[Probe, ...] = ()

    def union(self, other: ObservationRequest) -> ObservationRequest:
        return ObservationRequest(max(self.window_tokens, other.window_tokens),
                                  self.attention_sums or other.attention_sums,
                                  tuple(dict.fromkeys((*self.probes, *other.probes))))

    @property
    def empty(self) -> bool:
        return not (self.window_tokens or self.attention_sums or self.probes)


@dataclass
class Observations:
    """Per-layer observations (None for sliding layers and layers nothing was recorded for), model-level probe
    results (``extras``) and the seconds each probe spent after the feed (``seconds``); both keyed by probe."""

    layers: list[LayerObservation | None] = field(default_factory=list)
    request: ObservationRequest = field(default_factory=ObservationRequest)
    extras: dict[Any, Any] = field(default_factory=dict)
    seconds: dict[Any, float] = field(default_factory=dict)

    def layer(self, index: int) -> LayerObservation | None:
        return self.layers[index] if index < len(self.layers) else None

    def layer_extra(self, index: int, probe: Probe) -> Any:
        observation = self.layer(index)
        return None if observation is None else observation.extras.get(probe)

    def put_layer_extra(self, index: int, probe: Probe, value: Any, scaling: float) -> None:
        """Store a probe's result for layer ``index``, creating the layer's observation (with ``scaling``) if
        nothing was recorded for it yet."""
        observation = self.layers[index]
        if observation is None:
            observation = self.layers[index] = LayerObservation(scaling=scaling)
        observation.extras[probe] = value

    def cost_of(self, request: ObservationRequest) -> float:
        """Seconds spent after the feed on the probes of ``request`` (their extra passes)."""
        return sum(self.seconds.get(probe, 0.0) for probe in request.probes)
