"""A cache as a flat dict of named tensors, back again, and the payload checksum over them.

Names (H = kv_heads, S = slots, D = head_dim):
  plain caches      layer.{i}.keys, layer.{i}.values (H, S, D) in the cache dtype; layer.{i}.positions (H, S) int32
                    on disk (int64 in memory: halving them saves about 4% of an int4 file)
  quantized caches  layer.{i}.positions plus the code, scale, zero and residual tensors of ``QuantizedLayer``
  both              last_logits (vocab,) float32, optional
Reading back validates every shape and dtype against the metadata's layout, so a file whose metadata and tensors
disagree is refused instead of producing a cache the engine would misread.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch

from kvlab.cache.kvcache import PADDING_POSITION, KVCache, LayerCache
from kvlab.cache.quant import QuantizedKVCache, QuantizedLayer, expected_shapes
from kvlab.errors import CacheMetadataError
from kvlab.store.meta import RECREATE, CacheMeta

LOGITS = "last_logits"
PLAIN_FIELDS = ("keys", "values", "positions")
QUANTIZED_FIELDS = tuple(f.name for f in dataclasses.fields(QuantizedLayer) if f.name != "spec")
CODE_FIELDS = ("key_codes", "value_codes")
STAT_FIELDS = ("key_scales", "key_zeros", "value_scales", "value_zeros")
POSITION_DTYPE = torch.int32  # positions are token indices, far below 2**31


def cache_to_tensors(cache: KVCache | QuantizedKVCache, last_logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies, ready for safetensors (which refuses views that share storage)."""
    fields = QUANTIZED_FIELDS if isinstance(cache, QuantizedKVCache) else PLAIN_FIELDS
    tensors = {}
    for index, layer in enumerate(cache.layers):
        for name in fields:
            tensor = getattr(layer, name).detach().to("cpu")
            if name == "positions":
                tensor = tensor.to(POSITION_DTYPE)
            tensors[f"layer.{index}.{name}"] = tensor.contiguous().clone()
    if last_logits is not None:
        tensors[LOGITS] = last_logits.detach().to("cpu", torch.float32).reshape(-1).contiguous().clone()
    return tensors


def payload_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors in sorted-name order: each name, dtype and shape, then its raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
    return digest.hexdigest()


def tensors_to_cache(meta: CacheMeta, tensors: dict[str, torch.Tensor], source: str
                     ) -> tuple[KVCache | QuantizedKVCache, torch.Tensor | None]:
    """Rebuild the cache described by ``meta``; raises CacheMetadataError on any disagreement."""
    fields = PLAIN_FIELDS if meta.quantization is None else QUANTIZED_FIELDS
    expected = {f"layer.{index}.{name}" for index in range(len(meta.layout)) for name in fields}
    names = set(tensors) - {LOGITS}
    if names != expected:
        missing, unexpected = sorted(expected - names), sorted(names - expected)
        detail = f"missing tensor {missing[0]}" if missing else f"unexpected tensor {unexpected[0]}"
        _fail(source, f"{detail} for its {len(meta.layout)}-layer layout")
    last_logits = tensors.get(LOGITS)
    if last_logits is not None and (last_logits.dim() != 1 or last_logits.dtype != torch.float32):
        _fail(source, "last_logits must be a 1-D float32 tensor")
    plain_layers: list[LayerCache] = []
    quantized_layers: list[QuantizedLayer] = []
    for index, spec in enumerate(meta.layout):
        layer = {name: tensors[f"layer.{index}.{name}"] for name in fields}
        layer["positions"] = _check_positions(layer["positions"], spec, meta.num_tokens, f"layer {index}", source)
        if meta.quantization is None:
            _check_plain(layer, spec, meta.torch_dtype, f"layer {index}", source)
            plain_layers.append(LayerCache(spec, layer["keys"], layer["values"], layer["positions"]))
        else:
            _check_quantized(layer, spec, meta, f"layer {index}", source)
            quantized_layers.append(QuantizedLayer(spec, **layer))
    if meta.quantization is None:
        return KVCache(layers=plain_layers, num_tokens=meta.num_tokens), last_logits
    return QuantizedKVCache(quantized_layers, meta.num_tokens, meta.quantization, meta.torch_dtype), last_logits


def _check_positions(stored: torch.Tensor, spec, num_tokens: int, where: str, source: str) -> torch.Tensor:
    """Validate the stored int32 positions and return them as int64."""
    if stored.dtype != POSITION_DTYPE or stored.dim() != 2 or stored.shape[0] != spec.kv_heads:
        _fail(source, f"{where} positions must be int32 of shape ({spec.kv_heads}, slots), "
                      f"got {stored.dtype} {tuple(stored.shape)}")
    positions = stored.long()
    valid = positions != PADDING_POSITION
    if bool(((positions < PADDING_POSITION) | (positions >= num_tokens)).any()):
        _fail(source, f"{where} has positions outside [0, {num_tokens}) that are not padding ({PADDING_POSITION})")
    # Kept tokens must appear in increasing position order within each head (padding may sit anywhere).
    running = torch.where(valid, positions, PADDING_POSITION).cummax(dim=-1).values
    previous = torch.cat([torch.full_like(running[:, :1], PADDING_POSITION), running[:, :-1]], dim=-1)
    if bool((valid & (positions <= previous)).any()):
        _fail(source, f"{where} positions are not increasing within each head")
    return positions


def _check_plain(layer: dict, spec, dtype: torch.dtype, where: str, source: str) -> None:
    shape = (spec.kv_heads, layer["positions"].shape[1], spec.head_dim)
    for name in ("keys", "values"):
        tensor = layer[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            _fail(source, f"{where} {name} are {tensor.dtype} {tuple(tensor.shape)}, the metadata says "
                          f"{dtype} {shape}")


def _check_quantized(layer: dict, spec, meta: CacheMeta, where: str, source: str) -> None:
    assert meta.quantization is not None  # only called for a quantized cache's metadata
    shapes = expected_shapes(spec, layer["positions"], meta.quantization)
    for name, shape in shapes.items():
        tensor = layer[name]
        dtype = (torch.uint8 if name in CODE_FIELDS else torch.float16 if name in STAT_FIELDS
                 else torch.int64 if name == "positions" else meta.torch_dtype)
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            _fail(source, f"{where} {name} is {tensor.dtype} {tuple(tensor.shape)}, the metadata implies "
                          f"{dtype} {shape}")


def _fail(source: str, problem: str) -> None:
    raise CacheMetadataError(f"{source}: metadata does not match the tensors ({problem}); {RECREATE}")
