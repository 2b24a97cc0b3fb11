"""The model's attention layout as data: one LayerSpec per decoder layer, built from any Hugging Face config.

Policies and budgets iterate over this list, so a hybrid model (Gemma 3: sliding-window and global layers) runs
through the same code as a model with only full-attention layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kvlab.errors import UnsupportedModelError

LayerKind = Literal["full", "sliding"]


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer's attention: ``window_tokens`` is the sliding window (None for full attention).

    ``rope_theta`` is the base of the layer's rotary embedding when it is standard RoPE over the whole head
    (HF's rotate-half layout, inverse frequencies theta^(-2i/head_dim)); None for scaled or partial RoPE and for
    configs that do not say. It describes the rotation, not the memory layout, so it takes no part in equality.
    """

    kind: LayerKind
    kv_heads: int
    query_heads: int
    head_dim: int
    window_tokens: int | None = None
    rope_theta: float | None = field(default=None, compare=False)

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (grouped-query attention)."""
        return self.query_heads // self.kv_heads

    @property
    def retained_tokens(self) -> int | None:
        """Tokens a sliding layer must keep for the next query: window - 1 (None: unbounded)."""
        return None if self.window_tokens is None else self.window_tokens - 1


def layout_from_config(config) -> list[LayerSpec]:
    """Build the layer list; raises UnsupportedModelError for layer kinds we cannot compress (e.g. linear attention)."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    num_layers = config.num_hidden_layers
    query_heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or query_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // query_heads
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        uses_window = window is not None and getattr(config, "use_sliding_window", True)
        layer_types = ["sliding_attention" if uses_window else "full_attention"] * num_layers

    specs = []
    for layer_type in layer_types[:num_layers]:
        theta = standard_rope_theta(config, layer_type)
        if layer_type == "full_attention":
            specs.append(LayerSpec("full", kv_heads, query_heads, head_dim, rope_theta=theta))
        elif layer_type == "sliding_attention":
            if window is None:
                raise UnsupportedModelError("the config has sliding-attention layers but no sliding_window size")
            specs.append(LayerSpec("sliding", kv_heads, query_heads, head_dim, window_tokens=int(window),
                                   rope_theta=theta))
        else:
            raise UnsupportedModelError(
                f"layer type {layer_type!r} is not supported; kvlab handles full and sliding-window attention layers"
            )
    return specs


def standard_rope_theta(config, layer_type: str) -> float | None:
    """The RoPE base of ``layer_type`` layers (``config.rope_parameters``, per layer type where the model has
    several, as Gemma 3's local and global bases), or None unless it is plain RoPE over the whole head."""
    parameters = getattr(config, "rope_parameters", None)
    if isinstance(parameters, dict) and isinstance(parameters.get(layer_type), dict):
        parameters = parameters[layer_type]
    if not isinstance(parameters, dict) or parameters.get("rope_theta") is None:
        return None
    partial = parameters.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if parameters.get("rope_type", "default") != "default" or partial not in (None, 1, 1.0):
        return None
    return float(parameters["rope_theta"])
