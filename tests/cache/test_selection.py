import torch

from kvlab.cache.kvcache import PADDING_POSITION, LayerCache
from kvlab.cache.layout import LayerSpec
from kvlab.cache.selection import eligible_scores, protection_mask, select_slots

HEADS, SLOTS, DIM = 3, 20, 4
SPEC = LayerSpec("full", kv_heads=HEADS, query_heads=HEADS, head_dim=DIM)


def make_layer(seed: int = 0, positions: torch.Tensor | None = None) -> LayerCache:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(HEADS, SLOTS, DIM, generator=generator)
    values = torch.randn(HEADS, SLOTS, DIM, generator=generator)
    if positions is None:
        positions = torch.arange(SLOTS).expand(HEADS, -1).clone()
    return LayerCache(SPEC, keys, values, positions)


def no_protection(positions: torch.Tensor) -> torch.Tensor:
    return torch.zeros(positions.shape, dtype=torch.bool)


def check_layout(result: LayerCache, source: LayerCache) -> None:
    """Per head: kept positions ascending, padding last, and keys/values gathered from the right source slots."""
    for head in range(HEADS):
        positions = result.positions[head]
        valid = positions != PADDING_POSITION
        count = int(valid.sum())
        assert bool(valid[:count].all()) and not bool(valid[count:].any()), "padding must come last"
        kept = positions[:count]
        assert torch.all(kept[1:] > kept[:-1]), "kept positions must be strictly ascending"
        for slot, position in enumerate(kept.tolist()):
            source_slot = int((source.positions[head] == position).nonzero()[0])
            assert torch.equal(result.keys[head, slot], source.keys[head, source_slot])
            assert torch.equal(result.values[head, slot], source.values[head, source_slot])


def test_select_keeps_counts_plus_always_kept():
    layer = make_layer()
    compressible = 16  # positions 16..19 are kept outside the budget
    scores = torch.randn(HEADS, SLOTS, generator=torch.Generator().manual_seed(1))
    ranked = eligible_scores(scores, layer.positions, no_protection(layer.positions), compressible)
    counts = torch.tensor([3, 5, 7])
    result = select_slots(layer, ranked, counts, compressible)

    assert result.kept_per_head.tolist() == [3 + 4, 5 + 4, 7 + 4]
    assert result.positions.shape == (HEADS, 11)
    check_layout(result, layer)
    for head in range(HEADS):
        kept = set(result.positions[head][result.positions[head] >= 0].tolist())
        best = scores[head, :compressible].topk(int(counts[head])).indices.tolist()
        assert kept == set(best) | {16, 17, 18, 19}
    # padding slots are zeroed
    assert not result.keys[0, 7:].any() and not result.values[0, 7:].any()


def test_protected_slots_win_and_are_counted_in_the_budget():
    layer = make_layer()
    protected = protection_mask(layer.positions, sink_tokens=2, recent_start=14, recent_end=16)
    assert protected[0].nonzero().flatten().tolist() == [0, 1, 14, 15]
    scores = torch.arange(SLOTS).float().expand(HEADS, -1)  # late slots score best: only protection keeps 0, 1
    ranked = eligible_scores(scores, layer.positions, protected, compressible_tokens=16)
    assert torch.isinf(ranked[:, 16:]).all() and (ranked[:, 16:] < 0).all()
    result = select_slots(layer, ranked, torch.tensor([6, 6, 6]), compressible_tokens=16)
    for head in range(HEADS):
        assert result.positions[head].tolist() == [0, 1, 12, 13, 14, 15, 16, 17, 18, 19]


def test_keep_everything_returns_the_input():
    layer = make_layer()
    scores = torch.randn(HEADS, SLOTS, generator=torch.Generator().manual_seed(2))
    ranked = eligible_scores(scores, layer.positions, no_protection(layer.positions), SLOTS)
    result = select_slots(layer, ranked, torch.full((HEADS,), SLOTS), SLOTS)
    assert torch.equal(result.keys, layer.keys)
    assert torch.equal(result.values, layer.values)
    assert torch.equal(result.positions, layer.positions)


def test_padding_in_the_input_is_never_kept():
    positions = torch.arange(SLOTS).expand(HEADS, -1).clone()
    positions[1, 12:] = PADDING_POSITION  # head 1 holds only 12 tokens
    layer = make_layer(positions=positions)
    scores = torch.randn(HEADS, SLOTS, generator=torch.Generator().manual_seed(3))
    ranked = eligible_scores(scores, layer.positions, no_protection(layer.positions), SLOTS)
    result = select_slots(layer, ranked, torch.tensor([15, 15, 15]), SLOTS)
    # head 1 cannot keep more than it holds, whatever the count says
    kept_head_1 = result.positions[1][result.positions[1] >= 0]
    assert set(kept_head_1.tolist()) <= set(range(12))
    assert int(result.kept_per_head[0]) == 15 and int(result.kept_per_head[2]) == 15
    check_layout(result, layer)
