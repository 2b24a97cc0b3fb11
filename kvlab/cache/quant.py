"""KIVI-style asymmetric integer quantization of a KVCache (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache", arXiv:2402.02750).

Each value x is stored as an unsigned code c = round((x - zero) / scale), clamped to [0, 2**bits - 1], and read back
as c * scale + zero, where zero is the group's minimum and scale = (max - min) / (2**bits - 1). As in KIVI:
  keys   are quantized per channel: one (scale, zero) per head_dim channel per group of ``group_size`` tokens, because
         key outliers sit in fixed channels;
  values are quantized per token: one (scale, zero) per token per group of ``group_size`` channels;
  the most recent tokens stay unquantized (the residual: the source dtype in a file, 16 bits in memory, see
  ``cache.quantized.residual_dtype``), because the next queries attend to them most.

Choices and deviations from the reference code (jy-yuan/KIVI), which quantizes a streaming cache on the GPU:
  - Schemes ``int8``, ``int4`` and ``int2`` (KIVI's paper centres on 2 bits). int4 packs two codes per uint8 byte
    (even channel in the low nibble), int2 four (channel 4k + i in bits 2i and 2i + 1).
  - One token split serves keys and values: per head, the oldest ``q`` valid tokens are quantized, where ``q`` is
    the largest multiple of ``group_size`` not exceeding ``valid - residual_tokens``; the rest (between
    ``residual_tokens`` and ``residual_tokens + group_size - 1`` tokens, or all of them in a short head) is the
    residual. KIVI sends the tokens that do not fill a key group to the residual too, but keeps exactly
    ``residual_tokens`` values; sharing the split keeps one residual tensor pair and one boundary per head.
  - Opt-in (``quantize_tail``, label ``int4:r0:tail``), with no residual: the last key group may be partial, its
    per-channel range taken over its real rows and its missing rows padding, so nothing stays in full precision.
    At 1K tokens and a 3/8 budget the fp32 tail was ~12% of the held bytes (kvzip @ 0.625 + int4:r0 then holds
    0.120 of the fp16 full cache instead of 0.127). A padded group costs about as much as 5 fp32 tokens at
    SmolLM2's shapes (group 32, head_dim 64), so a tail that short holds a few hundred bytes more; an average tail
    (half a group) holds ~3x less. Not the default: on 16 RULER samples it scored 0.616 where the full cache
    scored 0.766 (``benchmarks/results/agnostic_smollm2_tail``), too few to tell from noise, and below what the
    fp32 tail scored on another run. Files record it only when set.
  - A head_dim that ``group_size`` does not divide gets a smaller last value group (min/max over the real channels).
  - Scales and zero points are fp16, as in KIVI (fp32 would add half again to int4's bytes at group 32). The zero
    point is rounded down and the scale up to fp16, and codes are computed against those stored values, so every
    element's error stays within scale / 2 of its stored scale. A cache whose values exceed fp16's range (65504)
    is refused.
  - Ragged layers: valid slots are packed to the front of each head before the split and scattered back to their
    original slots after dequantization; padding slots come back as zeros.

Byte accounting (``nbytes``) counts the codes, the scales and zero points and the residual; positions are metadata
and are not counted, exactly as ``KVCache.allocated_bytes`` does not count them.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from kvlab.cache.kvcache import PADDING_POSITION, KVCache, LayerCache
from kvlab.cache.layout import LayerSpec
from kvlab.errors import ParameterError

SCHEME_BITS = {"int8": 8, "int4": 4, "int2": 2}
DEFAULT_GROUP_SIZE = 32
DEFAULT_RESIDUAL_TOKENS = 32
SCALE_DTYPE = torch.float16
FP16_MAX = torch.finfo(torch.float16).max


@dataclass(frozen=True)
class QuantizationParams:
    """``group_size``: tokens per key group and channels per value group; ``residual_tokens``: recent tokens per
    head kept in full precision; ``quantize_tail``: with no residual, quantize a last partial key group too
    (opt-in; otherwise its tokens stay in full precision)."""

    scheme: str
    group_size: int = DEFAULT_GROUP_SIZE
    residual_tokens: int = DEFAULT_RESIDUAL_TOKENS
    quantize_tail: bool = False

    def __post_init__(self) -> None:
        if self.scheme not in SCHEME_BITS:
            raise ParameterError(f"unknown quantization scheme {self.scheme!r}; use one of {', '.join(SCHEME_BITS)}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ParameterError(f"quantization group_size must be a positive integer (tokens per key group, "
                                 f"channels per value group; default {DEFAULT_GROUP_SIZE}), got {self.group_size!r}")
        if (isinstance(self.residual_tokens, bool) or not isinstance(self.residual_tokens, int)
                or self.residual_tokens < 0):
            raise ParameterError(f"quantization residual_tokens must be an integer >= 0 (recent tokens kept in full "
                                 f"precision; default {DEFAULT_RESIDUAL_TOKENS}), got {self.residual_tokens!r}")
        if not isinstance(self.quantize_tail, bool):
            raise ParameterError(f"quantization quantize_tail must be true or false, got {self.quantize_tail!r}")
        if self.quantize_tail and self.residual_tokens:
            raise ParameterError("quantize_tail needs residual_tokens=0 (a residual already holds the last tokens)")

    @property
    def bits(self) -> int:
        return SCHEME_BITS[self.scheme]

    def to_dict(self) -> dict:
        """The stored form; ``quantize_tail`` only when set, so files and store keys made before it stay valid."""
        data = {"scheme": self.scheme, "group_size": self.group_size, "residual_tokens": self.residual_tokens}
        return {**data, "quantize_tail": True} if self.quantize_tail else data

    @property
    def label(self) -> str:
        """The short form ``parse_quantization`` reads back: ``int4``, ``int4:g64``, ``int4:r0``, ``int2:g64:r8``,
        ``int4:r0:tail``."""
        parts = [self.scheme]
        if self.group_size != DEFAULT_GROUP_SIZE:
            parts.append(f"g{self.group_size}")
        if self.residual_tokens != DEFAULT_RESIDUAL_TOKENS:
            parts.append(f"r{self.residual_tokens}")
        if self.quantize_tail:
            parts.append("tail")
        return ":".join(parts)


def parse_quantization(label: str) -> QuantizationParams:
    """``SCHEME[:gGROUP][:rRESIDUAL][:tail]``, e.g. ``int4``, ``int4:r0`` (no full-precision residual),
    ``int2:g64:r8`` or ``int4:r0:tail`` (a last partial key group quantized too)."""
    scheme, *options = label.strip().lower().split(":")
    settings = {"group_size": DEFAULT_GROUP_SIZE, "residual_tokens": DEFAULT_RESIDUAL_TOKENS}
    tail = "tail" in options
    options = [option for option in options if option != "tail"]
    for option in options:
        name = {"g": "group_size", "r": "residual_tokens"}.get(option[:1])
        if name is None or not option[1:].isdigit():
            raise ParameterError(f"cannot read quantization {label!r}: write SCHEME[:gGROUP][:rRESIDUAL][:tail], "
                                 f"e.g. int4, int4:r0 or int2:g64:r8")
        settings[name] = int(option[1:])
    return QuantizationParams(scheme, group_size=settings["group_size"], residual_tokens=settings["residual_tokens"],
                              quantize_tail=tail)


@dataclass
class QuantizedLayer:
    """One layer. H = kv_heads, S = slots, D = head_dim, Q = quantized slots (a multiple of group_size), R = residual
    slots, D' = ceil(D * bits / 8), G = ceil(D / group_size) value groups per token.

    positions (H, S) int64 exactly as in the source LayerCache; key_codes, value_codes (H, Q, D') uint8;
    key_scales, key_zeros (H, Q / group_size, D) fp16; value_scales, value_zeros (H, Q, G) fp16;
    residual_keys, residual_values (H, R, D) in the source dtype. Head h's valid tokens are, in slot order, its
    first ``q_h`` quantized rows then its first ``valid_h - q_h`` residual rows (see ``split_counts``).
    """

    spec: LayerSpec
    positions: torch.Tensor
    key_codes: torch.Tensor
    key_scales: torch.Tensor
    key_zeros: torch.Tensor
    value_codes: torch.Tensor
    value_scales: torch.Tensor
    value_zeros: torch.Tensor
    residual_keys: torch.Tensor
    residual_values: torch.Tensor

    @property
    def payload_bytes(self) -> int:
        """Bytes of the packed integer codes."""
        return self.key_codes.nbytes + self.value_codes.nbytes

    @property
    def overhead_bytes(self) -> int:
        """Bytes of the fp16 scales and zero points."""
        return sum(t.nbytes for t in (self.key_scales, self.key_zeros, self.value_scales, self.value_zeros))

    @property
    def residual_bytes(self) -> int:
        """Bytes of the full-precision residual keys and values."""
        return self.residual_keys.nbytes + self.residual_values.nbytes

    @property
    def nbytes(self) -> int:
        """KV bytes this layer occupies: codes + scales and zeros + residual (positions not counted)."""
        return self.payload_bytes + self.overhead_bytes + self.residual_bytes


@dataclass
class QuantizedKVCache:
    """A quantized KVCache; ``dtype`` is the source cache's dtype, restored by ``dequantize_cache``."""

    layers: list[QuantizedLayer]
    num_tokens: int
    params: QuantizationParams
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """KV bytes over all layers (see ``QuantizedLayer.nbytes``)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def payload_bytes(self) -> int:
        return sum(layer.payload_bytes for layer in self.layers)

    @property
    def overhead_bytes(self) -> int:
        return sum(layer.overhead_bytes for layer in self.layers)

    @property
    def residual_bytes(self) -> int:
        return sum(layer.residual_bytes for layer in self.layers)


def split_counts(positions: torch.Tensor, params: QuantizationParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head: (valid tokens, quantized rows), each (H,) int64. Quantized = the largest multiple of
    ``group_size`` <= valid - residual_tokens (at least 0); with ``quantize_tail``, valid rounded up to a whole
    group (the rows past ``valid`` are padding)."""
    valid = (positions != PADDING_POSITION).sum(dim=-1)
    if params.quantize_tail:
        return valid, -(-valid // params.group_size) * params.group_size
    groups = (valid - params.residual_tokens).clamp(min=0) // params.group_size
    return valid, groups * params.group_size


def expected_shapes(spec: LayerSpec, positions: torch.Tensor, params: QuantizationParams) -> dict[str, tuple]:
    """The shape each tensor of a QuantizedLayer must have, given its positions (used to validate loaded files)."""
    heads, dim, group = spec.kv_heads, spec.head_dim, params.group_size
    valid, quantized = split_counts(positions, params)
    q_slots = int(quantized.max()) if heads else 0
    r_slots = int((valid - quantized).clamp(min=0).max()) if heads else 0
    packed = packed_width(dim, params.bits)
    return {
        "positions": (heads, positions.shape[-1]),
        "key_codes": (heads, q_slots, packed), "value_codes": (heads, q_slots, packed),
        "key_scales": (heads, q_slots // group, dim), "key_zeros": (heads, q_slots // group, dim),
        "value_scales": (heads, q_slots, math.ceil(dim / group)),
        "value_zeros": (heads, q_slots, math.ceil(dim / group)),
        "residual_keys": (heads, r_slots, dim), "residual_values": (heads, r_slots, dim),
    }


def quantize_cache(cache: KVCache, scheme: str, group_size: int = DEFAULT_GROUP_SIZE,
                   residual_tokens: int = DEFAULT_RESIDUAL_TOKENS,
                   quantize_tail: bool = False) -> QuantizedKVCache:
    """Quantize every layer (full and sliding) of ``cache``; ``cache`` is left untouched.

    Raises ParameterError for an unknown scheme, a group size < 1, residual_tokens < 0, or values that are not
    finite or exceed the fp16 range of the scales.
    """
    params = QuantizationParams(scheme, group_size, residual_tokens, quantize_tail)
    dtype = cache.layers[0].keys.dtype if cache.layers else torch.float32
    layers = [quantize_layer(layer, params) for layer in cache.layers]
    return QuantizedKVCache(layers=layers, num_tokens=cache.num_tokens, params=params, dtype=dtype)


def dequantize_cache(quantized: QuantizedKVCache) -> KVCache:
    """The KVCache back: same layers, positions and slot shapes, in the source dtype; padding slots are zeros."""
    layers = [dequantize_layer(layer, quantized.params, quantized.dtype) for layer in quantized.layers]
    return KVCache(layers=layers, num_tokens=quantized.num_tokens)


# -- one layer ---------------------------------------------------------------------------------------------------
def quantize_layer(layer: LayerCache, params: QuantizationParams) -> QuantizedLayer:
    heads, slots, dim = layer.keys.shape
    valid, quantized = split_counts(layer.positions, params)
    front = _front_mask(valid, slots)
    q_slots = int(quantized.max()) if heads else 0
    r_slots = int((valid - quantized).clamp(min=0).max()) if heads else 0
    keys, values = _pack_front(layer.keys, layer.valid, front), _pack_front(layer.values, layer.valid, front)
    if q_slots > slots:  # a partial last group (quantize_tail) runs past the layer's slots: padding rows
        keys, values = (torch.nn.functional.pad(tensor, (0, 0, 0, q_slots - slots)) for tensor in (keys, values))
    for name, tensor in (("keys", keys), ("values", values)):
        if not bool(torch.isfinite(tensor).all()):
            raise ParameterError(f"cannot quantize a cache whose {name} hold NaN or inf; recompute the cache")
    # Rows that hold no token of the head (past its quantized rows, or past its valid ones in a partial last group)
    # are zeroed, which keeps the file deterministic, and take no part in their key group's range.
    real = torch.arange(q_slots, device=keys.device)[None, :] < torch.minimum(quantized, valid)[:, None]
    key_block = keys[:, :q_slots].float() * real[..., None]
    value_block = values[:, :q_slots].float() * real[..., None]
    key_codes, key_scales, key_zeros = quantize_key_block(key_block, params, real)
    value_codes, value_scales, value_zeros = quantize_value_block(value_block, params)
    residual_keys = _take_residual(keys, quantized, valid, r_slots)
    residual_values = _take_residual(values, quantized, valid, r_slots)
    return QuantizedLayer(layer.spec, layer.positions.clone(), key_codes, key_scales, key_zeros, value_codes,
                          value_scales, value_zeros, residual_keys, residual_values)


def dequantize_layer(layer: QuantizedLayer, params: QuantizationParams, dtype: torch.dtype) -> LayerCache:
    heads, slots = layer.positions.shape
    dim = layer.spec.head_dim
    valid, quantized = split_counts(layer.positions, params)
    group = params.group_size
    key_codes = unpack_codes(layer.key_codes, params.bits, dim).float()
    value_codes = unpack_codes(layer.value_codes, params.bits, dim).float()
    keys_q = key_codes * _expand(layer.key_scales, group, 1) + _expand(layer.key_zeros, group, 1)
    values_q = (value_codes * _expand(layer.value_scales, group, 2)[..., :dim]
                + _expand(layer.value_zeros, group, 2)[..., :dim])
    keys = _join_front(keys_q, layer.residual_keys.float(), quantized, valid, slots)
    values = _join_front(values_q, layer.residual_values.float(), quantized, valid, slots)
    mask = layer.positions != PADDING_POSITION
    front = _front_mask(valid, slots)
    out_keys = torch.zeros((heads, slots, dim), dtype=dtype, device=layer.positions.device)
    out_values = torch.zeros_like(out_keys)
    out_keys[mask] = keys[front].to(dtype)
    out_values[mask] = values[front].to(dtype)
    return LayerCache(layer.spec, out_keys, out_values, layer.positions.clone())


# -- the arithmetic ----------------------------------------------------------------------------------------------
def quantize_key_block(block: torch.Tensor, params: QuantizationParams, real: torch.Tensor | None = None):
    """Per channel: block (H, Q, D) float32 → codes (H, Q, D'), scales and zeros (H, Q / group, D). ``real`` (H, Q)
    bool, if given, marks the rows whose range counts; a group with none gets scale and zero 0."""
    heads, q_slots, dim = block.shape
    shape = (heads, q_slots // params.group_size, params.group_size, dim)
    if real is None:
        low = high = block.reshape(shape)
    else:
        rows = real[..., None]
        low = torch.where(rows, block, float("inf")).reshape(shape)
        high = torch.where(rows, block, float("-inf")).reshape(shape)
    minimum, maximum = low.amin(dim=2), high.amax(dim=2)
    if real is not None:
        empty = ~torch.isfinite(minimum)
        minimum, maximum = minimum.masked_fill(empty, 0.0), maximum.masked_fill(empty, 0.0)
    scale, zero = _scale_and_zero(minimum, maximum, params.bits)
    codes = _encode(block, _expand(scale, params.group_size, 1), _expand(zero, params.group_size, 1), params.bits)
    return pack_codes(codes, params.bits), scale, zero


def quantize_value_block(block: torch.Tensor, params: QuantizationParams):
    """Per token: block (H, Q, D) float32 → codes (H, Q, D'), scales and zeros (H, Q, ceil(D / group))."""
    heads, q_slots, dim = block.shape
    group = params.group_size
    width = math.ceil(dim / group) * group
    # Padding channels take +inf for the minimum and -inf for the maximum, so they never set a group's range.
    grouped = (heads, q_slots, width // group, group)
    low = torch.nn.functional.pad(block, (0, width - dim), value=float("inf")).reshape(grouped)
    high = torch.nn.functional.pad(block, (0, width - dim), value=float("-inf")).reshape(grouped)
    scale, zero = _scale_and_zero(low.amin(dim=-1), high.amax(dim=-1), params.bits)
    codes = _encode(block, _expand(scale, group, 2)[..., :dim], _expand(zero, group, 2)[..., :dim], params.bits)
    return pack_codes(codes, params.bits), scale, zero


def _scale_and_zero(minimum: torch.Tensor, maximum: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) with zero <= minimum and zero + (2**bits - 1) * scale >= maximum, so no code clips."""
    if minimum.numel() and float(torch.maximum(minimum.abs().max(), maximum.abs().max())) > FP16_MAX / 2:
        raise ParameterError("cache values exceed the fp16 range of KIVI's scales (|x| > 32752); "
                             "quantization is not available for this model")
    zero = _round_fp16(minimum, down=True)
    scale = _round_fp16((maximum - zero.float()) / (2 ** bits - 1), down=False)
    return scale, zero


def _round_fp16(values: torch.Tensor, *, down: bool) -> torch.Tensor:
    """Round float32 to fp16 towards -inf (down) or +inf (up)."""
    rounded = values.to(SCALE_DTYPE)
    wrong_side = rounded.float() > values if down else rounded.float() < values
    target = torch.full_like(rounded, float("-inf") if down else float("inf"))
    return torch.where(wrong_side, torch.nextafter(rounded, target), rounded)


def _encode(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes in [0, 2**bits - 1]; a zero scale (constant group) encodes everything as 0."""
    step = scale.float()
    codes = (x - zero.float()) / torch.where(step > 0, step, torch.ones_like(step))
    return codes.round().clamp(0, 2 ** bits - 1).to(torch.uint8)


def _expand(stats: torch.Tensor, group: int, dim: int) -> torch.Tensor:
    """Repeat each per-group statistic ``group`` times along ``dim`` (float32)."""
    return stats.float().repeat_interleave(group, dim=dim)


def packed_width(dim: int, bits: int) -> int:
    """Bytes per row of ``dim`` codes at ``bits`` bits."""
    return math.ceil(dim * bits / 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """8 / bits codes per byte along the last dim, code i of a byte in bits [bits * i, bits * (i + 1)) (int4: the
    even channel in the low nibble); int8: unchanged."""
    if bits == 8:
        return codes
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        codes = torch.nn.functional.pad(codes, (0, per_byte - codes.shape[-1] % per_byte))
    packed = codes[..., 0::per_byte].clone()
    for index in range(1, per_byte):
        packed |= codes[..., index::per_byte] << (bits * index)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    if bits == 8:
        return packed
    per_byte, low = 8 // bits, (1 << bits) - 1
    parts = torch.stack([(packed >> (bits * index)) & low for index in range(per_byte)], dim=-1)
    return parts.reshape(*packed.shape[:-1], per_byte * packed.shape[-1])[..., :dim]


# -- slot bookkeeping --------------------------------------------------------------------------------------------
def _front_mask(valid: torch.Tensor, slots: int) -> torch.Tensor:
    """(H, S) bool: the first ``valid[h]`` slots of each head."""
    return torch.arange(slots, device=valid.device)[None, :] < valid[:, None]


def _pack_front(tensor: torch.Tensor, mask: torch.Tensor, front: torch.Tensor) -> torch.Tensor:
    """Move each head's valid slots (in slot order) to its first slots; the rest are zeros."""
    packed = torch.zeros_like(tensor)
    packed[front] = tensor[mask]  # boolean indexing walks heads then slots, so order is kept on both sides
    return packed


def _take_residual(front: torch.Tensor, quantized: torch.Tensor, valid: torch.Tensor, r_slots: int) -> torch.Tensor:
    """(H, r_slots, D): head h's front slots [quantized[h], valid[h]), left-aligned, zero-padded."""
    heads, slots, dim = front.shape
    rank = torch.arange(r_slots, device=front.device)[None, :]
    index = (quantized[:, None] + rank).clamp(max=max(slots - 1, 0))
    taken = front.gather(1, index[..., None].expand(-1, -1, dim)) if slots else front.new_zeros((heads, 0, dim))
    return (taken * (rank < (valid - quantized)[:, None])[..., None]).contiguous()


def _join_front(quantized_rows: torch.Tensor, residual: torch.Tensor, quantized: torch.Tensor, valid: torch.Tensor,
                slots: int) -> torch.Tensor:
    """Inverse of the split: (H, S, D) float32 with head h's quantized rows, then its residual rows, then zeros."""
    quantized_rows = quantized_rows[:, :slots]  # rows past the slots (a partial last group's padding) hold nothing
    heads, q_slots, dim = quantized_rows.shape
    slot = torch.arange(slots, device=quantized_rows.device)[None, :]
    from_quantized = torch.cat([quantized_rows, quantized_rows.new_zeros((heads, slots - q_slots, dim))], dim=1)
    if residual.shape[1]:
        index = (slot - quantized[:, None]).clamp(0, residual.shape[1] - 1)
        from_residual = residual.gather(1, index[..., None].expand(-1, -1, dim))
    else:
        from_residual = torch.zeros_like(from_quantized)
    joined = torch.where((slot < quantized[:, None])[..., None], from_quantized, from_residual)
    return joined * (slot < valid[:, None])[..., None]


# -- dequantizing into preallocated memory (layers held quantized while decoding, ``cache.quantized``) ------
def unpack_codes_into(packed: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Write the codes of ``packed`` (H, Q, ceil(D * bits / 8)) uint8 into ``out`` (H, Q, D), converting as it
    copies: code i of each byte goes to channels i, i + per_byte, ... (the packing of ``pack_codes``)."""
    if bits == 8:
        out.copy_(packed)
        return
    per_byte, low = 8 // bits, (1 << bits) - 1
    dim = out.shape[-1]
    if dim % per_byte:
        out.copy_(unpack_codes(packed, bits, dim))
        return
    lanes = out.view(*out.shape[:-1], dim // per_byte, per_byte)
    for index in range(per_byte):
        lanes[..., index].copy_((packed >> (bits * index)) & low if index else packed & low)


def scale_per_token_into(rows: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> None:
    """In place: codes (H, Q, D) in the compute dtype times their per-token, per-channel-group scale, plus zero."""
    heads, slots, dim = rows.shape
    if dim % group == 0:
        grouped = rows.view(heads, slots, dim // group, group)
        torch.addcmul(zeros.to(rows.dtype)[..., None], grouped, scales.to(rows.dtype)[..., None], out=grouped)
        return
    scale = scales.to(rows.dtype).repeat_interleave(group, dim=2)[..., :dim]
    zero = zeros.to(rows.dtype).repeat_interleave(group, dim=2)[..., :dim]
    torch.addcmul(zero, rows, scale, out=rows)


class ScratchBuffers(threading.local):
    """Per-thread reusable storage for dequantized keys and values: a fresh multi-megabyte tensor per layer and
    step would be page-faulted in every time, which costs more than the dequantization itself."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, slot: int, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        count = shape[0] * shape[1] * shape[2]
        key = (slot, dtype, device)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < count:
            buffer = torch.empty(count + count // 4, dtype=dtype, device=device)
            self.buffers[key] = buffer
        return buffer[:count].view(shape)


SCRATCH = ScratchBuffers()  # shared by every quantized layer kind: one pair of buffers per thread
