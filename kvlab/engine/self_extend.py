"""Self-Extend attention (``models.extension.SelfExtend``) over a kvlab cache layer.

The cache holds keys rotated at their true positions and the model hands over queries rotated at theirs. For the
grouped part both are moved, by composing rotations (``cache.rope.rotate_by``): a key at p to ``p // group``, a
query at q to ``q // group + window - window // group``. Each (query, slot) pair then takes the neighbour score when
the slot is fewer than ``window`` positions back, else the grouped one; padding and future slots are masked;
softmax in fp32. Queries go in blocks so that the two score matrices stay ~32 M elements whatever the cache
length. Where every visible slot is within the window of every query the grouped part changes nothing, and the
plain attention runs instead.
"""

from __future__ import annotations

import torch

from kvlab.cache.kvcache import PADDING_POSITION, LayerCache
from kvlab.cache.rope import rotate_by
from kvlab.errors import UnsupportedModelError
from kvlab.models.extension import SelfExtend

SCORE_ELEMENTS_PER_BLOCK = 1 << 25


def needs_grouping(layer: LayerCache, query_positions: torch.Tensor, extension: SelfExtend) -> bool:
    """Whether any query sees a slot at least ``window`` positions back (only full-attention layers group)."""
    if layer.spec.window_tokens is not None:
        return False
    positions = layer.positions
    valid = positions[positions != PADDING_POSITION]
    return bool(valid.numel()) and int(query_positions.max()) - int(valid.min()) >= extension.window


def self_extend_attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layer: LayerCache,
                       query_positions: torch.Tensor, scale: float, extension: SelfExtend) -> torch.Tensor:
    """query (1, query_heads, q, d) over keys, values (1, kv_heads, S, d) with the slots' positions in ``layer``;
    returns (1, query_heads, q, d)."""
    spec = layer.spec
    if spec.rope_theta is None:
        raise UnsupportedModelError("--extend self-extend needs standard RoPE in the full-attention layers (this "
                                    "model's RoPE is scaled or partial)")
    kv_heads, group, dim = spec.kv_heads, spec.group_size, query.shape[-1]
    count = query.shape[2]
    window, size = extension.window, extension.group
    positions = layer.positions  # (kv_heads, S)
    valid = positions != PADDING_POSITION
    true_positions = torch.where(valid, positions, torch.zeros_like(positions))
    grouped_keys = rotate_by(keys[0], true_positions // size - true_positions, spec.rope_theta)
    query_shift = query_positions // size + (window - window // size) - query_positions
    queries = query[0].reshape(kv_heads, group, count, dim)
    grouped_queries = rotate_by(queries, query_shift, spec.rope_theta)
    slots = keys.shape[2]
    block = max(1, SCORE_ELEMENTS_PER_BLOCK // max(1, kv_heads * group * slots))
    outputs = []
    for start in range(0, count, block):
        end = min(count, start + block)
        near_scores = torch.einsum("hgqd,hkd->hgqk", queries[:, :, start:end], keys[0]).float()
        far_scores = torch.einsum("hgqd,hkd->hgqk", grouped_queries[:, :, start:end], grouped_keys).float()
        distance = query_positions[start:end][None, :, None] - positions[:, None, :]  # (kv_heads, q, S)
        scores = torch.where((distance < window)[:, None], near_scores, far_scores) * scale
        visible = (distance >= 0) & valid[:, None, :]
        scores.masked_fill_(~visible[:, None], float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(values.dtype)
        outputs.append(torch.einsum("hgqk,hkd->hgqd", weights, values[0]))
    return torch.cat(outputs, dim=2).reshape(1, kv_heads * group, count, dim)
