"""The only module that touches transformers' cache internals (transformers >= 5.20, < 5.30).

kvlab drives the model with a plain ``DynamicCache`` of one ``DynamicLayer`` per decoder layer, whatever the
layer kind, and trims sliding-window layers itself (see ``trim_sliding``): the masks come from our own position
bookkeeping (``engine.attention``), so transformers' sliding layer classes, which keep their own counters, are
not used. Tensors there are (1, kv_heads, slots, head_dim); ours drop the batch dimension.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from kvlab.cache.kvcache import KVCache, LayerCache


def to_hf_cache(cache: KVCache) -> DynamicCache:
    """A DynamicCache whose layers hold views of ``cache``'s tensors (no copy)."""
    hf_cache = DynamicCache()
    hf_cache.layers = []
    for layer in cache.layers:
        hf_layer = DynamicLayer()
        hf_layer.lazy_initialization(layer.keys, layer.values)
        hf_layer.keys = layer.keys.unsqueeze(0)
        hf_layer.values = layer.values.unsqueeze(0)
        hf_cache.layers.append(hf_layer)
    return hf_cache


def sync_from_hf(cache: KVCache, hf_cache: DynamicCache) -> None:
    """After a forward pass, point ``cache``'s layers at the grown tensors transformers appended to."""
    for layer, hf_layer in zip(cache.layers, hf_cache.layers):
        layer.keys = hf_layer.keys[0]
        layer.values = hf_layer.values[0]


def trim_sliding(cache: KVCache, hf_cache: DynamicCache) -> None:
    """Keep only the last ``window - 1`` slots of each sliding layer, in both containers."""
    for layer, hf_layer in zip(cache.layers, hf_cache.layers):
        keep = layer.spec.retained_tokens
        if keep is None or layer.positions.shape[-1] <= keep:
            continue
        layer.keys = layer.keys[:, -keep:]
        layer.values = layer.values[:, -keep:]
        layer.positions = layer.positions[:, -keep:]
        hf_layer.keys = layer.keys.unsqueeze(0)
        hf_layer.values = layer.values.unsqueeze(0)


def empty_layer(spec, dtype: torch.dtype, device: torch.device) -> LayerCache:
    return LayerCache(
        spec=spec,
        keys=torch.zeros((spec.kv_heads, 0, spec.head_dim), dtype=dtype, device=device),
        values=torch.zeros((spec.kv_heads, 0, spec.head_dim), dtype=dtype, device=device),
        positions=torch.zeros((spec.kv_heads, 0), dtype=torch.long, device=device),
    )


def cache_argument(model) -> str:
    """Name of the forward() keyword that takes the cache: ``cache`` from transformers 5.24, ``past_key_values``
    before (still accepted after, with a deprecation warning)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
