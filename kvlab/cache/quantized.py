"""A KV cache layer that stays quantized while the model decodes on it (KIVI's scheme, see ``cache.quant``).

``QuantizedLayerCache`` is a ``LayerCache`` whose older tokens are held as integer codes with fp16 scales and zero
points (keys per channel over groups of ``group_size`` tokens, values per token over groups of channels) and whose
newest tokens sit in a 16-bit residual (``residual_dtype``), a plain growable ``LayerCache``. New tokens go to the
residual; after a forward pass (``settle``), while it holds ``residual_tokens + group_size`` slots or more, its oldest
``group_size`` slots are quantized as one more key group (KIVI's streaming rule). Attention dequantizes one layer at
a time, at each step, into a transient
tensor: the memory held between steps is the codes, the scales and the residual (``held_bytes``).

The slot order, shared by ``keys``, ``values``, ``positions`` and ``padding_free``, is the quantized block then the
residual. A head-wise (ragged) layer keeps each head's tokens packed to the front of both parts, as the ``.kv``
file stores them (``cache.quant.QuantizedLayer``); the rows a shorter head does not fill are padding. Building a
layer from such a file copies no keys or values: the codes are used as they are.

This scheme is for full-attention layers. A sliding-window layer holds at most ``window - 1`` tokens and drops one
per step, which would split key groups; ``quantize_in_memory`` holds it as per-token codes instead
(``cache.quantized_sliding.QuantizedSlidingLayerCache``). A quantized ``.kv`` file stores sliding layers with this
module's scheme; ``from_stored`` expands them to full precision (re-encoding them per token would quantize them
twice).
"""

from __future__ import annotations

import torch

from kvlab.cache.kvcache import PADDING_POSITION, KVCache, LayerCache
from kvlab.cache.quant import (
    SCRATCH,
    QuantizationParams,
    QuantizedKVCache,
    QuantizedLayer,
    dequantize_layer,
    quantize_key_block,
    quantize_layer,
    quantize_value_block,
    scale_per_token_into,
    split_counts,
    unpack_codes_into,
)
from kvlab.cache.quantized_sliding import QuantizedSlidingLayerCache

CODE_FIELDS = ("key_codes", "key_scales", "key_zeros", "value_codes", "value_scales", "value_zeros")


class QuantizedLayerCache(LayerCache):
    """A full-attention layer held as KIVI codes plus a 16-bit residual; see the module docstring."""

    quantized = True

    def __init__(self, stored: QuantizedLayer, params: QuantizationParams, dtype: torch.dtype,
                 held_residual: torch.dtype | None = None) -> None:
        if stored.spec.kind != "full":
            raise ValueError("only full-attention layers are held quantized in memory")
        self.spec = stored.spec
        self.params = params
        self.dtype = dtype
        self.codes = {name: getattr(stored, name) for name in CODE_FIELDS}
        valid, quantized = split_counts(stored.positions, params)
        front = _front_positions(stored.positions, valid)
        width = stored.key_codes.shape[1]
        if width > front.shape[1]:  # a partial last group (quantize_tail) runs past the slots: padding rows
            front = torch.nn.functional.pad(front, (0, width - front.shape[1]), value=PADDING_POSITION)
        rank = torch.arange(width, device=front.device)[None, :]
        self.code_positions = torch.where(rank < quantized[:, None], front[:, :width], PADDING_POSITION)
        self._code_valid = _mask_or_none(self.code_positions)
        residual_width = stored.residual_keys.shape[1]
        rank = torch.arange(residual_width, device=front.device)[None, :]
        index = (quantized[:, None] + rank).clamp(max=max(front.shape[1] - 1, 0))
        gathered = front.gather(1, index) if front.shape[1] else front[:, :0].expand(-1, residual_width)
        residual_positions = torch.where(rank < (valid - quantized)[:, None], gathered, PADDING_POSITION)
        held = held_residual or residual_dtype(dtype)
        self.residual = LayerCache(stored.spec, stored.residual_keys.to(held), stored.residual_values.to(held),
                                   residual_positions)

    @classmethod
    def from_layer(cls, layer: LayerCache, params: QuantizationParams,
                   held_residual: torch.dtype | None = None) -> QuantizedLayerCache:
        """Quantize a plain full-attention layer (the same arithmetic and layout as a ``.kv`` file)."""
        dense = layer.dense()
        return cls(quantize_layer(dense, params), params, dense.keys.dtype, held_residual)

    # -- views -----------------------------------------------------------------------------------------------------
    @property
    def code_slots(self) -> int:
        return self.codes["key_codes"].shape[1]

    @property
    def slots(self) -> int:
        return self.code_slots + self.residual.slots

    @property
    def positions(self) -> torch.Tensor:
        return torch.cat([self.code_positions, self.residual.positions], dim=1)

    @property
    def padding_free(self) -> torch.Tensor | None:
        codes, residual = self._code_valid, self.residual.padding_free
        if codes is None and residual is None:
            return None
        return torch.cat([_ones_if_none(codes, self.code_positions), _ones_if_none(residual, self.residual.positions)],
                         dim=1)

    @property
    def code_padding_free(self) -> torch.Tensor | None:
        """(H, code rows) bool of the code rows that hold a token, or None when all do."""
        return self._code_valid

    @property
    def keys(self) -> torch.Tensor:
        """Dequantized keys in fresh memory (attention reads ``attention_tensors`` instead)."""
        return self.dense().keys

    @property
    def values(self) -> torch.Tensor:
        return self.dense().values

    def attention_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized keys and values (kv_heads, slots, head_dim) in the compute dtype, written into this thread's
        scratch buffers: valid until the next layer asks (attention uses them at once; ``dense`` copies)."""
        return self._dequantize(SCRATCH.get(0, self._shape, self.dtype, self.code_positions.device),
                                SCRATCH.get(1, self._shape, self.dtype, self.code_positions.device))

    @property
    def _shape(self) -> tuple[int, int, int]:
        return (self.spec.kv_heads, self.slots, self.spec.head_dim)

    def _dequantize(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code_slots = self.code_slots
        if code_slots:
            dequantize_codes_into(self.codes, self.params, keys[:, :code_slots], values[:, :code_slots])
        keys[:, code_slots:] = self.residual.keys
        values[:, code_slots:] = self.residual.values
        return keys, values

    def dense_element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    # -- bytes -----------------------------------------------------------------------------------------------------
    @property
    def held_bytes(self) -> int:
        """Codes, fp16 scales and zero points, and the 16-bit residual (padding included)."""
        return sum(tensor.nbytes for tensor in self.codes.values()) + self.residual.held_bytes

    @property
    def live_bytes(self) -> int:
        """The held bytes less the residual's padding (code rows of padding cannot be told apart in a group)."""
        return sum(tensor.nbytes for tensor in self.codes.values()) + self.residual.live_bytes

    @property
    def allocated_bytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.codes.values()) + self.residual.allocated_bytes

    def storages(self) -> list[torch.Tensor]:
        return [*self.codes.values(), self.code_positions, *self.residual.storages()]

    # -- growth ----------------------------------------------------------------------------------------------------
    def reserve(self, extra_slots: int) -> None:
        self.residual.reserve(min(extra_slots, self.params.residual_tokens + self.params.group_size))

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        self.residual.append(keys, values, positions)

    def settle(self) -> None:
        """After a forward pass: quantize whole groups that have left the residual window (the new tokens were
        attended to unquantized during the pass, as in KIVI)."""
        group = self.params.group_size
        while self.residual.slots >= self.params.residual_tokens + group:
            self._quantize_oldest(group)

    def _quantize_oldest(self, count: int) -> None:
        """Move the residual's oldest ``count`` (= group_size) slots into the codes."""
        residual = self.residual
        keys, values = residual.keys[:, :count].float(), residual.values[:, :count].float()
        positions = residual.positions[:, :count]
        mask = residual.padding_free
        if mask is not None:  # padding rows take the mean of their head's real rows: no group's range widens
            real = mask[:, :count, None].to(keys.dtype)
            kept = real.sum(dim=1, keepdim=True).clamp(min=1)
            keys = torch.where(real.bool(), keys, (keys * real).sum(dim=1, keepdim=True) / kept)
            values = torch.where(real.bool(), values, (values * real).sum(dim=1, keepdim=True) / kept)
        key_codes, key_scales, key_zeros = quantize_key_block(keys, self.params)
        value_codes, value_scales, value_zeros = quantize_value_block(values, self.params)
        new = {"key_codes": key_codes, "key_scales": key_scales, "key_zeros": key_zeros, "value_codes": value_codes,
               "value_scales": value_scales, "value_zeros": value_zeros}
        # torch.cat makes new tensors, so forks that share the old codes are untouched
        self.codes = {name: torch.cat([self.codes[name], new[name]], dim=1) for name in CODE_FIELDS}
        self.code_positions = torch.cat([self.code_positions, positions], dim=1)
        self._code_valid = _mask_or_none(self.code_positions)
        rest = residual.fork()
        rest._start += count
        self.residual = LayerCache(self.spec, rest.keys, rest.values, rest.positions) if mask is not None else rest

    # -- copies ----------------------------------------------------------------------------------------------------
    def fork(self) -> QuantizedLayerCache:
        twin = object.__new__(QuantizedLayerCache)
        twin.__dict__.update(self.__dict__)
        twin.codes = dict(self.codes)
        twin.residual = self.residual.fork()
        return twin

    def clone(self) -> QuantizedLayerCache:
        twin = self.fork()
        twin.codes = {name: tensor.clone() for name, tensor in self.codes.items()}
        twin.code_positions = self.code_positions.clone()
        twin.residual = self.residual.clone()
        return twin

    def to(self, device: torch.device | str) -> QuantizedLayerCache:
        twin = self.fork()
        twin.codes = {name: tensor.to(device) for name, tensor in self.codes.items()}
        twin.code_positions = self.code_positions.to(device)
        twin._code_valid = _mask_or_none(twin.code_positions)
        twin.residual = self.residual.to(device)
        return twin

    def dense(self) -> LayerCache:
        device = self.code_positions.device
        keys, values = self._dequantize(torch.empty(self._shape, dtype=self.dtype, device=device),
                                        torch.empty(self._shape, dtype=self.dtype, device=device))
        return LayerCache(self.spec, keys, values, self.positions)


def residual_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a quantized layer holds its residual (newest tokens) in: 16 bits, as KIVI holds it at the model's
    fp16. A model computing in fp32 (on the CPU, where fp32 is faster) gets bfloat16 (fp32's range, so no key or
    value overflows); a 16-bit model keeps its own dtype. Attention reads the residual in the compute dtype."""
    return torch.bfloat16 if dtype == torch.float32 else dtype


def quantize_in_memory(cache: KVCache, params: QuantizationParams, *, sliding: bool = True,
                       held_residual: torch.dtype | None = None) -> KVCache:
    """The cache with every full-attention layer held quantized (KIVI) and, with ``sliding``, every sliding-window
    layer too (per-token codes, ``QuantizedSlidingLayerCache``); other layers and already quantized ones are
    shared as they are (forked). ``held_residual``: the residual's dtype (default ``residual_dtype``; tests pass
    the compute dtype to compare with a dequantized cache exactly)."""
    layers = []
    for layer in cache.layers:
        if layer.quantized or (layer.spec.kind == "sliding" and not sliding):
            layers.append(layer.fork())
        elif layer.spec.kind == "full":
            layers.append(layer.map_storage(
                lambda storage: QuantizedLayerCache.from_layer(storage, params, held_residual)))
        else:
            layers.append(QuantizedSlidingLayerCache.from_layer(layer, params))
    return KVCache(layers=layers, num_tokens=cache.num_tokens)


def from_stored(stored: QuantizedKVCache, held_residual: torch.dtype | None = None) -> KVCache:
    """A decodable cache from a quantized ``.kv`` payload: full layers keep their codes, sliding ones expand."""
    layers = [QuantizedLayerCache(layer, stored.params, stored.dtype, held_residual) if layer.spec.kind == "full"
              else dequantize_layer(layer, stored.params, stored.dtype) for layer in stored.layers]
    return KVCache(layers=layers, num_tokens=stored.num_tokens)


def quantization_of(cache: KVCache) -> QuantizationParams | None:
    """The parameters a cache's quantized layers were built with (None: nothing is quantized)."""
    for layer in cache.layers:
        storage = layer.storage
        if isinstance(storage, QuantizedLayerCache | QuantizedSlidingLayerCache):
            return storage.params
    return None


# -- helpers -----------------------------------------------------------------------------------------------------
def dequantize_codes_into(codes: dict[str, torch.Tensor], params: QuantizationParams, keys: torch.Tensor,
                          values: torch.Tensor) -> None:
    """Write the keys and values that ``codes`` (``CODE_FIELDS``, Q rows: whole key groups) encode into ``keys``
    and ``values`` (H, Q, D) in the compute dtype. Any whole groups may be passed: ``cache.paged`` hands in the
    groups (pages) a decode step selected."""
    heads, rows, dim = keys.shape
    group, dtype = params.group_size, keys.dtype
    unpack_codes_into(codes["key_codes"], params.bits, keys)
    grouped = keys.view(heads, rows // group, group, dim)
    torch.addcmul(codes["key_zeros"].to(dtype)[:, :, None, :], grouped, codes["key_scales"].to(dtype)[:, :, None, :],
                  out=grouped)
    unpack_codes_into(codes["value_codes"], params.bits, values)
    scale_per_token_into(values, codes["value_scales"], codes["value_zeros"], group)


def _front_positions(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(H, S): each head's real positions packed to the front in slot order, then padding."""
    mask = positions != PADDING_POSITION
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    packed = positions.gather(1, order)
    rank = torch.arange(positions.shape[1], device=positions.device)[None, :]
    return torch.where(rank < valid[:, None], packed, PADDING_POSITION)


def _mask_or_none(positions: torch.Tensor) -> torch.Tensor | None:
    mask = positions != PADDING_POSITION
    return mask if positions.numel() and not bool(mask.all()) else None


def _ones_if_none(mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
    return mask if mask is not None else torch.ones(positions.shape, dtype=torch.bool, device=positions.device)
