"""A full-attention layer kept whole, in pages, whose decode steps read only the pages a query needs (Quest).

Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference" (arXiv:2406.10774). The
layer's slots are cut into pages of ``page_tokens``; each page carries a key summary, the per-channel minimum and
maximum of its keys. For a query q the largest dot product any key of a page can reach is bounded by
sum_d max(q_d * min_d, q_d * max_d), computed here as [relu(q), -relu(-q)] . [max; min] (one small matrix product
over the joined summaries, no per-page intermediate). A decode step keeps the pages with the highest bounds within the
read budget, always with the first pages (attention sinks) and the newest ones (the recent window), and attends
over those pages plus the tail of slots that do not fill a page yet. Everything else stays where it is, unread:
nothing is evicted, so a question asked later reaches every token.

Storage is the layer it wraps (``base``): a plain ``LayerCache`` (possibly memory-mapped from a ``.kv`` file) or
a ``QuantizedLayerCache``. A quantized layer's pages are its key groups, whose per-channel zero point and scale
already are the summary (min = zero, max = zero + scale * (2**bits - 1)); only the selected groups are dequantized.
Multi-token steps (a question, a prefill chunk) attend over every slot, as in Quest, whose sparsity is for decoding.

Under Self-Extend a decode query scores far slots at grouped positions, so their bound comes from a second summary,
of the keys moved to p // group (computed once per group size, on first use, as the keys never move again), against
the grouped query; a page within the neighbour window keeps the plain bound, and a page across the window's edge
takes the larger of the two. The pages read are then exactly those a plain decode step would pick for these scores.

Deviations from the reference code:
  - Grouped-query attention: the query heads sharing a KV head read one set of pages, ranked by the largest bound
    among them (the reference, written for multi-head attention, selects per query head).
  - Sink and recent pages are always read and count against the budget; the reference reads the current page and
    leaves the first ones to the ranking.
  - The pages cover the document as it was arranged (compressed or loaded). Tokens added later (questions and
    answers) are held apart in full precision and read at every step; the reference pages them as they come.
  - Self-Extend (not in the reference): grouped summaries as above. The question's pages (``observe_question``)
    are chosen from its attention computed with plain positions, not grouped ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvlab.cache.kvcache import PADDING_POSITION, LayerCache, empty_layer
from kvlab.cache.quantized import CODE_FIELDS, QuantizedLayerCache, dequantize_codes_into
from kvlab.cache.rope import grouped_shift, rotate_by
from kvlab.errors import ParameterError

SUMMARY_DTYPE = torch.float32
GROUPED_SUMMARY_SLOTS = 1 << 16  # slots moved at once while summarising grouped keys (bounded scratch memory)


@dataclass(frozen=True)
class GroupedQuery:
    """A decode query under Self-Extend (``models.extension.SelfExtend``), also rotated at its grouped position:
    a slot ``window`` or more positions before ``position`` is scored against ``query`` with its key moved to
    position p // ``group``, a nearer one against the plain query with its key where it is."""

    query: torch.Tensor  # (query_heads, head_dim), rotated at the grouped query position
    position: int
    group: int
    window: int


class PagedLayerCache(LayerCache):
    """``base``'s slots in pages of ``page_tokens`` with key summaries, and the tokens added since in ``new``; a
    decode step reads at most ``read_tokens`` slots per head of ``base`` (sinks, recent window and the part of
    ``base`` that fills no page included) and every slot of ``new``. See the module docstring.

    ``base`` is never written to (it may be memory-mapped from a file): tokens appended later (a question, an
    answer) go to ``new``, a plain growable layer.
    """

    base: LayerCache
    new: LayerCache

    def __init__(self, base: LayerCache, *, page_tokens: int, read_tokens: int, sink_tokens: int,
                 recent_tokens: int, question_share: float = 0.0, follow_pages: int = 0,
                 new: LayerCache | None = None) -> None:
        if base.spec.kind != "full":
            raise ValueError("only full-attention layers are paged")
        if isinstance(base, PagedLayerCache):
            base = base.dense() if base.new.slots else base.base
        if isinstance(base, QuantizedLayerCache) and base.params.group_size != page_tokens:
            raise ParameterError(
                f"quest pages ({page_tokens} tokens) must be the quantization groups ({base.params.group_size} "
                f"tokens): pass --kv-quant {base.params.scheme}:g{page_tokens} or -p page_tokens="
                f"{base.params.group_size}")
        self.spec = base.spec
        self.base = base
        self.new = new if new is not None else empty_layer(base.spec, _compute_dtype(base), base.positions.device)
        self.page_tokens = page_tokens
        self.read_tokens = read_tokens
        self.sink_tokens = sink_tokens
        self.recent_tokens = recent_tokens
        self.question_share = question_share
        self.follow_pages = follow_pages
        self.question_pages: torch.Tensor | None = None  # (kv_heads, m): pages the last question attended most
        low, high = page_summaries(base, page_tokens)
        # one (kv_heads, 2 * head_dim, pages) operand: a step's bounds are one matrix product, [q+, q-] @ [max; min]
        self.summary = torch.cat([high, low], dim=2).transpose(1, 2).contiguous()
        self._forced = self._forced_pages()
        self._grouped_summaries: dict[int, torch.Tensor] = {}  # group size -> summary of the grouped keys
        self._page_span: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def page_max(self) -> torch.Tensor:
        """(kv_heads, pages, head_dim): each page's per-channel key maximum."""
        return self.summary[:, :self.spec.head_dim].transpose(1, 2)

    @property
    def page_min(self) -> torch.Tensor:
        """(kv_heads, pages, head_dim): each page's per-channel key minimum."""
        return self.summary[:, self.spec.head_dim:].transpose(1, 2)

    def _forced_pages(self) -> torch.Tensor:
        """(kv_heads, pages) bool: the pages every step reads: sinks, recent pages and the question's."""
        forced = torch.zeros((self.spec.kv_heads, self.pages), dtype=torch.bool, device=self.summary.device)
        forced[:, :self._sink_pages()] = True
        recent = self._recent_pages()
        if recent:
            forced[:, self.pages - recent:] = True
        if self.question_pages is not None:
            forced.scatter_(1, self.question_pages, True)
        return forced

    # -- the wrapped storage -----------------------------------------------------------------------------------------
    @property
    def quantized(self) -> bool:  # type: ignore[override]
        return self.base.quantized

    @property
    def storage(self) -> LayerCache:
        return self.base

    def rewrap(self, base: LayerCache, new: LayerCache | None = None,
               question_pages: torch.Tensor | None = None) -> PagedLayerCache:
        """The same paging over other storage (the layer quantized, moved or copied), with ``new`` as the tokens
        added since (default: none) and ``question_pages`` as the question's pages (default: no question yet)."""
        twin = PagedLayerCache(base, page_tokens=self.page_tokens, read_tokens=self.read_tokens,
                               sink_tokens=self.sink_tokens, recent_tokens=self.recent_tokens,
                               question_share=self.question_share, follow_pages=self.follow_pages, new=new)
        if question_pages is not None:
            twin.question_pages = question_pages.to(twin.summary.device)
            twin._forced = twin._forced_pages()
        return twin

    def map_storage(self, change) -> LayerCache:
        return self.rewrap(change(self.base if self.new.slots == 0 else self.dense()))

    @property
    def keys(self) -> torch.Tensor:
        return self._joined(self.base.keys, self.new.keys)

    @property
    def values(self) -> torch.Tensor:
        return self._joined(self.base.values, self.new.values)

    @property
    def positions(self) -> torch.Tensor:
        return self._joined(self.base.positions, self.new.positions)

    @property
    def slots(self) -> int:
        return self.base.slots + self.new.slots

    @property
    def padding_free(self) -> torch.Tensor | None:
        base, new = self.base.padding_free, self.new.padding_free
        if base is None and new is None:
            return None
        return torch.cat([self.base.valid if base is None else base, self.new.valid if new is None else new], dim=1)

    @property
    def bytes_per_slot(self) -> int:
        return self.base.bytes_per_slot

    def dense_element_size(self) -> int:
        return self.base.dense_element_size()

    def attention_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot (a step with several queries attends to all, as in Quest)."""
        if not self.new.slots:
            return self.base.attention_tensors()
        keys, values = self.base.attention_tensors()
        return torch.cat([keys, self.new.keys], dim=1), torch.cat([values, self.new.values], dim=1)

    def storages(self) -> list[torch.Tensor]:
        return [*self.base.storages(), *self.new.storages(), self.summary]

    def _joined(self, base: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return base if not self.new.slots else torch.cat([base, new], dim=1)

    # -- pages -----------------------------------------------------------------------------------------------------
    @property
    def pages(self) -> int:
        return self.summary.shape[2]

    @property
    def paged_slots(self) -> int:
        return self.pages * self.page_tokens

    def read_pages(self) -> int:
        """Pages a decode step reads per head: the budget less the part of ``base`` that fills no page, never fewer
        than the sink and recent pages. Tokens added since (``new``) are read on top, as a question is kept on top
        of an eviction budget."""
        always = self.base.slots - self.paged_slots
        forced = self._sink_pages() + self._recent_pages()
        budget = max(0, self.read_tokens - always) // self.page_tokens
        return min(self.pages, max(budget, forced))

    def _sink_pages(self) -> int:
        return min(self.pages, math.ceil(self.sink_tokens / self.page_tokens))

    def _recent_pages(self) -> int:
        return min(self.pages - self._sink_pages(), math.ceil(self.recent_tokens / self.page_tokens))

    # -- decode ----------------------------------------------------------------------------------------------------
    def page_bounds(self, query: torch.Tensor, grouped: GroupedQuery | None = None) -> torch.Tensor:
        """(kv_heads, pages): for each KV head, the largest bound over its query heads on the score of any key of
        the page; ``query`` (query_heads, head_dim). With ``grouped`` (Self-Extend), a slot ``window`` or more
        positions back scores ``grouped.query`` against its key at the grouped position, and the page's bound
        covers whichever scores its slots take."""
        bounds = self._bounds(query, self.summary)
        if grouped is None:
            return bounds
        first, last = self.page_span()
        far = grouped.position - first >= grouped.window  # some slot of the page is scored at grouped positions
        near = grouped.position - last < grouped.window  # some slot is a neighbour
        moved = self._bounds(grouped.query, self.grouped_summary(grouped.group))
        return torch.maximum(bounds.masked_fill(~near, -math.inf), moved.masked_fill(~far, -math.inf))

    def _bounds(self, query: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        grouped = query.to(SUMMARY_DTYPE).reshape(spec.kv_heads, spec.group_size, spec.head_dim)
        signed = torch.cat([grouped.clamp(min=0), grouped.clamp(max=0)], dim=-1)
        return (signed @ summary).amax(dim=1)

    def select_pages(self, query: torch.Tensor, grouped: GroupedQuery | None = None) -> torch.Tensor:
        """(kv_heads, k) page indices, in no particular order: the sink, recent and question pages, then the
        highest bounds, k = ``read_pages``."""
        count = self.read_pages()
        if count >= self.pages:
            return self._all_pages()
        bounds = self.page_bounds(query, grouped).masked_fill_(self._forced, math.inf)
        return bounds.topk(count, dim=1, sorted=False).indices

    def page_span(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv_heads, pages) each: the first and last position held in each page (a page of padding alone spans
        nothing: first above last)."""
        if self._page_span is None:
            shaped = self.base.positions[:, :self.paged_slots].reshape(self.spec.kv_heads, self.pages,
                                                                        self.page_tokens)
            real = shaped != PADDING_POSITION
            first = torch.where(real, shaped, torch.iinfo(shaped.dtype).max).amin(dim=2)
            self._page_span = (first, torch.where(real, shaped, PADDING_POSITION).amax(dim=2))
        return self._page_span

    def grouped_summary(self, group: int) -> torch.Tensor:
        """Like ``summary``, over the keys moved to grouped positions p // ``group`` (Self-Extend); computed on
        first use per group size, a bounded number of slots at a time (the pages of a quantized layer are
        dequantized once for it)."""
        summary = self._grouped_summaries.get(group)
        if summary is not None:
            return summary
        if self.spec.rope_theta is None:
            raise ValueError("grouped page summaries need standard RoPE")
        heads, dim, size = self.spec.kv_heads, self.spec.head_dim, self.page_tokens
        dtype = _compute_dtype(self.base)
        low = torch.empty((heads, self.pages, dim), dtype=SUMMARY_DTYPE, device=self.summary.device)
        high = torch.empty_like(low)
        step = max(1, GROUPED_SUMMARY_SLOTS // size)
        for start in range(0, self.pages, step):
            chosen = torch.arange(start, min(self.pages, start + step), device=low.device).expand(heads, -1)
            keys = torch.empty((heads, chosen.shape[1] * size, dim), dtype=dtype, device=low.device)
            self._read_pages_into(chosen, keys, torch.empty_like(keys))
            positions = self._page_positions(chosen)
            real = positions != PADDING_POSITION
            shift = torch.where(real, grouped_shift(positions, group), 0)
            moved = rotate_by(keys.to(SUMMARY_DTYPE), shift, self.spec.rope_theta)
            moved = moved.reshape(heads, -1, size, dim)
            real = real.reshape(heads, -1, size, 1)
            low[:, chosen[0]] = torch.where(real, moved, math.inf).amin(dim=2)
            high[:, chosen[0]] = torch.where(real, moved, -math.inf).amax(dim=2)
        summary = torch.cat([high, low], dim=2).transpose(1, 2).contiguous()
        self._grouped_summaries[group] = summary
        return summary

    def _all_pages(self) -> torch.Tensor:
        return torch.arange(self.pages, device=self.summary.device).expand(self.spec.kv_heads, -1)

    def _page_positions(self, chosen: torch.Tensor) -> torch.Tensor:
        """(kv_heads, k * page_tokens): the positions of the pages' slots; PADDING_POSITION where a slot holds no
        token (padding, or a quantized partial last group's missing rows, which the layer's positions mark so)."""
        return self.base.positions.gather(1, _slot_rows(chosen, self.page_tokens))

    def observe_question(self, queries: torch.Tensor, scale: float) -> None:
        """Remember the pages the newest question attends to most, read at every following decode step as the
        sink and recent pages are: ``question_share`` of the per-step budget. ``queries`` (query_heads, w, head_dim)
        are the question's last rotated queries; their softmax attention over the paged slots is summed per page
        over the queries and the query heads sharing each KV head. With ``follow_pages`` k, a page ranks by the
        most mass of itself and the k pages before it (a one-sided max pool, as SnapKV pools token scores), so the
        pages that follow what the question matched are read with it: an answer is usually the text after the
        key the question names, and a page boundary may fall inside it. A no-op when ``question_share`` is 0
        (Quest as published)."""
        free = self.read_pages() - self._sink_pages() - self._recent_pages()
        wanted = min(free, int(self.question_share * self.read_pages()))
        if wanted <= 0 or not self.pages:
            self.question_pages = None
            self._forced = self._forced_pages()
            return
        spec, paged = self.spec, self.paged_slots
        keys = self.base.attention_tensors()[0][:, :paged]
        grouped = queries.reshape(spec.kv_heads, spec.group_size * queries.shape[1], spec.head_dim)
        weights = torch.softmax((grouped.float() @ keys.float().transpose(1, 2)) * scale, dim=-1)
        padding = self.base.padding_free
        if padding is not None:
            weights = weights * padding[:, None, :paged]
        mass = weights.sum(dim=1).reshape(spec.kv_heads, self.pages, self.page_tokens).sum(dim=-1)
        if self.follow_pages:
            before = torch.nn.functional.pad(mass, (self.follow_pages, 0))
            mass = before.unfold(1, self.follow_pages + 1, 1).amax(dim=-1)
        self.question_pages = mass.topk(wanted, dim=1).indices
        self._forced = self._forced_pages()

    def decode_tensors(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What one decode query reads: keys, values (kv_heads, n, head_dim) of the selected pages, then the slots
        that fill no page, then the new ones; and their padding mask (kv_heads, n), or None. Each part is written
        once, into the output."""
        return self._gather(self.select_pages(query))

    def grouped_decode_tensors(self, query: torch.Tensor,
                               grouped: GroupedQuery) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What one decode query reads under Self-Extend, pages chosen by ``page_bounds(query, grouped)``: keys,
        values (kv_heads, n, head_dim) as ``decode_tensors`` gives them, and the slots' positions (kv_heads, n),
        PADDING_POSITION where a slot holds no token."""
        chosen = self.select_pages(query, grouped)
        keys, values, mask = self._gather(chosen)
        positions = torch.cat([self._page_positions(chosen), *(part[3] for part in self._unpaged())], dim=1)
        if mask is not None:
            positions = positions.masked_fill(~mask, PADDING_POSITION)
        return keys, values, positions

    def _gather(self, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        heads, dim = self.spec.kv_heads, self.spec.head_dim
        selected = chosen.shape[1] * self.page_tokens
        always = self._unpaged()
        total = selected + sum(part[0].shape[1] for part in always)
        keys = torch.empty((heads, total, dim), dtype=_compute_dtype(self.base), device=chosen.device)
        values = torch.empty_like(keys)
        masks = [(0, selected, self._read_pages_into(chosen, keys[:, :selected], values[:, :selected]))]
        at = selected
        for part_keys, part_values, part_mask, _ in always:
            end = at + part_keys.shape[1]
            keys[:, at:end] = part_keys
            values[:, at:end] = part_values
            masks.append((at, end, part_mask))
            at = end
        if all(part is None for _, _, part in masks):
            return keys, values, None
        mask = torch.ones((heads, total), dtype=torch.bool, device=chosen.device)
        for start, end, part in masks:
            if part is not None:
                mask[:, start:end] = part
        return keys, values, mask

    def _read_pages_into(self, chosen: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor | None:
        """Write the chosen pages' keys and values into ``keys``, ``values`` (kv_heads, k * page_tokens, head_dim);
        return their padding mask, or None."""
        size, base = self.page_tokens, self.base
        if isinstance(base, QuantizedLayerCache):
            # keys' scales and zero points have one row per group, that is per page; the codes P rows per page
            codes = {name: _take_pages(base.codes[name], chosen, 1 if name in ("key_scales", "key_zeros") else size)
                     for name in CODE_FIELDS}
            dequantize_codes_into(codes, base.params, keys, values)
            padding = base.code_padding_free  # a partial last group's missing rows (quantize_tail)
            return None if padding is None else padding.gather(1, _slot_rows(chosen, size))
        _take_pages(base.keys, chosen, size, out=keys)
        _take_pages(base.values, chosen, size, out=values)
        padding = base.padding_free
        return None if padding is None else padding.gather(1, _slot_rows(chosen, size))

    def _unpaged(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """The slots every decode step reads, as views: the part of ``base`` that fills no page, and ``new``; each
        as keys, values, padding mask (or None) and positions."""
        base = self.base
        rest = base.residual if isinstance(base, QuantizedLayerCache) else base
        start = 0 if isinstance(base, QuantizedLayerCache) else self.paged_slots
        rest_mask = rest.padding_free
        return [(rest.keys[:, start:], rest.values[:, start:], None if rest_mask is None else rest_mask[:, start:],
                 rest.positions[:, start:]),
                (self.new.keys, self.new.values, self.new.padding_free, self.new.positions)]

    def decode_read_bytes(self) -> int:
        """Bytes one decode step reads from this layer: the summaries, the selected pages, the rest of ``base`` and
        the new slots (each at its held size)."""
        summaries = self.summary.nbytes
        base = self.base
        page_bytes = base.held_bytes / max(1, base.slots)
        if isinstance(base, QuantizedLayerCache):
            page_bytes = (base.held_bytes - base.residual.held_bytes) / max(1, self.paged_slots)
        unpaged = base.held_bytes - page_bytes * self.paged_slots
        return int(summaries + self.read_pages() * self.page_tokens * page_bytes + unpaged + self.new.held_bytes)

    # -- bytes -----------------------------------------------------------------------------------------------------
    @property
    def held_bytes(self) -> int:
        return self.base.held_bytes + self.new.held_bytes + self.summary.nbytes + self._grouped_bytes()

    @property
    def live_bytes(self) -> int:
        return self.base.live_bytes + self.new.live_bytes + self.summary.nbytes + self._grouped_bytes()

    @property
    def allocated_bytes(self) -> int:
        return self.base.allocated_bytes + self.new.allocated_bytes + self.summary.nbytes + self._grouped_bytes()

    def _grouped_bytes(self) -> int:
        return sum(summary.nbytes for summary in self._grouped_summaries.values())

    # -- growth ----------------------------------------------------------------------------------------------------
    def reserve(self, extra_slots: int) -> None:
        self.new.reserve(extra_slots)

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        self.new.append(keys, values, positions)

    def settle(self) -> None:
        return None  # a full-attention layer drops nothing; ``base`` is never written

    # -- copies ----------------------------------------------------------------------------------------------------
    def fork(self) -> PagedLayerCache:
        twin = object.__new__(PagedLayerCache)
        twin.__dict__.update(self.__dict__)
        twin.new = self.new.fork()
        return twin

    def clone(self) -> PagedLayerCache:
        return self.rewrap(self.base.clone(), self.new.clone(), self.question_pages)

    def to(self, device: torch.device | str) -> PagedLayerCache:
        return self.rewrap(self.base.to(device), self.new.to(device), self.question_pages)

    def dense(self) -> LayerCache:
        base = self.base.dense()
        if not self.new.slots:
            return base
        return LayerCache(self.spec, self.keys, self.values, self.positions)


def page_summaries(base: LayerCache, page_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page, per-channel key minimum and maximum (kv_heads, pages, head_dim) over ``base``'s whole pages: a
    quantized layer's key groups (read off their zero points and scales), or a plain layer's slots."""
    heads, dim = base.spec.kv_heads, base.spec.head_dim
    if isinstance(base, QuantizedLayerCache):
        zeros = base.codes["key_zeros"].to(SUMMARY_DTYPE)
        return zeros, zeros + base.codes["key_scales"].to(SUMMARY_DTYPE) * float((1 << base.params.bits) - 1)
    pages = base.slots // page_tokens
    block = base.keys[:, :pages * page_tokens].reshape(heads, pages, page_tokens, dim).to(SUMMARY_DTYPE)
    mask = base.padding_free
    if mask is None:
        return block.amin(dim=2), block.amax(dim=2)
    # padding never widens a page's range (a page of padding alone bounds nothing: -inf)
    real = mask[:, :pages * page_tokens].reshape(heads, pages, page_tokens, 1)
    return torch.where(real, block, math.inf).amin(dim=2), torch.where(real, block, -math.inf).amax(dim=2)


def _slot_rows(pages: torch.Tensor, page_tokens: int) -> torch.Tensor:
    """(heads, k * page_tokens): the slot indices of each head's pages (heads, k)."""
    offsets = torch.arange(page_tokens, device=pages.device)
    return (pages[:, :, None] * page_tokens + offsets).reshape(pages.shape[0], -1)


def _take_pages(tensor: torch.Tensor, pages: torch.Tensor, rows_per_page: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``tensor`` (heads, slots, width) at ``pages`` (heads, k) of ``rows_per_page`` rows each, into ``out``
    (heads, k * rows_per_page, width) if given: one row ``index_select`` per head where rows are contiguous (on
    these CPUs several times faster than advanced indexing or a gather, and faster than selecting whole pages as
    wide rows), a gather otherwise."""
    heads, _, width = tensor.shape
    rows = _slot_rows(pages, rows_per_page)
    if out is None:
        out = tensor.new_empty((heads, rows.shape[1], width))
    if tensor.stride(-1) != 1 or tensor.stride(-2) != width or out.stride(-1) != 1 or out.stride(-2) != width:
        out.copy_(tensor.gather(1, rows[:, :, None].expand(-1, -1, width)))
        return out
    for head in range(heads):
        torch.index_select(tensor[head], 0, rows[head], out=out[head])
    return out


def _compute_dtype(layer: LayerCache) -> torch.dtype:
    return layer.dtype if isinstance(layer, QuantizedLayerCache) else layer.keys.dtype


def page_cache_layers(layers: list[LayerCache], *, page_tokens: int, read_tokens: int, sink_tokens: int,
                      recent_tokens: int, question_share: float = 0.0, follow_pages: int = 0) -> list[LayerCache]:
    """Every full-attention layer paged (sliding-window ones, already small, pass through)."""
    return [PagedLayerCache(layer, page_tokens=page_tokens, read_tokens=read_tokens, sink_tokens=sink_tokens,
                            recent_tokens=recent_tokens, question_share=question_share, follow_pages=follow_pages)
            if layer.spec.kind == "full" else layer for layer in layers]
