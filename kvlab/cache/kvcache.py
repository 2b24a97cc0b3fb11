"""KVCache: kvlab's KV container and the one owner of keys, values and original positions.

Per layer and per KV head it holds the kept keys, values and original positions. Tensors have no batch dimension
(kvlab runs one sequence at a time):
  keys, values: (kv_heads, slots, head_dim)
  positions:    (kv_heads, slots) int64, the token's original position in the sequence, which is also its index
                in the token sequence; -1 marks a padding slot.
Heads of one layer may keep different numbers of tokens (head-wise policies such as Ada-KV); the layer is then
padded to its longest head and the padding slots are masked in attention. Right after compression the slots of a
head are sorted by position, padding last; tokens appended later go after the padding.

Storage grows in place. A layer's slots live in a ``SlotBuffer`` with spare capacity; ``append`` writes into it
and only reallocates (amortized growth) when it is full. Forks share the buffer and stay cheap: a layer may write
in place only while nobody has written past its end (copy on first conflicting write), so a fork never sees
another fork's tokens. Sliding-window layers drop old slots by moving their start (``settle``), which costs
nothing; the buffer is compacted when it next reallocates.

Byte accounting: ``held_bytes`` is what the cache needs in memory while decoding (every slot, padding included, at
the storage dtype; quantized layers count codes, scales and their full-precision residual); ``live_bytes`` counts
kept tokens only (padding excluded); ``allocated_bytes`` is what the buffers occupy, spare capacity included;
``kv_bytes_full_fp16`` is the uncompressed cache of the same sequence at 2 bytes per element, the denominator of
every compression figure kvlab reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.cache.layout import LayerSpec

PADDING_POSITION = -1
FP16_BYTES = 2
MIN_SPARE_SLOTS = 64  # a reallocating layer keeps at least this many free slots (and 1/16 of its length)


class SlotBuffer:
    """Append-only storage shared by a layer and its forks. ``used`` is the high-water mark of written slots."""

    __slots__ = ("keys", "values", "positions", "valid", "used")

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                 valid: torch.Tensor | None, used: int) -> None:
        self.keys, self.values, self.positions, self.valid, self.used = keys, values, positions, valid, used

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class LayerCache:
    """One layer's kept slots: a window ``[start, end)`` of a (possibly shared) SlotBuffer.

    ``LayerCache(spec, keys, values, positions)`` wraps the given tensors without copying them. Padding slots are
    found once, here; slots appended later are always real tokens, so no step ever re-scans the positions.
    """

    quantized = False

    def __init__(self, spec: LayerSpec, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        if keys.shape != values.shape or keys.shape[:2] != positions.shape:
            raise ValueError(f"keys {tuple(keys.shape)}, values {tuple(values.shape)} and positions "
                             f"{tuple(positions.shape)} do not describe the same slots")
        valid = positions != PADDING_POSITION
        ragged = bool((~valid).any()) if positions.numel() else False
        self.spec = spec
        self._buffer = SlotBuffer(keys, values, positions, valid if ragged else None, keys.shape[1])
        self._start, self._end = 0, keys.shape[1]

    # -- views ---------------------------------------------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor:
        return self._buffer.keys[:, self._start:self._end]

    @property
    def values(self) -> torch.Tensor:
        return self._buffer.values[:, self._start:self._end]

    @property
    def positions(self) -> torch.Tensor:
        return self._buffer.positions[:, self._start:self._end]

    @property
    def slots(self) -> int:
        return self._end - self._start

    @property
    def padding_free(self) -> torch.Tensor | None:
        """(kv_heads, slots) bool, True for real tokens, or None when no slot is padding (the common case)."""
        valid = self._buffer.valid
        return None if valid is None else valid[:, self._start:self._end]

    @property
    def is_ragged(self) -> bool:
        mask = self.padding_free
        return mask is not None and not bool(mask.all())

    @property
    def valid(self) -> torch.Tensor:
        """(kv_heads, slots) bool: True where the slot holds a real token."""
        mask = self.padding_free
        return mask if mask is not None else torch.ones(self.positions.shape, dtype=torch.bool,
                                                        device=self.positions.device)

    @property
    def kept_per_head(self) -> torch.Tensor:
        """(kv_heads,) int64: tokens kept by each head."""
        return self.valid.sum(dim=-1)

    # -- bytes -----------------------------------------------------------------------------------------------------
    @property
    def bytes_per_slot(self) -> int:
        """Key plus value bytes of one slot across all heads, at the storage dtype."""
        return self.spec.kv_heads * self.spec.head_dim * (self._buffer.keys.element_size()
                                                          + self._buffer.values.element_size())

    def dense_element_size(self) -> int:
        """Bytes of one key or value element at the dtype attention computes in."""
        return self._buffer.keys.element_size()

    @property
    def held_bytes(self) -> int:
        """Bytes held while decoding: every slot, padding included."""
        return self.slots * self.bytes_per_slot

    @property
    def live_bytes(self) -> int:
        """Bytes of the kept tokens (padding excluded)."""
        mask = self.padding_free
        kept = self.slots * self.spec.kv_heads if mask is None else int(mask.sum())
        return kept * self.bytes_per_slot // self.spec.kv_heads

    @property
    def allocated_bytes(self) -> int:
        """Bytes the storage occupies, spare capacity included."""
        return self._buffer.nbytes

    def storages(self) -> list[torch.Tensor]:
        """The tensors backing this layer (shared with its forks), for counting memory once across forks."""
        buffer = self._buffer
        return [t for t in (buffer.keys, buffer.values, buffer.positions, buffer.valid) if t is not None]

    # -- growth ----------------------------------------------------------------------------------------------------
    def reserve(self, extra_slots: int) -> None:
        """Make room for ``extra_slots`` appends without another reallocation (prefill knows its length)."""
        if self._end + extra_slots > self._buffer.capacity or self._end != self._buffer.used:
            self._reallocate(self.slots + extra_slots)

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Add ``n`` slots: keys and values (kv_heads, n, head_dim), positions (n,) shared by every head."""
        count = keys.shape[1]
        buffer = self._buffer
        if self._end != buffer.used or self._end + count > buffer.capacity:
            wanted = self.slots + count
            self._reallocate(wanted + max(MIN_SPARE_SLOTS, wanted // 16))
            buffer = self._buffer
        end = self._end + count
        buffer.keys[:, self._end:end] = keys
        buffer.values[:, self._end:end] = values
        buffer.positions[:, self._end:end] = positions
        if buffer.valid is not None:
            buffer.valid[:, self._end:end] = True
        buffer.used = self._end = end

    def refill(self, other: LayerCache) -> bool:
        """Replace this layer's slots by ``other``'s, written into this layer's own buffer when it has room: no
        allocation, so a loop that compresses and grows a cache again and again (streaming prefill) reuses one
        buffer instead of leaving the heap a freed buffer per round. Returns False, changing nothing, when the buffer
        is too small or ``other`` is another kind of layer. Only for a layer no fork shares: forks would see it."""
        buffer, count = self._buffer, other.slots
        if type(other) is not LayerCache or type(self) is not LayerCache or count > buffer.capacity:
            return False
        buffer.keys[:, :count] = other.keys
        buffer.values[:, :count] = other.values
        buffer.positions[:, :count] = other.positions
        padding_free = other.padding_free
        if padding_free is None:
            buffer.valid = None
        else:
            if buffer.valid is None:
                buffer.valid = torch.ones(buffer.positions.shape, dtype=torch.bool, device=buffer.positions.device)
            buffer.valid[:, :count] = padding_free
        buffer.used = self._end = count
        self._start = 0
        return True

    def settle(self) -> None:
        """After a forward pass: a sliding-window layer keeps only its last ``window - 1`` slots (no copy; full
        layers: no-op)."""
        keep = self.spec.retained_tokens
        if keep is not None and self.slots > keep:
            self._start = self._end - keep

    def _reallocate(self, capacity: int) -> None:
        old = self._buffer
        heads, dim = self.spec.kv_heads, self.spec.head_dim
        keys = old.keys.new_empty((heads, capacity, dim))
        values = old.values.new_empty((heads, capacity, dim))
        positions = old.positions.new_empty((heads, capacity))
        valid = None if old.valid is None else old.valid.new_empty((heads, capacity))
        count = self.slots
        keys[:, :count] = self.keys
        values[:, :count] = self.values
        positions[:, :count] = self.positions
        if valid is not None:
            padding_free = self.padding_free
            assert padding_free is not None  # both come from the same buffer's ``valid``
            valid[:, :count] = padding_free
            if bool(valid[:, :count].all()):
                valid = None  # the padding was trimmed away (a sliding layer never has any)
        self._buffer = SlotBuffer(keys, values, positions, valid, count)
        self._start, self._end = 0, count

    # -- copies ----------------------------------------------------------------------------------------------------
    def fork(self) -> LayerCache:
        """A layer that shares the storage; appends to either never show in the other."""
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        return twin

    def clone(self) -> LayerCache:
        return LayerCache(self.spec, self.keys.clone(), self.values.clone(), self.positions.clone())

    def to(self, device: torch.device | str) -> LayerCache:
        return LayerCache(self.spec, self.keys.to(device), self.values.to(device), self.positions.to(device))

    def dense(self) -> LayerCache:
        """This layer with plain key and value tensors (itself; quantized layers dequantize)."""
        return self

    def decode_read_bytes(self) -> int:
        """Bytes of this layer one decode step reads: all it holds (a paged layer reads fewer, ``cache.paged``)."""
        return self.held_bytes

    @property
    def storage(self) -> LayerCache:
        """The layer that holds the tensors: itself, or the one a wrapper (``cache.paged``) reads through."""
        return self

    def map_storage(self, change) -> LayerCache:
        """``change(storage)``, kept under this layer's wrapper if it has one (quantizing a paged layer keeps its
        pages)."""
        return change(self)

    # -- attention -------------------------------------------------------------------------------------------------
    def attention_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) as attention reads them, (kv_heads, slots, head_dim) each, in slot order."""
        return self.keys, self.values


@dataclass
class KVCache:
    """A whole model's cache; ``num_tokens`` is the length of the token sequence it represents."""

    layers: list[LayerCache]
    num_tokens: int

    @property
    def held_bytes(self) -> int:
        """Bytes held in memory while decoding: every slot (padding included), quantization scales included."""
        return sum(layer.held_bytes for layer in self.layers)

    @property
    def live_bytes(self) -> int:
        """Bytes of the kept keys and values (padding excluded)."""
        return sum(layer.live_bytes for layer in self.layers)

    @property
    def decode_read_bytes(self) -> int:
        """Bytes of keys and values (and page summaries) one decode step reads: ``held_bytes`` unless layers are
        paged (``quest`` reads the pages a query selects)."""
        return sum(layer.decode_read_bytes() for layer in self.layers)

    @property
    def allocated_bytes(self) -> int:
        """Bytes the key and value storage occupies (spare capacity included)."""
        return sum(layer.allocated_bytes for layer in self.layers)

    def full_bytes(self, element_bytes: int | None = None) -> int:
        """Bytes this sequence would take uncompressed, every token in full layers and the window in sliding ones,
        at ``element_bytes`` per element (default: the cache's own dtype)."""
        total = 0
        for layer in self.layers:
            tokens = self.num_tokens if layer.spec.retained_tokens is None else min(
                self.num_tokens, layer.spec.retained_tokens)
            size = element_bytes if element_bytes is not None else layer.dense_element_size()
            total += tokens * layer.spec.kv_heads * layer.spec.head_dim * 2 * size
        return total

    @property
    def kv_bytes_full_fp16(self) -> int:
        """The uncompressed cache of this sequence at 2 bytes per element: the denominator of ``compression``."""
        return self.full_bytes(FP16_BYTES)

    def kept_tokens(self) -> float:
        """Mean tokens kept per head over the full-attention layers (the layers policies compress)."""
        counts = [layer.kept_per_head.float().mean() for layer in self.layers if layer.spec.kind == "full"]
        return float(torch.stack(counts).mean()) if counts else float(self.num_tokens)

    def reserve(self, extra_slots: int, chunk_slots: int | None = None) -> None:
        """Room for ``extra_slots`` appends in full layers; sliding layers, which drop old slots as they go, get
        their window plus one chunk of ``chunk_slots`` (default: all of them)."""
        for layer in self.layers:
            keep = layer.spec.retained_tokens
            chunk = extra_slots if chunk_slots is None else min(chunk_slots, extra_slots)
            layer.reserve(extra_slots if keep is None else min(extra_slots, keep + chunk))

    def settle(self) -> None:
        """After a forward pass: sliding layers drop what left the window, quantized layers quantize full groups."""
        for layer in self.layers:
            layer.settle()

    def fork(self) -> KVCache:
        """A copy that shares storage: growing or trimming either leaves the other as it was. No tensor copies."""
        return KVCache(layers=[layer.fork() for layer in self.layers], num_tokens=self.num_tokens)

    def clone(self) -> KVCache:
        return KVCache(layers=[layer.clone() for layer in self.layers], num_tokens=self.num_tokens)

    def dense(self) -> KVCache:
        """The same cache with plain key and value tensors (quantized layers dequantized; others shared)."""
        return KVCache(layers=[layer.dense() for layer in self.layers], num_tokens=self.num_tokens)


def pack_heads(spec: LayerSpec, keys: list[torch.Tensor], values: list[torch.Tensor],
               positions: list[torch.Tensor]) -> LayerCache:
    """Stack per-head (slots_h, head_dim) tensors into one padded LayerCache; padding goes last in each head."""
    width = max(int(p.numel()) for p in positions)
    reference = keys[0]
    packed_keys = reference.new_zeros((len(keys), width, reference.shape[-1]))
    packed_values = values[0].new_zeros((len(values), width, values[0].shape[-1]))
    packed_positions = torch.full((len(positions), width), PADDING_POSITION, dtype=torch.long,
                                  device=positions[0].device)
    for head, (head_keys, head_values, head_positions) in enumerate(zip(keys, values, positions)):
        count = head_positions.numel()
        packed_keys[head, :count] = head_keys
        packed_values[head, :count] = head_values
        packed_positions[head, :count] = head_positions
    return LayerCache(spec, packed_keys, packed_values, packed_positions)


def empty_layer(spec: LayerSpec, dtype: torch.dtype, device: torch.device) -> LayerCache:
    return LayerCache(
        spec=spec,
        keys=torch.zeros((spec.kv_heads, 0, spec.head_dim), dtype=dtype, device=device),
        values=torch.zeros((spec.kv_heads, 0, spec.head_dim), dtype=dtype, device=device),
        positions=torch.zeros((spec.kv_heads, 0), dtype=torch.long, device=device),
    )
