"""What prefill observed about attention, kept for the policies that score with it.

Per full-attention layer:
  window_queries:   (query_heads, W, head_dim), the rotated queries of the last W prefix tokens (SnapKV, TOVA, ...)
  window_positions: (W,), their positions
  attention_sums:   (kv_heads, tokens), attention each key received, summed over all queries of the prefix and
                    over the query heads sharing the KV head (H2O); present only when a policy asked for it
  scaling:          the softmax scale the model uses in that layer
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerObservation:
    scaling: float
    window_queries: torch.Tensor | None = None
    window_positions: torch.Tensor | None = None
    attention_sums: torch.Tensor | None = None


@dataclass(frozen=True)
class ObservationRequest:
    """What to record during prefill: the last ``window_tokens`` queries and, optionally, attention sums."""

    window_tokens: int = 0
    attention_sums: bool = False

    def union(self, other: ObservationRequest) -> ObservationRequest:
        return ObservationRequest(max(self.window_tokens, other.window_tokens),
                                  self.attention_sums or other.attention_sums)


@dataclass
class Observations:
    """Per-layer observations (None for sliding layers and layers nothing was recorded for)."""

    layers: list[LayerObservation | None] = field(default_factory=list)
    request: ObservationRequest = field(default_factory=ObservationRequest)

    def layer(self, index: int) -> LayerObservation | None:
        return self.layers[index] if index < len(self.layers) else None
