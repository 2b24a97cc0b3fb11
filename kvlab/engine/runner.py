"""Feed tokens to the model on top of a KVCache, keeping our bookkeeping and transformers' cache in step."""

from __future__ import annotations

import torch

from kvlab.cache.hf import cache_argument, sync_from_hf, to_hf_cache, trim_sliding
from kvlab.cache.kvcache import KVCache
from kvlab.engine.attention import AttentionState, Observer, kvlab_attention


class ModelRunner:
    """Runs forward passes that append to ``cache``; tokens get positions ``cache.num_tokens`` onwards."""

    def __init__(self, model, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        self.hf_cache = to_hf_cache(cache)
        self.cache_argument = cache_argument(model)
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def feed(self, token_ids: torch.Tensor, *, observer: Observer | None = None,
             logits_to_keep: int = 1) -> torch.Tensor | None:
        """Append ``token_ids`` (1-D); return logits (logits_to_keep, vocab) as fp32, or None if 0 were asked."""
        count = int(token_ids.numel())
        positions = torch.arange(self.cache.num_tokens, self.cache.num_tokens + count, device=self.device)
        state = AttentionState(self.cache, positions, observer)
        with kvlab_attention(self.model, state):
            output = self.model(
                input_ids=token_ids.to(self.device).reshape(1, -1), position_ids=positions[None],
                use_cache=True, logits_to_keep=max(logits_to_keep, 1), **{self.cache_argument: self.hf_cache},
            )
        sync_from_hf(self.cache, self.hf_cache)
        trim_sliding(self.cache, self.hf_cache)
        self.cache.num_tokens += count
        return output.logits[0, -logits_to_keep:].float() if logits_to_keep else None
