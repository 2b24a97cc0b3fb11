"""Quest's paged layer (``cache.paged``) against computations written out here: page bounds are true upper bounds,
the selection is sinks + recent + the highest bounds, a decode step reads exactly the selected pages' slots (plain
and int4), and attention over them equals masked full attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvlab.cache.kvcache import PADDING_POSITION, LayerCache
from kvlab.cache.layout import LayerSpec
from kvlab.cache.paged import GroupedQuery, PagedLayerCache
from kvlab.cache.quant import QuantizationParams
from kvlab.cache.quantized import QuantizedLayerCache
from kvlab.cache.rope import rotate_by
from kvlab.engine.attention import paged_decode
from kvlab.errors import ParameterError

SPEC = LayerSpec("full", 2, 6, 16)
PAGE = 8


def plain_layer(slots: int = 96, seed: int = 0, padding: bool = False) -> LayerCache:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, slots, 16, generator=generator) * torch.linspace(0.2, 3.0, 16)  # outlier channels
    values = torch.randn(2, slots, 16, generator=generator)
    positions = torch.arange(slots).repeat(2, 1)
    if padding:
        positions[1, -5:] = PADDING_POSITION
    return LayerCache(SPEC, keys, values, positions)


def paged(layer: LayerCache, read_tokens: int, sinks: int = 4, recent: int = 8) -> PagedLayerCache:
    return PagedLayerCache(layer, page_tokens=PAGE, read_tokens=read_tokens, sink_tokens=sinks, recent_tokens=recent)


def brute_bounds(layer: LayerCache, query: torch.Tensor) -> torch.Tensor:
    """max over a page's keys and over the group's query heads of q . k: the quantity the bound must cover."""
    pages = layer.slots // PAGE
    keys = layer.keys[:, :pages * PAGE].reshape(2, pages, PAGE, 16)
    grouped = query.reshape(2, 3, 16)
    return torch.einsum("hgd,hpsd->hgps", grouped, keys).amax(dim=(1, 3))


def test_page_bounds_cover_every_key_and_are_tight_for_single_key_pages():
    layer = plain_layer()
    query = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    pages = paged(layer, read_tokens=32)
    assert (pages.page_bounds(query) >= brute_bounds(layer, query) - 1e-4).all()
    single = PagedLayerCache(layer, page_tokens=1, read_tokens=32, sink_tokens=0, recent_tokens=0)
    exact = torch.einsum("hgd,hsd->hgs", query.reshape(2, 3, 16), layer.keys).amax(dim=1)
    torch.testing.assert_close(single.page_bounds(query), exact)


def test_selection_is_sinks_recent_and_the_highest_bounds_within_the_budget():
    layer = plain_layer()  # 12 pages of 8
    query = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    pages = paged(layer, read_tokens=40, sinks=4, recent=8)  # 5 pages: first, last, 3 best of the other 10
    chosen = pages.select_pages(query)
    assert chosen.shape == (2, 5)
    # the reference: min/max per page written out, bounds per query head, max over the group
    keys = layer.keys.reshape(2, 12, PAGE, 16)
    low, high = keys.amin(dim=2), keys.amax(dim=2)
    grouped = query.reshape(2, 3, 1, 16)
    bounds = torch.maximum(grouped * low[:, None], grouped * high[:, None]).sum(-1).amax(dim=1)
    for head in range(2):
        middle = bounds[head, 1:11].topk(3).indices + 1
        assert sorted(chosen[head].tolist()) == sorted([0, 11, *middle.tolist()])


def test_a_budget_covering_the_layer_reads_every_slot_in_order():
    layer = plain_layer(slots=100)  # 12 whole pages and 4 slots that fill none
    pages = paged(layer, read_tokens=100)
    keys, values, mask = pages.decode_tensors(torch.randn(6, 16))
    assert torch.equal(keys, layer.keys) and torch.equal(values, layer.values) and mask is None


def test_decode_attention_equals_masked_full_attention_over_the_selected_pages():
    layer = plain_layer(slots=100, padding=True)
    pages = paged(layer, read_tokens=40)
    pages.append(torch.randn(2, 3, 16), torch.randn(2, 3, 16), torch.tensor([100, 101, 102]))
    query = torch.randn(1, 6, 1, 16, generator=torch.Generator().manual_seed(3))
    chosen = pages.select_pages(query[0, :, 0])
    allowed = torch.zeros(2, 103, dtype=torch.bool)
    for head in range(2):
        for page in chosen[head].tolist():
            allowed[head, page * PAGE:(page + 1) * PAGE] = True
    allowed[:, 96:] = True  # the slots that fill no page and the new ones are always read
    allowed &= pages.positions != PADDING_POSITION
    expected = F.scaled_dot_product_attention(
        query.reshape(1, 2, 3, 16), pages.keys[None], pages.values[None], attn_mask=allowed[None, :, None, :],
        scale=0.25).reshape(1, 6, 1, 16)
    torch.testing.assert_close(paged_decode(query, pages, 0.25), expected)


def test_int4_pages_dequantize_only_the_selected_groups_and_equal_the_dense_rows():
    params = QuantizationParams("int4", group_size=PAGE, residual_tokens=8)
    quantized = QuantizedLayerCache.from_layer(plain_layer(slots=100), params)
    pages = paged(quantized, read_tokens=40)
    assert pages.pages == quantized.code_slots // PAGE
    torch.testing.assert_close(pages.page_min, quantized.codes["key_zeros"].float())
    query = torch.randn(6, 16, generator=torch.Generator().manual_seed(4))
    chosen = pages.select_pages(query)
    keys, values, mask = pages.decode_tensors(query)
    dense = quantized.dense()
    for head in range(2):
        rows = torch.cat([torch.arange(page * PAGE, (page + 1) * PAGE) for page in chosen[head].tolist()]
                         + [torch.arange(quantized.code_slots, quantized.slots)])
        torch.testing.assert_close(keys[head], dense.keys[head, rows])
        torch.testing.assert_close(values[head], dense.values[head, rows])
    assert mask is None
    fewer = paged(quantized, read_tokens=24)
    # 12 residual slots are read at every step; the sink and recent pages are read whatever the budget
    assert fewer.read_pages() == 2 < pages.read_pages() == 3
    assert fewer.decode_read_bytes() < pages.decode_read_bytes() < pages.held_bytes


def test_int4_pages_without_a_residual_mask_the_missing_rows_of_the_last_group():
    """100 tokens in pages of 8, no residual: the 13th group holds 4 tokens and 4 padding rows, which every read
    of that page must mask."""
    quantized = QuantizedLayerCache.from_layer(plain_layer(slots=100), QuantizationParams("int4", group_size=PAGE,
                                                                                         residual_tokens=0,
                                                                                         quantize_tail=True))
    assert quantized.code_slots == 104 and quantized.residual.slots == 0
    pages = paged(quantized, read_tokens=200)
    query = torch.randn(6, 16, generator=torch.Generator().manual_seed(5))
    chosen = pages.select_pages(query)
    assert chosen.shape[1] == 13
    keys, values, mask = pages.decode_tensors(query)
    assert mask is not None and mask.sum(dim=1).tolist() == [100, 100]
    dense = quantized.dense()
    for head in range(2):
        rows = torch.cat([torch.arange(page * PAGE, (page + 1) * PAGE) for page in chosen[head].tolist()])
        real = dense.positions[head, rows] != PADDING_POSITION
        assert torch.equal(mask[head], real)
        torch.testing.assert_close(keys[head][mask[head]], dense.keys[head, rows][real])
        torch.testing.assert_close(values[head][mask[head]], dense.values[head, rows][real])


def test_follow_pages_rank_the_page_after_what_the_question_attended_to_with_it():
    """follow_pages=1: a page ranks by the most mass of itself and the page before, so the page after the one the
    question attended to most comes with it (an answer follows the key; a page boundary may cut it)."""
    layer = plain_layer()  # 12 pages of 8
    queries = torch.randn(6, 5, 16, generator=torch.Generator().manual_seed(7))
    weights = torch.softmax(torch.einsum("hqd,hsd->hqs", queries.reshape(2, 15, 16), layer.keys) * 0.25, dim=-1)
    mass = weights.sum(dim=1).reshape(2, 12, PAGE).sum(dim=-1)
    pooled = torch.maximum(mass, torch.cat([torch.zeros(2, 1), mass[:, :-1]], dim=1))
    pages = PagedLayerCache(layer, page_tokens=PAGE, read_tokens=48, sink_tokens=4, recent_tokens=8,
                            question_share=0.5, follow_pages=1)
    pages.observe_question(queries, 0.25)
    assert pages.question_pages is not None
    for head in range(2):
        chosen = set(pages.question_pages[head].tolist())
        assert len(chosen) == 3
        assert all(float(pooled[head, page]) >= float(pooled[head].topk(3).values[-1]) - 1e-6 for page in chosen)
        top = int(mass[head, :11].argmax())
        assert {top, top + 1} <= chosen
    assert pages.clone().follow_pages == 1


def test_pages_must_be_the_quantization_groups():
    quantized = QuantizedLayerCache.from_layer(plain_layer(), QuantizationParams("int4"))
    with pytest.raises(ParameterError, match="--kv-quant int4:g8"):
        paged(quantized, read_tokens=32)


def test_forks_keep_their_own_new_tokens_and_the_base_is_never_written():
    base = plain_layer()
    before = base.keys.clone()
    pages = paged(base, read_tokens=32)
    first, second = pages.fork(), pages.fork()
    first.append(torch.ones(2, 2, 16), torch.ones(2, 2, 16), torch.tensor([96, 97]))
    second.append(torch.zeros(2, 1, 16), torch.zeros(2, 1, 16), torch.tensor([96]))
    assert (first.slots, second.slots, pages.slots) == (98, 97, 96)
    assert torch.equal(first.keys[:, 96:], torch.ones(2, 2, 16)) and torch.equal(base.keys, before)
    assert first.dense().slots == 98 and torch.equal(first.dense().positions[0, -2:], torch.tensor([96, 97]))


def test_the_question_chooses_pages_by_its_attention_mass_and_they_are_read_at_every_step():
    layer = plain_layer()  # 12 pages of 8
    pages = PagedLayerCache(layer, page_tokens=PAGE, read_tokens=48, sink_tokens=4, recent_tokens=8,
                            question_share=0.5)  # 6 pages a step: sink, recent, 3 of the question's, 1 by bound
    queries = torch.randn(6, 5, 16, generator=torch.Generator().manual_seed(5))
    pages.observe_question(queries, 0.25)
    # the reference: each query head's softmax over all slots, summed over the queries and the group, per page
    weights = torch.softmax(torch.einsum("hqd,hsd->hqs", queries.reshape(2, 15, 16), layer.keys) * 0.25, dim=-1)
    mass = weights.sum(dim=1).reshape(2, 12, PAGE).sum(dim=-1)
    assert pages.question_pages is not None
    for head in range(2):
        assert sorted(pages.question_pages[head].tolist()) == sorted(mass[head].topk(3).indices.tolist())
    query = torch.randn(6, 16)
    chosen = pages.select_pages(query)
    for head in range(2):
        assert set(pages.question_pages[head].tolist()) | {0, 11} <= set(chosen[head].tolist())
    assert chosen.shape == (2, 6)
    copy = pages.clone()  # a copy reads the same pages
    assert torch.equal(copy.select_pages(query).sort(dim=1).values, chosen.sort(dim=1).values)
    published = paged(layer, read_tokens=48)  # question_share 0: Quest as published, bounds alone
    published.observe_question(queries, 0.25)
    assert published.question_pages is None


ROPE_SPEC = LayerSpec("full", 2, 6, 16, rope_theta=10000.0)


def rope_layer(slots: int, padding: bool = False) -> LayerCache:
    layer = plain_layer(slots=slots, seed=6, padding=padding)
    return LayerCache(ROPE_SPEC, layer.keys, layer.values, layer.positions)


def self_extend_scores(layer: LayerCache, query: torch.Tensor, grouped: GroupedQuery) -> torch.Tensor:
    """(kv_heads, slots): each slot's score as Self-Extend takes it, the largest over the group's query heads:
    the plain query on the key where it is for a neighbour, the grouped query on the key moved to p // group for a
    slot ``window`` or more positions back; padding slots score -inf."""
    positions = layer.positions
    real = positions != PADDING_POSITION
    safe = torch.where(real, positions, 0)
    moved = rotate_by(layer.keys, safe // grouped.group - safe, 10000.0)
    near = torch.einsum("hgd,hsd->hgs", query.reshape(2, 3, 16), layer.keys)
    far = torch.einsum("hgd,hsd->hgs", grouped.query.reshape(2, 3, 16), moved)
    scores = torch.where((grouped.position - positions < grouped.window)[:, None], near, far).amax(dim=1)
    return scores.masked_fill(~real, -torch.inf)


@pytest.mark.parametrize("quantized", [False, True], ids=["plain", "int4"])
def test_grouped_page_bounds_cover_every_slots_self_extend_score(quantized):
    """Pages behind, across and inside the neighbour window: each page's bound is at least the best score any of
    its slots takes under Self-Extend, from the plain or the grouped summary as the slot's distance says."""
    layer = rope_layer(slots=100, padding=True)
    if quantized:
        layer = QuantizedLayerCache.from_layer(layer, QuantizationParams("int4", group_size=PAGE, residual_tokens=0,
                                                                         quantize_tail=True))
    pages = paged(layer, read_tokens=40)
    generator = torch.Generator().manual_seed(7)
    query, moved = torch.randn(6, 16, generator=generator), torch.randn(6, 16, generator=generator)
    grouped = GroupedQuery(moved, position=110, group=4, window=30)
    bounds = pages.page_bounds(query, grouped)
    dense = layer.dense()
    scores = self_extend_scores(dense, query, grouped)[:, :pages.paged_slots]
    best = scores.reshape(2, pages.pages, PAGE).amax(dim=2)
    assert (bounds >= best - 1e-4).all()
    # single-slot pages: the bound is the score itself
    single = PagedLayerCache(layer, page_tokens=1, read_tokens=40, sink_tokens=0, recent_tokens=0) if not quantized \
        else None
    if single is not None:
        torch.testing.assert_close(single.page_bounds(query, grouped), self_extend_scores(dense, query, grouped))
    # a page wholly inside the window keeps its plain bound, one wholly behind it takes the grouped one
    plain_bounds, far_bounds = pages.page_bounds(query), pages._bounds(moved, pages.grouped_summary(4))
    torch.testing.assert_close(bounds[0, -1], plain_bounds[0, -1])  # head 0's last page: 110 - 88 < 30 at most
    torch.testing.assert_close(bounds[:, 0], far_bounds[:, 0])
    if quantized:  # head 1's last group holds only padding (its last 5 tokens and the 4 missing rows): unreadable
        assert bounds[1, -1] == -torch.inf


def test_grouped_decode_reads_the_selected_pages_with_their_positions():
    layer = rope_layer(slots=100, padding=True)
    pages = paged(layer, read_tokens=40)
    pages.append(torch.randn(2, 3, 16), torch.randn(2, 3, 16), torch.tensor([100, 101, 102]))
    before = pages.held_bytes
    generator = torch.Generator().manual_seed(8)
    query = torch.randn(6, 16, generator=generator)
    grouped = GroupedQuery(torch.randn(6, 16, generator=generator), position=103, group=4, window=30)
    chosen = pages.select_pages(query, grouped)
    assert chosen.shape == (2, 4) and not torch.equal(chosen.sort().values, pages.select_pages(query).sort().values)
    keys, values, positions = pages.grouped_decode_tensors(query, grouped)
    for head in range(2):
        rows = torch.cat([torch.arange(page * PAGE, (page + 1) * PAGE) for page in chosen[head].tolist()]
                         + [torch.arange(96, 103)])
        torch.testing.assert_close(keys[head], pages.keys[head, rows])
        torch.testing.assert_close(values[head], pages.values[head, rows])
        assert torch.equal(positions[head], pages.positions[head, rows])
    everything = paged(layer, read_tokens=100)
    keys, values, positions = everything.grouped_decode_tensors(query, grouped)
    assert torch.equal(keys, layer.keys) and torch.equal(positions, layer.positions)
    assert pages.held_bytes == before + pages.grouped_summary(4).nbytes > before  # the grouped summary is counted
