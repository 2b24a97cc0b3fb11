import pytest
import torch

from kvlab.cache.kvcache import PADDING_POSITION, KVCache, LayerCache, pack_heads
from kvlab.cache.layout import LayerSpec
from kvlab.engine import Engine
from kvlab.engine.runner import ModelRunner
from kvlab.policies import make_policy


def random_ids(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (count,), generator=torch.Generator().manual_seed(seed))


def expected_live_bytes(cache: KVCache) -> int:
    total = 0
    for layer in cache.layers:
        valid_slots = int((layer.positions != PADDING_POSITION).sum())
        total += valid_slots * layer.keys.shape[-1] * 2 * layer.keys.element_size()
    return total


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gemma3"])
def test_byte_accounting_after_prefill(model_name, request):
    loaded = request.getfixturevalue(model_name)
    cache = Engine(loaded).prefill(random_ids(120)).cache
    assert cache.num_tokens == 120
    assert cache.live_bytes == expected_live_bytes(cache)
    assert cache.held_bytes == sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert cache.allocated_bytes >= cache.held_bytes  # spare capacity for appends
    assert cache.live_bytes == cache.held_bytes  # no padding after a prefill
    assert cache.full_bytes() == cache.live_bytes
    assert not any(layer.is_ragged for layer in cache.layers)


def test_full_layer_bytes_closed_form(tiny_llama):
    """2 layers x 3 KV heads x 16 dims x (key + value) x 4 bytes (fp32) per token."""
    cache = Engine(tiny_llama).prefill(random_ids(50)).cache
    assert cache.live_bytes == 50 * 2 * 3 * 16 * 2 * 4
    assert cache.kept_tokens() == 50.0


def test_ragged_cache_bytes(tiny_llama):
    engine = Engine(tiny_llama)
    result = engine.prefill(random_ids(200), make_policy("adakv").observation_request())
    cache, budget, _ = engine.compress(result, make_policy("adakv"), ratio=0.5)
    assert any(layer.is_ragged for layer in cache.layers)
    assert cache.live_bytes < cache.held_bytes
    assert cache.live_bytes == expected_live_bytes(cache)
    assert cache.held_bytes == sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    # the budget is spent: budget tokens per head on average, and full_bytes still describes the uncompressed run
    assert cache.live_bytes == budget * 2 * 3 * 16 * 2 * 4
    assert cache.full_bytes() == result.cache.live_bytes
    assert cache.kept_tokens() == pytest.approx(budget)


def test_sliding_layers_hold_the_window(tiny_gemma3):
    cache = Engine(tiny_gemma3, chunk_tokens=32).prefill(random_ids(100)).cache
    for layer in cache.layers:
        if layer.spec.kind == "sliding":
            assert layer.keys.shape == (1, 15, 32)
            assert layer.positions.tolist() == [list(range(85, 100))]
        else:
            assert layer.positions.tolist() == [list(range(100))]
    # full_bytes counts the window (15 tokens) for sliding layers and every token for full ones
    assert cache.full_bytes() == (15 + 100 + 15 + 100) * 32 * 2 * 4


def test_clone_is_independent(tiny_gemma3):
    cache = Engine(tiny_gemma3).prefill(random_ids(40)).cache
    clone = cache.clone()
    ModelRunner(tiny_gemma3.model, clone).feed(random_ids(5, seed=1))
    assert clone.num_tokens == 45 and cache.num_tokens == 40
    assert cache.layers[1].positions.shape[-1] == 40
    assert cache.layers[0].positions.tolist() == [list(range(25, 40))]
    assert clone.layers[0].positions.tolist() == [list(range(30, 45))]


def test_pack_heads_pads_last():
    spec = LayerSpec("full", kv_heads=2, query_heads=2, head_dim=3)
    keys = [torch.ones(4, 3), 2 * torch.ones(2, 3)]
    values = [3 * torch.ones(4, 3), 4 * torch.ones(2, 3)]
    positions = [torch.tensor([0, 2, 5, 7]), torch.tensor([1, 6])]
    layer = pack_heads(spec, keys, values, positions)
    assert layer.positions.tolist() == [[0, 2, 5, 7], [1, 6, -1, -1]]
    assert layer.kept_per_head.tolist() == [4, 2]
    assert layer.is_ragged
    assert torch.equal(layer.keys[1, :2], keys[1]) and torch.equal(layer.values[0], values[0])
    assert layer.live_bytes == 6 * 3 * 2 * 4
    assert layer.held_bytes == layer.allocated_bytes == 8 * 3 * 2 * 4
    assert isinstance(layer, LayerCache)
