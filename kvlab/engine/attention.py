"""kvlab's attention function, registered in transformers' AttentionInterface under the name ``kvlab``.

Why our own: after eviction the kept keys no longer sit at the physical index transformers would infer from the
cache length, heads of one layer may keep different tokens, and layers may keep different counts. The function
builds each layer's mask from the original positions stored in our KVCache (causal by position, sliding window by
position, padding slots masked per head) and then calls PyTorch's scaled_dot_product_attention. It also hands the
rotated queries to an observer during prefill, which is how policies see attention without a model-specific hook.

The model is switched to this implementation only inside ``kvlab_attention(model, state)``, which restores the
previous implementation in ``finally``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvlab.cache.kvcache import KVCache, PADDING_POSITION
from kvlab.cache.layout import LayerSpec
from kvlab.errors import UnsupportedModelError

IMPLEMENTATION_NAME = "kvlab"

# observer(layer_index, spec, queries (query_heads, q, d), keys (kv_heads, K, d), slot_positions (kv_heads, K),
#          query_positions (q,), scaling)
Observer = Callable[[int, LayerSpec, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], None]


@dataclass
class AttentionState:
    cache: KVCache
    query_positions: torch.Tensor  # (q,) int64, positions of the tokens in the current forward pass
    observer: Observer | None = None


_ACTIVE: ContextVar[AttentionState | None] = ContextVar("kvlab_attention_state", default=None)


def position_mask(slot_positions: torch.Tensor, query_positions: torch.Tensor,
                  window_tokens: int | None) -> torch.Tensor:
    """(heads, q, K) bool: a query sees a slot whose position is not later than its own (and within the window)."""
    slots = slot_positions[:, None, :]
    queries = query_positions[None, :, None]
    allowed = (slots <= queries) & (slots != PADDING_POSITION)
    if window_tokens is not None:
        allowed &= queries - slots < window_tokens
    return allowed


def kvlab_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    state = _ACTIVE.get()
    if state is None:
        raise RuntimeError("the kvlab attention implementation runs only inside kvlab.engine calls")
    if kwargs.get("softcap") is not None:
        raise UnsupportedModelError("attention logit soft-capping (Gemma 2) is not supported by kvlab")
    layer = state.cache.layers[module.layer_idx]
    spec = layer.spec
    query_count = query.shape[2]
    new_slots = state.query_positions.expand(layer.positions.shape[0], query_count)
    slot_positions = torch.cat([layer.positions, new_slots], dim=-1)
    if slot_positions.shape[-1] != key.shape[2]:
        raise RuntimeError(f"layer {module.layer_idx}: cache holds {key.shape[2]} slots, bookkeeping {slot_positions.shape[-1]}")
    layer.positions = slot_positions
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if state.observer is not None:
        state.observer(module.layer_idx, spec, query[0], key[0], slot_positions, state.query_positions, scale)

    plain_causal = slot_positions.shape[-1] == query_count and (
        spec.window_tokens is None or spec.window_tokens >= query_count)
    if plain_causal:  # the first chunk of a prefill: contiguous positions, the fast path
        output = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)
    else:
        # After per-head selection heads may hold different positions; one shared mask is enough when they do not.
        uniform = bool((slot_positions == slot_positions[:1]).all())
        mask = position_mask(slot_positions[:1] if uniform else slot_positions, state.query_positions,
                             spec.window_tokens)
        if not uniform:
            mask = mask.repeat_interleave(spec.group_size, dim=0)
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.unsqueeze(0), scale=scale,
                                                enable_gqa=True)
    return output.transpose(1, 2).contiguous(), None


@contextmanager
def kvlab_attention(model, state: AttentionState) -> Iterator[AttentionState]:
    """Route ``model``'s attention through kvlab for the duration of the block."""
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION_NAME, kvlab_attention_forward)
    previous = model.config._attn_implementation
    token = _ACTIVE.set(state)
    try:
        if previous != IMPLEMENTATION_NAME:
            model.set_attn_implementation(IMPLEMENTATION_NAME)
        yield state
    finally:
        _ACTIVE.reset(token)
        if previous != IMPLEMENTATION_NAME:
            model.set_attn_implementation(previous)
