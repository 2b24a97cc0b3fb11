"""kvlab's attention function, registered once per model in transformers' AttentionInterface as ``kvlab``.

Why our own: after eviction the kept keys no longer sit at the index transformers would infer from the cache
length, heads of one layer may keep different tokens, and layers may keep different counts. A kvlab forward pass
(``engine.runner``) passes a ``Step`` as the ``kvlab_step`` keyword; transformers hands it to every attention call.
Without it the function is transformers' own SDPA attention, so the model stays usable as usual (``generate``,
a plain forward, another library's cache) and nothing is switched per call.

With a step, the cache layer has already appended the new keys (``cache.hf.HFCacheView.update``); this function
only reads them and never changes the cache. Masks follow from facts known without touching the positions:
  - decode (one query): every cached slot is in the past and a sliding layer holds at most window - 1 of them, so
    no mask is needed; a padded (head-wise) layer uses the padding mask found once when the layer was built;
  - the first chunk of a prefill: plain causal attention;
  - a later chunk over unpadded full-attention slots: attention to the past needs no mask and the new-by-new block
    is causal, so the two are computed apart and merged by their log-sum-exp (CPU flash kernel);
  - anything else (sliding windows across chunks, padded layers with several queries, other devices): a mask built
    from the stored positions, over the new queries only.
During prefill it hands the rotated queries to an observer, which is how policies see attention without a
model-specific hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvlab.cache.kernels import flash_available, flash_with_lse, merge_by_lse
from kvlab.cache.kvcache import PADDING_POSITION, KVCache, LayerCache
from kvlab.cache.layout import LayerSpec
from kvlab.cache.paged import PagedLayerCache
from kvlab.engine.self_extend import grouped_decode_query, needs_grouping, self_extend_attend
from kvlab.errors import UnsupportedModelError
from kvlab.models.extension import SelfExtend

IMPLEMENTATION_NAME = "kvlab"
MASKED_SCORE_ELEMENTS = 1 << 24  # scores per block of a masked attention call (64 MiB in fp32)
STEP_KEYWORD = "kvlab_step"

# observer(layer_index, spec, queries (query_heads, q, d), keys (kv_heads, K, d), slot_positions (kv_heads, K),
#          query_positions (q,), scaling)
Observer = Callable[[int, LayerSpec, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], None]


@dataclass
class Step:
    """One forward pass: the cache it appends to, the new tokens' positions (q,) int64, an optional observer, and
    the model's context extension (``models.extension``; None: plain attention)."""

    cache: KVCache
    query_positions: torch.Tensor
    observer: Observer | None = None
    extension: SelfExtend | None = None


def install(model) -> None:
    """Register the kvlab attention function and make it the model's implementation (once; idempotent)."""
    if model.config._attn_implementation == IMPLEMENTATION_NAME:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION_NAME, kvlab_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION_NAME, sdpa_mask)  # plain calls get SDPA's masks
    model.set_attn_implementation(IMPLEMENTATION_NAME)


def kvlab_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    step: Step | None = kwargs.pop(STEP_KEYWORD, None)
    if step is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if kwargs.get("softcap") is not None:
        raise UnsupportedModelError("attention logit soft-capping (Gemma 2) is not supported by kvlab")
    layer = step.cache.layers[module.layer_idx]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if step.observer is not None:
        step.observer(module.layer_idx, layer.spec, query[0], key[0], layer.positions, step.query_positions, scale)
    if step.extension is not None and needs_grouping(layer, step.query_positions, step.extension):
        positions = None
        if isinstance(layer, PagedLayerCache) and query.shape[2] == 1:  # the pages its plain and grouped bounds pick
            grouped = grouped_decode_query(query[0, :, 0], int(step.query_positions[0]), layer.spec, step.extension)
            key, value, positions = layer.grouped_decode_tensors(query[0, :, 0], grouped)
            key, value = key.unsqueeze(0), value.unsqueeze(0)
        output = self_extend_attend(query, key, value, layer, step.query_positions, scale, step.extension,
                                    positions)
    elif isinstance(layer, PagedLayerCache) and query.shape[2] == 1:
        output = paged_decode(query, layer, scale)
    else:
        output = attend(query, key, value, layer, step.query_positions, scale)
    return output.transpose(1, 2).contiguous(), None


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layer: LayerCache,
           query_positions: torch.Tensor, scale: float) -> torch.Tensor:
    """query (1, query_heads, q, d) over keys, values (1, kv_heads, S, d), whose last q slots are the new tokens;
    returns (1, query_heads, q, d)."""
    spec = layer.spec
    count, slots = query.shape[2], keys.shape[2]
    past = slots - count
    padding = layer.padding_free
    window = spec.window_tokens
    within_window = window is None or past + count <= window
    if count == 1 and within_window:
        return _decode(query, keys, values, spec, padding, scale)
    if padding is None and within_window and past == 0:
        return F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=True)
    if padding is None and window is None and past > 0 and flash_available(query):
        return _past_plus_causal(query, keys, values, spec, past, scale)
    # a masked call materialises (query_heads, q, S) scores on the CPU: queries go in blocks so that a long chunk
    # over a padded (compressed) cache does not hold gigabytes at once; each query's result is the same either way
    block = max(1, MASKED_SCORE_ELEMENTS // max(1, spec.query_heads * slots))
    outputs = []
    for start in range(0, count, block):
        mask = position_mask(layer.positions, query_positions[start:start + block], window)
        outputs.append(F.scaled_dot_product_attention(
            query[:, :, start:start + block], keys, values,
            attn_mask=mask.repeat_interleave(spec.group_size, dim=0).unsqueeze(0), scale=scale, enable_gqa=True))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def paged_decode(query: torch.Tensor, layer: PagedLayerCache, scale: float) -> torch.Tensor:
    """One query (1, query_heads, 1, d) over the pages it selects in a paged layer (``cache.paged``, Quest) and the
    layer's tail; the query heads sharing a KV head attend as a group of rows, so keys are never repeated."""
    spec = layer.spec
    keys, values, mask = layer.decode_tensors(query[0, :, 0])
    dim = query.shape[-1]
    grouped = query.reshape(1, spec.kv_heads, spec.group_size, dim)
    output = F.scaled_dot_product_attention(grouped, keys.unsqueeze(0), values.unsqueeze(0),
                                            attn_mask=None if mask is None else mask[None, :, None, :], scale=scale)
    return output.reshape(1, spec.query_heads, 1, dim)


def _decode(query, keys, values, spec: LayerSpec, padding: torch.Tensor | None, scale: float) -> torch.Tensor:
    """One query. Without padding this is exactly transformers' SDPA call (GQA inside the kernel), so a full cache
    decodes the same tokens as ``generate``; a padded layer lets the query heads sharing a KV head attend as a
    group of rows under the layer's padding mask, so keys are never repeated."""
    if padding is None:
        return F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=True)
    dim = query.shape[-1]
    grouped = query.reshape(1, spec.kv_heads, spec.group_size, dim)
    output = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=padding[None, :, None, :], scale=scale)
    return output.reshape(1, spec.query_heads, 1, dim)


def _past_plus_causal(query, keys, values, spec: LayerSpec, past: int, scale: float) -> torch.Tensor:
    """Attention over ``past`` unmasked slots and a causal new-by-new block, merged by log-sum-exp: no mask over
    the past is ever built."""
    _, heads, count, dim = query.shape
    group = spec.group_size
    grouped = query.reshape(1, spec.kv_heads, group * count, dim)
    past_out, past_lse = flash_with_lse(grouped, keys[:, :, :past], values[:, :, :past], causal=False, scale=scale)
    past_out = past_out.reshape(1, heads, count, dim)
    past_lse = past_lse.reshape(1, heads, count)
    new_keys = keys[:, :, past:].repeat_interleave(group, dim=1)
    new_values = values[:, :, past:].repeat_interleave(group, dim=1)
    new_out, new_lse = flash_with_lse(query, new_keys, new_values, causal=True, scale=scale)
    return merge_by_lse([(past_out, past_lse), (new_out, new_lse)]).to(query.dtype)


def position_mask(slot_positions: torch.Tensor, query_positions: torch.Tensor,
                  window_tokens: int | None) -> torch.Tensor:
    """(heads, q, K) bool: a query sees a slot whose position is not later than its own (and within the window)."""
    slots = slot_positions[:, None, :]
    queries = query_positions[None, :, None]
    allowed = (slots <= queries) & (slots != PADDING_POSITION)
    if window_tokens is not None:
        allowed &= queries - slots < window_tokens
    return allowed
