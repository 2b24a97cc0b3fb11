"""The decode fast path: one new token through a Llama-architecture model without transformers' forward plumbing.

A decode step through ``model(...)`` spends about as long in per-call machinery (output capture, kwargs merging,
mask preparation, per-layer wrappers) as in the attention it computes. For one token this module runs the same
submodules in the same order as ``LlamaDecoderLayer`` (the norms, the q/k/v/o projections, the model's own rotary
embedding and ``apply_rotary_pos_emb``, the MLP, the final norm and the LM head), writes the new key and value
into the kvlab cache (``LayerCache.append``) and attends with kvlab's decode attention (``engine.attention``). It
computes the same operations on the same tensors, so its logits equal a full forward's bit for bit; tests hold it
to that on the tiny Llama and on SmolLM2.

It is used only where that holds by construction: model types whose decoder layer is Llama's (``SUPPORTED``),
with no extra projections or norms (no q/k norms, no sandwich norms, no attention or MLP bias hooks beyond the
Linear modules). Everything else, and every step with more than one token or with an observer, takes the full
forward. Replaced Linear modules (``--weights int8``) are called like the originals, so they work here too.
"""

from __future__ import annotations

import sys

import torch

from kvlab.cache.kvcache import KVCache
from kvlab.cache.paged import PagedLayerCache
from kvlab.engine.attention import attend, paged_decode

SUPPORTED = ("llama",)  # model types whose equality with the full forward is tested
_LAYER_PARTS = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


class FastDecoder:
    """Decode steps for one model; ``FastDecoder.for_model`` returns None where the fast path does not apply."""

    def __init__(self, model) -> None:
        self.model = model
        self.body = model.model
        self.layers = list(self.body.layers[: model.config.num_hidden_layers])
        attention = self.layers[0].self_attn
        self.rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling

    @classmethod
    def for_model(cls, model) -> FastDecoder | None:
        cached = model.__dict__.get("_kvlab_fast_decoder", False)
        if cached is not False:
            return cached
        decoder = cls(model) if _supported(model) else None
        model.__dict__["_kvlab_fast_decoder"] = decoder
        return decoder

    @torch.inference_mode()
    def step(self, token: torch.Tensor, cache: KVCache, position: torch.Tensor) -> torch.Tensor:
        """Feed one token (a 1-element long tensor) at ``position`` ((1,) int64); returns its logits (vocab,) fp32.
        The cache's ``num_tokens`` and settling are the caller's (``ModelRunner.feed``)."""
        return self.step_rows(token.reshape(1), [cache], position.reshape(1))[0]

    @torch.inference_mode()
    def step_rows(self, tokens: torch.Tensor, caches: list[KVCache], positions: torch.Tensor) -> torch.Tensor:
        """One token for each of B independent sequences: ``tokens`` (B,) long, ``caches`` one per row,
        ``positions`` (B,) int64; returns logits (B, vocab) fp32. The rows share every weight read (the linear
        layers run once on B rows) and attend each to its own cache. With B > 1 the matrix products run on B rows
        at once, so the last bits of a row's logits can differ from a one-row step."""
        rows = int(tokens.numel())
        hidden = self.body.embed_tokens(tokens.reshape(1, rows))
        cos, sin = self.body.rotary_emb(hidden, positions.reshape(1, rows))
        for index, layer in enumerate(self.layers):
            residual = hidden
            hidden = layer.input_layernorm(hidden)
            hidden = residual + self._attention(layer.self_attn, hidden, cos, sin, caches, index, positions)
            residual = hidden
            hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = self.body.norm(hidden)
        return self.model.lm_head(hidden)[0].float()

    def _attention(self, attention, hidden, cos, sin, caches: list[KVCache], index: int, positions) -> torch.Tensor:
        rows = hidden.shape[1]
        shape = (1, rows, -1, self.head_dim)
        query = attention.q_proj(hidden).view(shape).transpose(1, 2)
        key = attention.k_proj(hidden).view(shape).transpose(1, 2)
        value = attention.v_proj(hidden).view(shape).transpose(1, 2)
        query, key = self.rotate(query, key, cos, sin)
        outputs = []
        for row, cache in enumerate(caches):
            layer = cache.layers[index]
            position = positions[row:row + 1]
            layer.append(key[0, :, row:row + 1], value[0, :, row:row + 1], position)
            if isinstance(layer, PagedLayerCache):
                outputs.append(paged_decode(query[:, :, row:row + 1], layer, self.scaling))
                continue
            keys, values = layer.attention_tensors()
            outputs.append(attend(query[:, :, row:row + 1], keys.unsqueeze(0), values.unsqueeze(0), layer, position,
                                  self.scaling))
        output = outputs[0] if rows == 1 else torch.cat(outputs, dim=2)
        return attention.o_proj(output.transpose(1, 2).reshape(1, rows, -1))


def _supported(model) -> bool:
    config = model.config
    body = getattr(model, "model", None)
    if getattr(config, "model_type", None) not in SUPPORTED or body is None:
        return False
    if not all(hasattr(body, part) for part in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    if getattr(config, "rope_parameters", {}).get("rope_type", "default") not in ("default", "linear", "llama3"):
        return False  # dynamic RoPE variants update their frequencies inside forward()
    for layer in body.layers:
        if type(layer).__name__ != "LlamaDecoderLayer":
            return False
        if not all(hasattr(layer, part) for part in _LAYER_PARTS):
            return False
        if not all(hasattr(layer.self_attn, part) for part in _ATTENTION_PARTS):
            return False
    return True


__all__ = ["FastDecoder", "SUPPORTED"]
