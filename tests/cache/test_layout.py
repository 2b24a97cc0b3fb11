import copy
from types import SimpleNamespace

import pytest

from kvlab.cache.layout import LayerSpec, layout_from_config
from kvlab.errors import UnsupportedModelError


def test_tiny_llama_layout(tiny_llama):
    layout = layout_from_config(tiny_llama.model.config)
    assert len(layout) == 2
    for spec in layout:
        assert spec == LayerSpec("full", kv_heads=3, query_heads=6, head_dim=16, window_tokens=None)
        assert spec.group_size == 2
        assert spec.retained_tokens is None


def test_tiny_gemma3_layout(tiny_gemma3):
    layout = layout_from_config(tiny_gemma3.model.config)
    assert [spec.kind for spec in layout] == ["sliding", "full", "sliding", "full"]
    for spec in layout:
        assert (spec.kv_heads, spec.query_heads, spec.head_dim, spec.group_size) == (1, 2, 32, 2)
        if spec.kind == "sliding":
            assert spec.window_tokens == 16
            assert spec.retained_tokens == 15
        else:
            assert spec.window_tokens is None
            assert spec.retained_tokens is None


def test_layout_matches_model_key_shapes(tiny_gemma3, tiny_llama):
    """The layout agrees with what the attention modules actually produce."""
    for loaded in (tiny_llama, tiny_gemma3):
        layout = layout_from_config(loaded.model.config)
        for spec, layer in zip(layout, loaded.model.model.layers):
            attention = layer.self_attn
            assert attention.k_proj.out_features == spec.kv_heads * spec.head_dim
            assert attention.q_proj.out_features == spec.query_heads * spec.head_dim


def test_config_without_layer_types():
    """Configs with no ``layer_types`` list: defaults for kv heads and head dim; the window only when enabled."""
    config = SimpleNamespace(num_hidden_layers=3, num_attention_heads=4, hidden_size=64, sliding_window=8,
                             use_sliding_window=False)
    assert layout_from_config(config) == [LayerSpec("full", 4, 4, 16)] * 3
    config.use_sliding_window = True
    config.num_key_value_heads = 2
    assert layout_from_config(config) == [LayerSpec("sliding", 2, 4, 16, window_tokens=8)] * 3


def test_unsupported_layer_type_raises(tiny_gemma3):
    config = copy.deepcopy(tiny_gemma3.model.config)
    config.layer_types = ["sliding_attention", "linear_attention", "sliding_attention", "full_attention"]
    with pytest.raises(UnsupportedModelError, match="linear_attention"):
        layout_from_config(config)
