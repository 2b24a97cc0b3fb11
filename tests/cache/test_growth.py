"""Layers grow in place with spare capacity, and forks share storage without ever seeing each other's appends."""

import torch

from kvlab.cache.kvcache import LayerCache
from kvlab.cache.layout import LayerSpec

SPEC = LayerSpec("full", kv_heads=2, query_heads=2, head_dim=4)


def layer_of(count: int, start: float = 0.0) -> LayerCache:
    keys = start + torch.arange(2 * count * 4, dtype=torch.float32).reshape(2, count, 4)
    return LayerCache(SPEC, keys, -keys, torch.arange(count).expand(2, count).contiguous())


def append(layer: LayerCache, position: int, value: float) -> None:
    block = torch.full((2, 1, 4), value)
    layer.append(block, -block, torch.tensor([position]))


def test_appends_reuse_capacity():
    layer = layer_of(3)
    append(layer, 3, 7.0)
    storage = layer.keys.untyped_storage().data_ptr()
    for position in range(4, 20):
        append(layer, position, float(position))
    assert layer.keys.untyped_storage().data_ptr() == storage  # grown once, then in place
    assert layer.positions[0].tolist() == list(range(20))
    assert layer.allocated_bytes > layer.held_bytes == 20 * 2 * 4 * 2 * 4


def test_forks_copy_only_on_a_conflicting_write():
    parent = layer_of(3)
    append(parent, 3, 1.0)
    child = parent.fork()
    append(child, 4, 2.0)  # the child writes past the shared end first: in place
    append(parent, 4, 3.0)  # the parent can no longer: it copies
    assert child.keys[0, -1].tolist() == [2.0] * 4 and parent.keys[0, -1].tolist() == [3.0] * 4
    assert child.slots == parent.slots == 5
    sibling = parent.fork()
    append(sibling, 5, 4.0)
    assert parent.slots == 5 and sibling.slots == 6


def test_sliding_layers_drop_old_slots_without_copying():
    spec = LayerSpec("sliding", kv_heads=1, query_heads=1, head_dim=4, window_tokens=4)
    layer = LayerCache(spec, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), torch.arange(2)[None])
    for position in range(2, 12):
        block = torch.full((1, 1, 4), float(position))
        layer.append(block, block, torch.tensor([position]))
        layer.settle()
        assert layer.slots <= 3
    assert layer.positions.tolist() == [[9, 10, 11]]
    assert layer.keys[0, :, 0].tolist() == [9.0, 10.0, 11.0]


def test_refill_writes_into_the_layers_own_buffer_and_then_appends_in_place():
    layer = layer_of(3)
    for position in range(3, 10):
        append(layer, position, float(position))
    storage = layer.keys.untyped_storage().data_ptr()
    ragged = LayerCache(SPEC, torch.ones(2, 4, 4), -torch.ones(2, 4, 4), torch.tensor([[0, 2, 5, 7], [1, 4, 6, -1]]))
    assert layer.refill(ragged)
    assert layer.keys.untyped_storage().data_ptr() == storage
    assert torch.equal(layer.keys, ragged.keys) and torch.equal(layer.positions, ragged.positions)
    assert layer.padding_free is not None and layer.padding_free.tolist() == [[True] * 4, [True] * 3 + [False]]
    append(layer, 10, 5.0)
    assert layer.keys.untyped_storage().data_ptr() == storage and layer.slots == 5
    assert layer.positions[1].tolist() == [1, 4, 6, -1, 10] and bool(layer.padding_free[1, 4])
    assert not layer_of(2).refill(layer_of(40))  # no room: nothing changes
