"""KVCache: our KV container. Per layer and per KV head it holds the kept keys, values and original positions.

Tensors have no batch dimension (kvlab runs one sequence at a time):
  keys, values: (kv_heads, slots, head_dim)
  positions:    (kv_heads, slots) int64, the token's original position in the sequence, which is also its index
                in the token sequence; -1 marks a padding slot.
Heads of one layer may keep different numbers of tokens (head-wise policies such as Ada-KV); the layer is then
padded to its longest head and the padding slots are masked in attention. Slots within a head are sorted by
position, padding last. Byte accounting distinguishes ``live_bytes`` (kept tokens only) from ``allocated_bytes``
(what the tensors occupy, padding included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.cache.layout import LayerSpec

PADDING_POSITION = -1


@dataclass
class LayerCache:
    spec: LayerSpec
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        """(kv_heads, slots) bool: True where the slot holds a real token."""
        return self.positions != PADDING_POSITION

    @property
    def kept_per_head(self) -> torch.Tensor:
        """(kv_heads,) int64: tokens kept by each head."""
        return self.valid.sum(dim=-1)

    @property
    def live_bytes(self) -> int:
        per_token = self.spec.head_dim * (self.keys.element_size() + self.values.element_size())
        return int(self.valid.sum()) * per_token

    @property
    def allocated_bytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def is_ragged(self) -> bool:
        return bool((~self.valid).any())


@dataclass
class KVCache:
    """A whole model's cache; ``num_tokens`` is the length of the token sequence it represents."""

    layers: list[LayerCache]
    num_tokens: int

    @property
    def live_bytes(self) -> int:
        """Bytes of the kept keys and values (padding excluded)."""
        return sum(layer.live_bytes for layer in self.layers)

    @property
    def allocated_bytes(self) -> int:
        """Bytes the key and value tensors occupy (padding included)."""
        return sum(layer.allocated_bytes for layer in self.layers)

    def full_bytes(self) -> int:
        """Bytes this sequence would take uncompressed: every token in full layers, the window in sliding ones."""
        total = 0
        for layer in self.layers:
            tokens = self.num_tokens if layer.spec.retained_tokens is None else min(
                self.num_tokens, layer.spec.retained_tokens)
            per_token = layer.spec.head_dim * (layer.keys.element_size() + layer.values.element_size())
            total += tokens * layer.spec.kv_heads * per_token
        return total

    def kept_tokens(self) -> float:
        """Mean tokens kept per head over the full-attention layers (the layers policies compress)."""
        counts = [layer.kept_per_head.float().mean() for layer in self.layers if layer.spec.kind == "full"]
        return float(torch.stack(counts).mean()) if counts else float(self.num_tokens)

    def fork(self) -> "KVCache":
        """A copy that shares the tensors but not the LayerCache objects: growing or trimming the fork (which
        reassigns tensors, never writes into them) leaves this cache as it was. Costs no tensor copies."""
        return KVCache(layers=[LayerCache(layer.spec, layer.keys, layer.values, layer.positions)
                               for layer in self.layers], num_tokens=self.num_tokens)

    def clone(self) -> "KVCache":
        return KVCache(
            layers=[LayerCache(layer.spec, layer.keys.clone(), layer.values.clone(), layer.positions.clone())
                    for layer in self.layers],
            num_tokens=self.num_tokens,
        )


def pack_heads(spec: LayerSpec, keys: list[torch.Tensor], values: list[torch.Tensor],
               positions: list[torch.Tensor]) -> LayerCache:
    """Stack per-head (slots_h, head_dim) tensors into one padded LayerCache; padding goes last in each head."""
    width = max(int(p.numel()) for p in positions)
    reference = keys[0]
    packed_keys = reference.new_zeros((len(keys), width, reference.shape[-1]))
    packed_values = values[0].new_zeros((len(values), width, values[0].shape[-1]))
    packed_positions = torch.full((len(positions), width), PADDING_POSITION, dtype=torch.long,
                                  device=positions[0].device)
    for head, (head_keys, head_values, head_positions) in enumerate(zip(keys, values, positions)):
        count = head_positions.numel()
        packed_keys[head, :count] = head_keys
        packed_values[head, :count] = head_values
        packed_positions[head, :count] = head_positions
    return LayerCache(spec, packed_keys, packed_values, packed_positions)
