"""CacheMeta: what a ``.kv`` file says about itself, as one JSON object stored in the safetensors header.

Every field is validated when a CacheMeta is built, so a file's metadata is either entirely well-formed or refused.
The JSON carries ``meta_sha256``, the SHA-256 of the other fields in canonical form (sorted keys, no spaces), so a
damaged digit in, say, ``context_tokens`` is caught rather than believed. Checksums detect corruption, not forgery:
anyone who edits a file can recompute them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

import torch

from kvlab.cache.layout import LayerSpec
from kvlab.cache.quant import QuantizationParams
from kvlab.errors import CacheChecksumError, CacheMetadataError, CacheVersionError, ParameterError

FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RECREATE = "recreate it with `kvlab compress`"
_HEX = re.compile(r"[0-9a-f]+")


def kvlab_version() -> str:
    """The version recorded in a file's metadata: ``kvlab.__version__`` (``0.1.0+source`` in a source tree)."""
    import kvlab

    return kvlab.__version__


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``'float32'`` (the spelling stored in files)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class CacheMeta:
    """Self-description of one persisted cache. Token counts are tokens; hashes are lowercase SHA-256 hex.

    ``context_tokens`` is the document's token count and ``num_tokens`` the cache's sequence length (larger when a
    query-aware cache also holds the question). ``budget_tokens`` is the policy's budget per head per
    full-attention layer. ``text_sha256`` hashes the prefilled text (UTF-8). ``payload_sha256`` is filled in by
    ``save_cache``. ``extra`` holds any JSON-serialisable details a caller wants to keep.
    """

    model: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    policy: str
    policy_params: dict
    ratio: float | None
    budget_tokens: int
    query_aware: bool
    context_tokens: int
    num_tokens: int
    layout: tuple[LayerSpec, ...]
    dtype: str
    quantization: QuantizationParams | None
    text_sha256: str
    payload_sha256: str = ""
    extra: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    kvlab_version: str = field(default_factory=kvlab_version)
    created_at: str = field(default_factory=utc_now)

    def __post_init__(self) -> None:
        if isinstance(self.layout, list):
            object.__setattr__(self, "layout", tuple(self.layout))
        _validate(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["layout"] = [dataclasses.asdict(spec) for spec in self.layout]
        data["quantization"] = None if self.quantization is None else self.quantization.to_dict()
        return data

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces) including ``meta_sha256``."""
        data = self.to_dict()
        data["meta_sha256"] = _digest(data)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, source: str = "cache metadata") -> CacheMeta:
        """Parse and verify; raises CacheVersionError, CacheChecksumError or CacheMetadataError naming ``source``."""
        try:
            data = json.loads(text)
        except ValueError:
            raise CacheMetadataError(f"{source}: metadata is not valid JSON; {RECREATE}") from None
        if not isinstance(data, dict):
            raise CacheMetadataError(f"{source}: metadata is not a JSON object; {RECREATE}")
        version = data.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise CacheMetadataError(f"{source}: metadata has no valid format_version; {RECREATE}")
        if version > FORMAT_VERSION:
            raise CacheVersionError(f"{source} was made by a newer kvlab (format {version}; this kvlab reads format "
                                    f"{FORMAT_VERSION}); upgrade kvlab")
        recorded = data.pop("meta_sha256", None)
        if recorded != _digest(data):
            raise CacheChecksumError(f"{source}: metadata checksum mismatch (the header was modified or damaged); "
                                     f"{RECREATE}")
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: dict, source: str = "cache metadata") -> CacheMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = sorted(names - data.keys()), sorted(data.keys() - names)
        if missing or unknown:
            problem = f"missing keys {missing}" if missing else f"unknown keys {unknown}"
            raise CacheMetadataError(f"{source}: invalid metadata ({problem}); {RECREATE}")
        try:
            values = dict(data)
            values["layout"] = tuple(_layer_spec(item) for item in _require_list(data["layout"], "layout"))
            quantization = data["quantization"]
            if quantization is not None:
                names = {"scheme", "group_size", "residual_tokens"}
                if not isinstance(quantization, dict) or set(quantization) - {"quantize_tail"} != names:
                    raise ParameterError("quantization must be null or {scheme, group_size, residual_tokens, "
                                         "quantize_tail}")
                values["quantization"] = QuantizationParams(**quantization)
            return cls(**values)
        except (ParameterError, TypeError) as error:
            raise CacheMetadataError(f"{source}: invalid metadata ({error}); {RECREATE}") from None


def _digest(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# -- validation --------------------------------------------------------------------------------------------------
def _validate(meta: CacheMeta) -> None:
    """Raise ParameterError naming the first bad field."""
    _check_int(meta.format_version, "format_version", 1)
    for name in ("kvlab_version", "model", "policy"):
        if not isinstance(getattr(meta, name), str) or not getattr(meta, name):
            raise ParameterError(f"{name} must be a non-empty string")
    for name, lengths in (("model_fingerprint", range(1, 65)), ("tokenizer_fingerprint", range(1, 65)),
                          ("text_sha256", (64,)), ("payload_sha256", (0, 64))):
        value = getattr(meta, name)
        if not isinstance(value, str) or len(value) not in lengths or (value and not _HEX.fullmatch(value)):
            raise ParameterError(f"{name} must be lowercase hex (got {value!r})")
    _check_created_at(meta.created_at)
    _check_json_dict(meta.policy_params, "policy_params")
    _check_json_dict(meta.extra, "extra")
    if meta.ratio is not None and (isinstance(meta.ratio, bool) or not isinstance(meta.ratio, (int, float))
                                   or not 0.0 <= meta.ratio < 1.0):
        raise ParameterError(f"ratio must be null or a number in [0, 1) (got {meta.ratio!r})")
    _check_int(meta.budget_tokens, "budget_tokens", 0)
    if not isinstance(meta.query_aware, bool):
        raise ParameterError(f"query_aware must be true or false (got {meta.query_aware!r})")
    _check_int(meta.context_tokens, "context_tokens", 0)
    _check_int(meta.num_tokens, "num_tokens", meta.context_tokens if isinstance(meta.context_tokens, int) else 0)
    if not isinstance(meta.layout, tuple) or not meta.layout or not all(isinstance(s, LayerSpec) for s in meta.layout):
        raise ParameterError("layout must be a non-empty tuple of LayerSpec")
    if meta.dtype not in DTYPES:
        raise ParameterError(f"dtype must be one of {', '.join(DTYPES)} (got {meta.dtype!r})")
    if meta.quantization is not None and not isinstance(meta.quantization, QuantizationParams):
        raise ParameterError("quantization must be None or QuantizationParams")


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ParameterError(f"{name} must be an integer >= {minimum} (got {value!r})")


def _check_created_at(value) -> None:
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.utcoffset() is None:
        raise ParameterError(f"created_at must be an ISO 8601 time with a UTC offset (got {value!r})")


def _check_json_dict(value, name: str) -> None:
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise ParameterError(f"{name} must be a JSON object")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        raise ParameterError(f"{name} must be JSON-serialisable") from None


def _require_list(value, name: str) -> list:
    if not isinstance(value, list):
        raise ParameterError(f"{name} must be a list")
    return value


def _layer_spec(item) -> LayerSpec:
    keys = {f.name for f in dataclasses.fields(LayerSpec)}
    optional = {"rope_theta"}  # added later: files written before it have no such key (None: not standard RoPE)
    if not isinstance(item, dict) or not keys - optional <= set(item) <= keys:
        raise ParameterError(f"each layout entry must have exactly the keys {sorted(keys)}")
    if item.get("rope_theta") is not None and not isinstance(item["rope_theta"], (int, float)):
        raise ParameterError("layout rope_theta must be a number or null")
    for name in ("kv_heads", "query_heads", "head_dim"):
        _check_int(item[name], f"layout {name}", 1)
    if item["kind"] == "full" and item["window_tokens"] is None:
        pass
    elif item["kind"] == "sliding":
        _check_int(item["window_tokens"], "layout window_tokens", 1)
    else:
        raise ParameterError(f"layout entry {item} is neither a full layer (window null) nor a sliding one")
    if item["query_heads"] % item["kv_heads"]:
        raise ParameterError("layout query_heads must be a multiple of kv_heads")
    return LayerSpec(**item)
