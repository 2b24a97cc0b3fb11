"""Shared selection mechanics: protected windows, per-head top-k, and the gather that builds the kept cache.

Every policy reduces to a score per slot and a count per head; this module turns those into a new LayerCache. Kept
slots stay in position order, so keeping every slot reproduces the original layer exactly.
"""

from __future__ import annotations

import torch

from kvlab.cache.kvcache import PADDING_POSITION, LayerCache


def protection_mask(positions: torch.Tensor, sink_tokens: int, recent_start: int, recent_end: int) -> torch.Tensor:
    """(heads, slots) bool: slots that must be kept: the first ``sink_tokens`` positions and
    [recent_start, recent_end)."""
    valid = positions != PADDING_POSITION
    sinks = positions < sink_tokens
    recent = (positions >= recent_start) & (positions < recent_end)
    return valid & (sinks | recent)


def eligible_scores(scores: torch.Tensor, positions: torch.Tensor, protected: torch.Tensor,
                    compressible_tokens: int) -> torch.Tensor:
    """Scores for the budgeted competition: +inf for protected slots; -inf for padding and for slots past the
    compressible region (those are kept outside the budget, see ``select_slots``)."""
    ranked = scores.float().clone()
    ranked[protected] = float("inf")
    ranked[(positions == PADDING_POSITION) | (positions >= compressible_tokens)] = float("-inf")
    return ranked


def select_slots(layer: LayerCache, ranked_scores: torch.Tensor, counts: torch.Tensor,
                 compressible_tokens: int) -> LayerCache:
    """Keep, per head h, the ``counts[h]`` best-ranked slots plus every slot at or past ``compressible_tokens``.

    ``ranked_scores`` comes from ``eligible_scores``; the result is padded to the longest head.
    """
    positions = layer.positions
    always_kept = (positions != PADDING_POSITION) & (positions >= compressible_tokens)
    keep_counts = counts.to(positions.device) + always_kept.sum(dim=-1)
    order_scores = ranked_scores.masked_fill(always_kept, float("inf"))
    width = int(keep_counts.max()) if keep_counts.numel() else 0
    top = order_scores.topk(width, dim=-1).indices  # (heads, width)
    rank = torch.arange(width, device=top.device)[None, :]
    kept = rank < keep_counts[:, None]
    slot_count = positions.shape[-1]
    # Sorting by slot index restores position order; dropped entries sort last and become padding.
    sort_key = torch.where(kept, top, top + slot_count)
    order = sort_key.argsort(dim=-1)
    top = top.gather(-1, order)
    kept = kept.gather(-1, order)
    gather_index = top[..., None].expand(-1, -1, layer.keys.shape[-1])
    keys = layer.keys.gather(1, gather_index) * kept[..., None]
    values = layer.values.gather(1, gather_index) * kept[..., None]
    new_positions = positions.gather(-1, top).masked_fill(~kept, PADDING_POSITION)
    return LayerCache(layer.spec, keys, values, new_positions)


def keep_newest(layer: LayerCache, count: int, compressible_tokens: int) -> LayerCache:
    """Keep, per head, the ``count`` newest slots before ``compressible_tokens`` plus every slot at or past it: a
    sliding-window layer trimmed to a shorter window, still contiguous in positions, so the layer keeps dropping its
    oldest slots as it slides. The layer itself when it holds no more than that."""
    positions = layer.positions
    before = (positions != PADDING_POSITION) & (positions < compressible_tokens)
    if not positions.numel() or int(before.sum(dim=-1).max()) <= count:
        return layer
    ranked = positions.float().masked_fill(~before, float("-inf"))
    counts = torch.full((positions.shape[0],), count, dtype=torch.long, device=positions.device)
    return select_slots(layer, ranked, counts, compressible_tokens)
