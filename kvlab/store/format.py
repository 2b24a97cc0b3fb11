"""The ``.kv`` file: one compressed KV cache as a safetensors file that describes and verifies itself.

Layout: the standard safetensors framing (8-byte little-endian header length, JSON header, tensor bytes), read with
``safetensors.safe_open`` (which checks that framing), whose ``__metadata__`` holds exactly one key, ``kvlab``: the
CacheMeta JSON (see ``meta.py``). Tensor names are listed in
``tensors.py``. Writing is atomic (``atomic.py``). Reading refuses, with one line naming the file and the fix:
a missing path or a directory, a file that is empty, truncated, padded or not safetensors, one without kvlab
metadata, a newer format, a metadata or payload checksum mismatch, metadata that fails validation or disagrees with
the tensors, and a file made for another model or tokenizer. No safetensors exception escapes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open

from kvlab.cache.kvcache import KVCache
from kvlab.cache.quant import QuantizedKVCache
from kvlab.cache.quantized import from_stored
from kvlab.errors import (
    CacheChecksumError,
    CacheMismatchError,
    CorruptCacheError,
    MissingCacheFileError,
    ParameterError,
)
from kvlab.fileio import atomic_write_bytes
from kvlab.models import LoadedModel
from kvlab.models.fingerprint import tokenizer_fingerprint
from kvlab.policies import POLICIES, make_policy, policy_class
from kvlab.policies.base import Policy
from kvlab.store.meta import RECREATE, CacheMeta, dtype_name
from kvlab.store.tensors import cache_to_tensors, payload_sha256, tensors_to_cache

FILE_SUFFIX = ".kv"
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
METADATA_KEY = "kvlab"


@dataclass
class LoadedCache:
    """A verified cache, ready to decode on: a quantized file's full-attention layers stay quantized in memory
    (``cache.quantized.QuantizedLayerCache``); ``last_logits`` (vocab,) fp32 or None; ``file_bytes`` is the file's
    size on disk."""

    cache: KVCache
    meta: CacheMeta
    last_logits: torch.Tensor | None
    file_bytes: int


def meta_for(loaded: LoadedModel, cache: KVCache | QuantizedKVCache, *, text: str, policy: Policy,
             ratio: float | None, budget_tokens: int, query_aware: bool, context_tokens: int,
             extra: dict | None = None) -> CacheMeta:
    """CacheMeta for ``cache`` made by ``loaded`` from ``text`` (the prefilled text) with ``policy``."""
    dtype = (cache.dtype if isinstance(cache, QuantizedKVCache)
             else cache.layers[0].keys.dtype if cache.layers else loaded.dtype)
    return CacheMeta(
        model=loaded.name, model_fingerprint=loaded.fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint(loaded.tokenizer), policy=policy.name,
        policy_params=policy.params(), ratio=ratio, budget_tokens=budget_tokens, query_aware=query_aware,
        context_tokens=context_tokens, num_tokens=cache.num_tokens,
        layout=tuple(layer.spec for layer in cache.layers), dtype=dtype_name(dtype),
        quantization=cache.params if isinstance(cache, QuantizedKVCache) else None,
        text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        extra={**({"extension": loaded.extension_label} if loaded.extension_label else {}), **(extra or {})},
    )


def save_cache(path: str | Path, cache: KVCache | QuantizedKVCache, meta: CacheMeta,
               last_logits: torch.Tensor | None = None) -> int:
    """Write ``cache`` atomically to ``path``; returns the bytes written. ``meta.payload_sha256`` is filled in here.

    Raises ParameterError when ``meta`` does not describe ``cache`` (layers, token count, dtype, quantization).
    """
    _check_meta_describes(meta, cache)
    tensors = cache_to_tensors(cache, last_logits)
    meta = dataclasses.replace(meta, payload_sha256=payload_sha256(tensors))
    data = safetensors.torch.save(tensors, metadata={METADATA_KEY: meta.to_json()})
    return atomic_write_bytes(Path(path), data)


def read_meta(path: str | Path) -> CacheMeta:
    """The verified metadata alone, reading only the header (cheap: no tensor bytes are read or hashed)."""
    path = Path(path)
    _file_size(path)
    with _safe_open(path) as handle:
        return _meta_of(handle, path)


def load_cache(path: str | Path, *, expected_model_fingerprint: str | None = None,
               expected_tokenizer_fingerprint: str | None = None, expected_model_name: str | None = None,
               expected_extension: str | None = None, device: str | torch.device = "cpu") -> LoadedCache:
    """Read, verify and rebuild a cache. ``expected_*`` fingerprints (from ``LoadedModel.fingerprint`` and
    ``tokenizer_fingerprint``) are compared with the file's; ``expected_extension`` (``LoadedModel.extension_label``,
    "" for none) is the context extension the model runs with: a cache made with another one is refused with the
    flag to pass; ``expected_model_name`` only improves the message."""
    path = Path(path)
    size = _file_size(path)
    with _safe_open(path) as handle:
        meta = _meta_of(handle, path)
        if expected_extension is not None:
            _check_extension(meta, path, expected_extension)
        _check_fingerprints(meta, path, expected_model_fingerprint, expected_tokenizer_fingerprint,
                            expected_model_name)
        mapping = None
        try:
            if _arranges(meta):  # a paged cache is read where it lies: decoding touches only the pages it selects
                tensors, mapping = _mapped_tensors(path)
            else:
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:  # safetensors raises its own error types and others; none may escape raw
            raise CorruptCacheError(f"{path} is truncated or corrupted ({_first_line(error)}); {RECREATE}") from None
    if payload_sha256(tensors) != meta.payload_sha256:
        raise CacheChecksumError(f"{path} failed its payload checksum: the tensor data was modified or damaged; "
                                 f"{RECREATE}")
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)  # the checksum read every page: give them back to the page cache
    cache, last_logits = tensors_to_cache(meta, tensors, str(path))
    if isinstance(cache, QuantizedKVCache):
        cache = from_stored(cache)  # full-attention layers stay quantized in memory: nothing is expanded
    cache = _arranged(meta, cache)
    cache = _to_device(cache, torch.device(device))
    logits = None if last_logits is None else last_logits.to(device)
    return LoadedCache(cache=cache, meta=meta, last_logits=logits, file_bytes=size)


# -- header --------------------------------------------------------------------------------------------------
def _file_size(path: Path) -> int:
    if path.is_dir():
        raise MissingCacheFileError(f"{path} is a directory, not a kvlab cache file; pass the path of a "
                                    f"{FILE_SUFFIX} file")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise MissingCacheFileError(f"no cache file at {path}; check the path or create one with "
                                    f"`kvlab compress`") from None
    except OSError as error:
        raise MissingCacheFileError(f"cannot read {path} ({error.strerror}); check the path and its "
                                    f"permissions") from None
    if size == 0:
        raise CorruptCacheError(f"{path} is empty (0 bytes), not a kvlab cache file; {RECREATE}")
    return size


def _safe_open(path: Path):
    """``safetensors.safe_open`` on ``path``: it checks the framing (a header whose tensors exactly cover the rest of
    the file, no overlaps, known dtypes) and reads tensors on demand. Its errors become one-line kvlab errors."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except PermissionError as error:
        raise MissingCacheFileError(f"cannot read {path} ({error.strerror}); check the path and its "
                                    f"permissions") from None
    except FileNotFoundError:
        raise MissingCacheFileError(f"no cache file at {path}; check the path or create one with "
                                    f"`kvlab compress`") from None
    except Exception as error:  # safetensors raises its own error types and others; none may escape raw
        raise CorruptCacheError(f"{path} is truncated or corrupted ({_first_line(error)}); {RECREATE}") from None


def _meta_of(handle, path: Path) -> CacheMeta:
    """The CacheMeta in an open file's ``__metadata__``, which must hold exactly the ``kvlab`` key."""
    metadata = handle.metadata()
    if not isinstance(metadata, dict) or set(metadata) != {METADATA_KEY} or not isinstance(
            metadata[METADATA_KEY], str):
        raise CorruptCacheError(f"{path} is not a kvlab cache file (no kvlab metadata in its header); create one "
                                f"with `kvlab compress`")
    return CacheMeta.from_json(metadata[METADATA_KEY], str(path))


# -- checks --------------------------------------------------------------------------------------------------
def _check_extension(meta: CacheMeta, path: Path, loaded: str) -> None:
    """Keys rotated under one context extension mean something else under another: refuse, naming the flag."""
    made_with = str(meta.extra.get("extension", ""))
    if made_with == loaded:
        return
    if made_with:
        raise CacheMismatchError(f"{path} was made with --extend {made_with}; pass --extend {made_with} to use it"
                                 + (f" (the model runs with --extend {loaded})" if loaded else ""))
    raise CacheMismatchError(f"{path} was made without context extension; drop --extend {loaded} to use it, or "
                             f"recompress the document with it")


def _check_fingerprints(meta: CacheMeta, path: Path, model_fingerprint: str | None,
                        tokenizer: str | None, model_name: str | None) -> None:
    if model_fingerprint is not None and model_fingerprint != meta.model_fingerprint:
        loaded = f"{model_name} (fingerprint {model_fingerprint})" if model_name else (
            f"a different model (fingerprint {model_fingerprint})")
        raise CacheMismatchError(f"{path} was made for model {meta.model} (fingerprint {meta.model_fingerprint}), "
                                 f"but the loaded model is {loaded}; pass --model {meta.model} or recompress")
    if tokenizer is not None and tokenizer != meta.tokenizer_fingerprint:
        raise CacheMismatchError(f"{path} was made with tokenizer {meta.tokenizer_fingerprint}, but the loaded "
                                 f"model's tokenizer is {tokenizer}; use the model it was made with "
                                 f"({meta.model}) or recompress")


def _check_meta_describes(meta: CacheMeta, cache: KVCache | QuantizedKVCache) -> None:
    dtype = (cache.dtype if isinstance(cache, QuantizedKVCache)
             else cache.layers[0].keys.dtype if cache.layers else None)
    problems = [
        (tuple(layer.spec for layer in cache.layers) != meta.layout, "layout (layer specs)"),
        (cache.num_tokens != meta.num_tokens, f"num_tokens ({cache.num_tokens} vs {meta.num_tokens})"),
        (dtype is not None and dtype_name(dtype) != meta.dtype, f"dtype ({dtype} vs {meta.dtype})"),
        ((cache.params if isinstance(cache, QuantizedKVCache) else None) != meta.quantization, "quantization"),
    ]
    wrong = [name for bad, name in problems if bad]
    if wrong:
        raise ParameterError(f"the metadata does not describe this cache: {', '.join(wrong)} differ; build it "
                             f"with kvlab.store.meta_for(...)")
    if not isinstance(cache, QuantizedKVCache) and any(
            layer.keys.dtype != meta.torch_dtype or layer.values.dtype != meta.torch_dtype for layer in cache.layers):
        raise ParameterError(f"every layer's keys and values must be {meta.dtype} to be saved in one file")


def _arranges(meta: CacheMeta) -> bool:
    """Whether the file's policy holds its cache its own way (``Policy.arrange``; policies not installed here
    do not)."""
    if meta.policy not in POLICIES:
        return False
    policy: type[Policy] = policy_class(meta.policy)
    return policy.arrange is not Policy.arrange


def _arranged(meta: CacheMeta, cache: KVCache) -> KVCache:
    """The cache held as its policy decodes on it (``quest`` pages its layers)."""
    if not _arranges(meta):
        return cache
    return make_policy(meta.policy, **meta.policy_params).arrange(cache, meta.budget_tokens)


def _mapped_tensors(path: Path) -> tuple[dict[str, torch.Tensor], mmap.mmap]:
    """The file's tensors as views of a private (copy-on-write) memory map: nothing is read until used, and pages
    the kernel reclaims are read again from the file. ``safe_open`` has already checked the framing.

    Why not safetensors: its ``get_tensor`` copies each tensor into process memory."""
    with open(path, "rb") as file:
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    length = int.from_bytes(mapping[:8], "little")
    header = json.loads(mapping[8:8 + length])
    start_of_data = 8 + length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        count = (end - start) // dtype.itemsize
        tensors[name] = (torch.frombuffer(mapping, dtype=dtype, count=count, offset=start_of_data + start)
                         if count else torch.empty(0, dtype=dtype)).reshape(info["shape"])
    return tensors, mapping


def _to_device(cache: KVCache, device: torch.device) -> KVCache:
    # positions, not keys: a quantized (or paged) layer's keys are dequantized afresh on every read
    if device.type == "cpu" and all(layer.positions.device.type == "cpu" for layer in cache.layers):
        return cache
    cache.layers = [layer.to(device) for layer in cache.layers]
    return cache


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


__all__ = ["FILE_SUFFIX", "LoadedCache", "load_cache", "meta_for", "read_meta", "save_cache"]
