"""The only module that touches transformers' cache internals (transformers >= 5.20, < 5.30).

``HFCacheView`` puts a kvlab ``KVCache`` behind transformers' Cache protocol, so the model's attention layers write
into kvlab's storage directly: ``update`` appends the new keys and values, with their original positions, to the
kvlab layer (``LayerCache.append``) and hands attention the layer's slots. There is no second container and no
copy. The positions of a forward pass are set with ``begin`` before it runs.

Transformers builds no cross-slot mask for this cache (``get_mask_sizes`` reports only the new tokens): kvlab's
attention function (``engine.attention``) knows each layer's positions and padding itself. Tensors there are
(1, kv_heads, slots, head_dim); ours drop the batch dimension.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvlab.cache.kvcache import KVCache, LayerCache
from kvlab.cache.paged import PagedLayerCache


class _LayerView(CacheLayerMixin):
    """One decoder layer's side of the view (transformers asks layers for sizes and sliding flags)."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, owner: HFCacheView, index: int) -> None:
        super().__init__()
        self.owner = owner
        self.index = index
        self.is_sliding = owner.cache.layers[index].spec.kind == "sliding"
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.owner.update(key_states, value_states, self.index)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.cache.num_tokens

    def get_max_length(self) -> int:
        return -1


class HFCacheView(Cache):
    """A transformers Cache whose storage is ``cache``; ``begin(positions)`` before each forward."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.positions: torch.Tensor | None = None
        super().__init__(layers=[_LayerView(self, index) for index in range(len(cache.layers))])

    def begin(self, positions: torch.Tensor) -> None:
        """The original positions, (n,) int64, of the tokens the next forward pass appends."""
        self.positions = positions

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.positions is None:
            raise RuntimeError("HFCacheView.update before begin(): the runner sets the new tokens' positions")
        layer: LayerCache = self.cache.layers[layer_idx]
        layer.append(key_states[0], value_states[0], self.positions)
        if key_states.shape[2] == 1 and isinstance(layer, PagedLayerCache):
            # a paged layer's decode step reads only the pages its query selects (engine.attention); handing
            # attention every slot here would read (and dequantize) the whole layer for nothing
            return key_states, value_states
        keys, values = layer.attention_tensors()
        return keys.unsqueeze(0), values.unsqueeze(0)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cache.num_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0


def cache_argument(model) -> str:
    """Name of the forward() keyword that takes the cache: ``cache`` from transformers 5.24, ``past_key_values``
    before (still accepted after, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
