"""A sliding-window layer held quantized while the model decodes on it: keys and values both per token.

``QuantizedSlidingLayerCache`` is a ``LayerCache`` for ``spec.kind == "sliding"``. Every token outside a small
full-precision residual is held as integer codes (``params.scheme``: int8, int4 or int2, packed as ``pack_codes``
packs them) with one fp16 scale and zero point per token per group of ``min(group_size, head_dim)`` channels, for
keys and values alike (llama.cpp's per-token block layout, computed with ``quant.quantize_value_block``).

Why keys per token here, unlike KIVI's per-channel keys in ``cache.quantized``: a sliding layer keeps its last
``window - 1`` tokens and drops the oldest one at every step. A per-channel key group spans ``group_size`` tokens,
so the window would cut through it and its scale would still cover tokens that left. With per-token rows a token
leaves alone: dropping it moves a start index, and no row is ever re-quantized. The cost is accuracy on keys with
outlier channels (the reason KIVI quantizes keys per channel); the window is short and its newest tokens, which a
query attends to most, are in the residual.

New tokens are appended to the residual, a plain growable ``LayerCache`` in the model's dtype, so the pass that
adds them attends to them in full precision. After the pass (``settle``) the window drops what left it, and the
residual's tokens beyond the newest ``residual_tokens`` are quantized one row each (no group to fill, so the
residual holds exactly ``min(residual_tokens, slots)`` tokens between passes; ``residual_tokens=0`` quantizes every
token right after its pass).

Code rows live in a buffer with spare capacity shared by forks, as ``kvcache.SlotBuffer`` does for plain slots: a
layer writes in place only while nobody has written past its end, and the buffer is compacted (to the window) when
it next reallocates. The slot order is the code rows then the residual; a sliding layer holds no padding.

Bytes: ``held_bytes`` counts the window's code rows (codes, scales, zero points) and the residual, exactly;
positions are metadata and are not counted, as for every other layer.
"""

from __future__ import annotations

import torch

from kvlab.cache.kvcache import MIN_SPARE_SLOTS, LayerCache
from kvlab.cache.layout import LayerSpec
from kvlab.cache.quant import (
    SCRATCH,
    QuantizationParams,
    quantize_value_block,
    scale_per_token_into,
    unpack_codes_into,
)
from kvlab.errors import ParameterError

CODE_FIELDS = ("key_codes", "key_scales", "key_zeros", "value_codes", "value_scales", "value_zeros")


class CodeRows:
    """Append-only per-token rows shared by a layer and its forks: ``tensors`` maps each of ``CODE_FIELDS`` and
    ``positions`` to (kv_heads, capacity, ...) storage; ``used`` is the high-water mark of written rows.
    Codes (H, C, ceil(D * bits / 8)) uint8; scales and zeros (H, C, ceil(D / group)) fp16; positions (H, C) int64."""

    __slots__ = ("tensors", "used")

    def __init__(self, tensors: dict[str, torch.Tensor], used: int) -> None:
        self.tensors, self.used = tensors, used

    @property
    def capacity(self) -> int:
        return self.tensors["positions"].shape[1]


class QuantizedSlidingLayerCache(LayerCache):
    """A sliding-window layer held as per-token codes plus a full-precision residual; see the module docstring."""

    quantized = True

    def __init__(self, spec: LayerSpec, params: QuantizationParams, dtype: torch.dtype, rows: CodeRows,
                 residual: LayerCache) -> None:
        if spec.kind != "sliding":
            raise ValueError("QuantizedSlidingLayerCache holds sliding-window layers; full ones are "
                             "QuantizedLayerCache")
        self.spec, self.params, self.dtype = spec, params, dtype
        self._rows, self._start, self._end = rows, 0, rows.used
        self.residual = residual

    @classmethod
    def from_layer(cls, layer: LayerCache, params: QuantizationParams) -> QuantizedSlidingLayerCache:
        """Quantize a plain sliding layer: all but its newest ``residual_tokens`` slots become code rows."""
        dense = layer.dense()
        if dense.is_ragged:
            raise ValueError("a sliding-window layer holds no padding slots")
        for name, tensor in (("keys", dense.keys), ("values", dense.values)):
            if not bool(torch.isfinite(tensor).all()):
                raise ParameterError(f"cannot quantize a cache whose {name} hold NaN or inf; recompute the cache")
        count = max(dense.slots - params.residual_tokens, 0)
        rows = encode_rows(dense.keys[:, :count], dense.values[:, :count], params)
        rows["positions"] = dense.positions[:, :count].clone()
        residual = LayerCache(dense.spec, dense.keys[:, count:].clone(), dense.values[:, count:].clone(),
                              dense.positions[:, count:].clone())
        return cls(dense.spec, params, dense.keys.dtype, CodeRows(rows, count), residual)

    # -- views -----------------------------------------------------------------------------------------------------
    @property
    def code_slots(self) -> int:
        return self._end - self._start

    @property
    def slots(self) -> int:
        return self.code_slots + self.residual.slots

    def _window(self, name: str) -> torch.Tensor:
        return self._rows.tensors[name][:, self._start:self._end]

    @property
    def positions(self) -> torch.Tensor:
        return torch.cat([self._window("positions"), self.residual.positions], dim=1)

    @property
    def padding_free(self) -> torch.Tensor | None:
        return None

    @property
    def keys(self) -> torch.Tensor:
        """Dequantized keys in fresh memory (attention reads ``attention_tensors`` instead)."""
        return self.dense().keys

    @property
    def values(self) -> torch.Tensor:
        return self.dense().values

    def attention_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized keys and values (kv_heads, slots, head_dim) in the compute dtype, in the per-thread scratch
        buffers that full quantized layers use too: valid until the next layer asks (``dense`` copies)."""
        device = self.residual.positions.device
        return self._dequantize(SCRATCH.get(0, self._shape, self.dtype, device),
                                SCRATCH.get(1, self._shape, self.dtype, device))

    @property
    def _shape(self) -> tuple[int, int, int]:
        return (self.spec.kv_heads, self.slots, self.spec.head_dim)

    def _dequantize(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count, bits = self.code_slots, self.params.bits
        group = min(self.params.group_size, self.spec.head_dim)
        if count:
            for side, out in (("key", keys[:, :count]), ("value", values[:, :count])):
                unpack_codes_into(self._window(f"{side}_codes"), bits, out)
                scale_per_token_into(out, self._window(f"{side}_scales"), self._window(f"{side}_zeros"), group)
        keys[:, count:] = self.residual.keys
        values[:, count:] = self.residual.values
        return keys, values

    def dense_element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    # -- bytes -----------------------------------------------------------------------------------------------------
    @property
    def held_bytes(self) -> int:
        """The window's codes, fp16 scales and zero points, plus the full-precision residual."""
        return sum(self._window(name).nbytes for name in CODE_FIELDS) + self.residual.held_bytes

    @property
    def live_bytes(self) -> int:
        """Equal to ``held_bytes``: a sliding layer has no padding."""
        return self.held_bytes

    @property
    def allocated_bytes(self) -> int:
        return sum(self._rows.tensors[name].nbytes for name in CODE_FIELDS) + self.residual.allocated_bytes

    def storages(self) -> list[torch.Tensor]:
        return [*self._rows.tensors.values(), *self.residual.storages()]

    # -- growth ----------------------------------------------------------------------------------------------------
    def reserve(self, extra_slots: int) -> None:
        keep = self.spec.retained_tokens or 0
        rows = min(extra_slots, keep)
        if self._end + rows > self._rows.capacity or self._end != self._rows.used:
            self._reallocate_rows(self.code_slots + rows)
        self.residual.reserve(extra_slots)

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        self.residual.append(keys, values, positions)

    def settle(self) -> None:
        """After a forward pass: drop what left the window (oldest code rows first), then quantize the residual's
        tokens beyond its newest ``residual_tokens``."""
        keep = self.spec.retained_tokens
        drop = self.slots - keep if keep is not None else 0
        if drop > 0:
            from_codes = min(drop, self.code_slots)
            self._start += from_codes
            self.residual = _without_oldest(self.residual, drop - from_codes)
        count = self.residual.slots - self.params.residual_tokens
        if count > 0:
            residual = self.residual
            new = encode_rows(residual.keys[:, :count], residual.values[:, :count], self.params)
            new["positions"] = residual.positions[:, :count]
            self._append_rows(new)
            self.residual = _without_oldest(residual, count)

    def _append_rows(self, new: dict[str, torch.Tensor]) -> None:
        count = new["positions"].shape[1]
        if self._end != self._rows.used or self._end + count > self._rows.capacity:
            wanted = self.code_slots + count
            self._reallocate_rows(wanted + max(MIN_SPARE_SLOTS, wanted // 16))
        end = self._end + count
        for name, tensor in new.items():
            self._rows.tensors[name][:, self._end:end] = tensor
        self._rows.used = self._end = end

    def _reallocate_rows(self, capacity: int) -> None:
        """Fresh storage with room for ``capacity`` rows holding this layer's window (forks keep the old one)."""
        count = self.code_slots
        tensors = {}
        for name, old in self._rows.tensors.items():
            tensor = old.new_empty((old.shape[0], capacity, *old.shape[2:]))
            tensor[:, :count] = old[:, self._start:self._end]
            tensors[name] = tensor
        self._rows, self._start, self._end = CodeRows(tensors, count), 0, count

    # -- copies ----------------------------------------------------------------------------------------------------
    def fork(self) -> QuantizedSlidingLayerCache:
        twin = object.__new__(QuantizedSlidingLayerCache)
        twin.__dict__.update(self.__dict__)
        twin.residual = self.residual.fork()
        return twin

    def clone(self) -> QuantizedSlidingLayerCache:
        rows = CodeRows({name: self._window(name).clone() for name in self._rows.tensors}, self.code_slots)
        return QuantizedSlidingLayerCache(self.spec, self.params, self.dtype, rows, self.residual.clone())

    def to(self, device: torch.device | str) -> QuantizedSlidingLayerCache:
        rows = CodeRows({name: self._window(name).to(device) for name in self._rows.tensors}, self.code_slots)
        return QuantizedSlidingLayerCache(self.spec, self.params, self.dtype, rows, self.residual.to(device))

    def dense(self) -> LayerCache:
        device = self.residual.positions.device
        keys, values = self._dequantize(torch.empty(self._shape, dtype=self.dtype, device=device),
                                        torch.empty(self._shape, dtype=self.dtype, device=device))
        return LayerCache(self.spec, keys, values, self.positions)


def encode_rows(keys: torch.Tensor, values: torch.Tensor, params: QuantizationParams) -> dict[str, torch.Tensor]:
    """Per-token codes, scales and zeros of keys and values (kv_heads, n, head_dim) → the ``CODE_FIELDS``.
    Keys and values go through one call (rows are independent), so a decode step checks the fp16 range once."""
    heads = keys.shape[0]
    codes, scales, zeros = quantize_value_block(torch.cat([keys, values]).float(), params)
    return {"key_codes": codes[:heads], "key_scales": scales[:heads], "key_zeros": zeros[:heads],
            "value_codes": codes[heads:], "value_scales": scales[heads:], "value_zeros": zeros[heads:]}


def _without_oldest(layer: LayerCache, count: int) -> LayerCache:
    """A fork of a plain layer less its oldest ``count`` slots (no copy; its storage is compacted on reallocation)."""
    if count <= 0:
        return layer
    rest = layer.fork()
    rest._start += count
    return rest
