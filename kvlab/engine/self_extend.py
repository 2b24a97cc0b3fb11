"""Self-Extend attention (``models.extension.SelfExtend``) over a kvlab cache layer.

The cache holds keys rotated at their true positions and the model hands over queries rotated at theirs. For the
grouped part both are moved, by composing rotations (``cache.rope.rotate_by``): a key at p to ``p // group``, a
query at q to ``q // group + window - window // group``. Each (query, slot) pair then takes the neighbour score when
the slot is fewer than ``window`` positions back, else the grouped one; padding and future slots are masked;
softmax in fp32. Where every visible slot is within the window of every query the grouped part changes nothing, and
the plain attention runs instead.

Two ways to compute it, giving the same result:
  - on the CPU (the flash kernel returns each row's log-sum-exp): queries go in blocks of positions [a, b). Slots
    at least ``window`` behind a are grouped for every query of the block: they go through the flash kernel with
    no mask, and only the few slots in between (at most ``window`` + block) are scored explicitly, pair by pair.
    The two parts merge by their log-sum-exp. Heads that hold the same slots go in one call; otherwise
    (head-wise eviction, padding) each head goes alone over its valid slots. This costs about one plain attention,
    where scoring every pair twice cost ~4x more CPU at 16K tokens;
  - elsewhere: both score matrices explicitly, in blocks of queries that keep them ~32 M elements whatever the
    cache length.
"""

from __future__ import annotations

import torch

from kvlab.cache.kernels import flash_available, flash_with_lse, merge_by_lse
from kvlab.cache.kvcache import PADDING_POSITION, LayerCache
from kvlab.cache.layout import LayerSpec
from kvlab.cache.paged import GroupedQuery
from kvlab.cache.rope import grouped_shift, rotate_by
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
                       query_positions: torch.Tensor, scale: float, extension: SelfExtend,
                       positions: torch.Tensor | None = None) -> torch.Tensor:
    """query (1, query_heads, q, d) over keys, values (1, kv_heads, S, d) with the slots' positions (kv_heads, S)
    ``positions`` (default: the layer's own, when keys and values are all of its slots); returns
    (1, query_heads, q, d)."""
    spec = layer.spec
    theta = _rope_theta(spec)
    kv_heads, group, dim = spec.kv_heads, spec.group_size, query.shape[-1]
    count = query.shape[2]
    window, size = extension.window, extension.group
    positions = layer.positions if positions is None else positions  # (kv_heads, S)
    valid = positions != PADDING_POSITION
    shared = _shares_positions(positions, valid)
    # heads holding the same slots move alike: the rotation's angles are computed once for all of them
    key_positions = positions[0] if shared else torch.where(valid, positions, torch.zeros_like(positions))
    grouped_keys = rotate_by(keys[0], grouped_shift(key_positions, size), theta)
    queries = query[0].reshape(kv_heads, group, count, dim)
    grouped_queries = rotate_by(queries, _query_shift(query_positions, extension), theta)
    if flash_available(query):
        if shared:
            output = _split_attend(queries, grouped_queries, keys[0], grouped_keys, values[0], positions[0],
                                   query_positions, scale, window)
        else:  # heads hold different slots (head-wise eviction, padding): one head at a time, its valid slots
            heads = []
            for head in range(kv_heads):
                held = valid[head].nonzero().flatten()
                heads.append(_split_attend(
                    queries[head:head + 1], grouped_queries[head:head + 1], keys[0, head:head + 1, held],
                    grouped_keys[head:head + 1, held], values[0, head:head + 1, held], positions[head, held],
                    query_positions, scale, window))
            output = torch.cat(heads)
        return output.reshape(1, kv_heads * group, count, dim)
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


def grouped_decode_query(query: torch.Tensor, position: int, spec: LayerSpec,
                         extension: SelfExtend) -> GroupedQuery:
    """One decode query (query_heads, d), rotated at ``position``, also moved to its grouped position: what a
    paged layer (Quest) bounds its pages' grouped scores with."""
    shift = _query_shift(torch.tensor([position]), extension)
    moved = rotate_by(query[:, None], shift.to(query.device), _rope_theta(spec))[:, 0]
    return GroupedQuery(moved, position, extension.group, extension.window)


def _query_shift(query_positions: torch.Tensor, extension: SelfExtend) -> torch.Tensor:
    """How far each query moves: from q to q // group + window - window // group."""
    size, window = extension.group, extension.window
    return query_positions // size + (window - window // size) - query_positions


def _rope_theta(spec: LayerSpec) -> float:
    if spec.rope_theta is None:
        raise UnsupportedModelError("--extend self-extend needs standard RoPE in the full-attention layers (this "
                                    "model's RoPE is scaled or partial)")
    return spec.rope_theta


def _shares_positions(positions: torch.Tensor, valid: torch.Tensor) -> bool:
    return bool(valid.all()) and (positions.shape[0] == 1 or bool((positions == positions[:1]).all()))


def _split_attend(queries: torch.Tensor, grouped_queries: torch.Tensor, keys: torch.Tensor,
                  grouped_keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                  query_positions: torch.Tensor, scale: float, window: int) -> torch.Tensor:
    """queries, grouped_queries (kv_heads, group, q, d) over keys, grouped_keys, values (kv_heads, S, d) whose slots
    all sit at ``positions`` (S,); returns (kv_heads, group, q, d). Queries go in blocks; within one, the slots
    every query groups take the flash kernel unmasked, the others are scored pair by pair, and the two merge."""
    kv_heads, group, count, dim = queries.shape
    block = max(1, min(count, SCORE_ELEMENTS_PER_BLOCK // max(1, kv_heads * group * (window + count))))
    outputs = []
    for start in range(0, count, block):
        block_positions = query_positions[start:start + block]
        rows = block_positions.numel()
        first, last = int(block_positions.min()), int(block_positions.max())
        far = torch.nonzero(positions <= first - window).flatten()
        near = torch.nonzero((positions > first - window) & (positions <= last)).flatten()
        parts = []
        if far.numel():
            far_queries = grouped_queries[:, :, start:start + block].reshape(1, kv_heads, group * rows, dim)
            out, lse = flash_with_lse(far_queries, _take(grouped_keys, far)[None], _take(values, far)[None],
                                      causal=False, scale=scale)
            parts.append((out.reshape(kv_heads, group, rows, dim).float(), lse.reshape(kv_heads, group, rows)))
        if near.numel():
            near_positions = _take(positions, near, dim=0)
            distance = block_positions[:, None] - near_positions[None, :]  # (rows, near)
            true_scores = torch.einsum("hgqd,hkd->hgqk", queries[:, :, start:start + block],
                                       _take(keys, near)).float()
            moved_scores = torch.einsum("hgqd,hkd->hgqk", grouped_queries[:, :, start:start + block],
                                        _take(grouped_keys, near)).float()
            scores = torch.where(distance < window, true_scores, moved_scores) * scale
            scores.masked_fill_(distance < 0, float("-inf"))
            lse = torch.logsumexp(scores, dim=-1)
            weights = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num_(0.0)
            parts.append((torch.einsum("hgqk,hkd->hgqd", weights, _take(values, near).float()), lse))
        outputs.append(merge_by_lse(parts).to(queries.dtype))
    return torch.cat(outputs, dim=2)



def _take(tensor: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``tensor`` at ascending ``index`` along ``dim``: a view where the indices are one run (slots held in
    position order, as a cache keeps them), a copy otherwise."""
    first, count = int(index[0]), index.numel()
    if int(index[-1]) - first + 1 == count:
        return tensor.narrow(dim, first, count)
    return tensor.index_select(dim, index)
