"""Server settings: one frozen dataclass, validated when built; `kvlab serve` flags map onto its fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvlab.cache.quant import SCHEME_BITS
from kvlab.errors import ParameterError
from kvlab.models.dtypes import DTYPE_CHOICES

MIB = 1024 * 1024
# A text longer than this many characters per token of the limit is refused before it is tokenized (tokenizing a
# 14 MB prompt held the worker for 20-34 s). Generous: English averages about 4 characters per token; a text of
# unusually long tokens (runs of spaces, long words) can be refused though it would fit.
MAX_CHARS_PER_TOKEN = 8
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# Requests without a document are compressed with the server's policy once their prompt is longer than this many
# tokens. 1024 because below it a cache is small (SmolLM2-135M: about 24 MB at 1K tokens) and the query-agnostic
# frontier in the README was measured at 1K and 4K tokens: shorter prompts would be compressed where no one has
# measured what it costs in quality.
DEFAULT_COMPRESS_ABOVE_TOKENS = 1024


@dataclass(frozen=True)
class Settings:
    model: str = "smollm2-135m"  # embedded name, local folder or hub id; loaded once at startup
    device: str | None = None  # torch device; None: cuda if available, else cpu
    dtype: str = "auto"  # weights' dtype (models.dtypes): auto, float32, bfloat16 or float16
    policy: str = "full"  # policy that compresses posted documents (a POST may override it)
    policy_params: dict = field(default_factory=dict)  # that policy's parameters
    ratio: float | None = None  # fraction of document tokens evicted; None with a policy other than full: 0.5
    budget_tokens: int | None = None  # alternative to ratio: document tokens kept per head per layer
    weights: str = "fp"  # "int8": weight-only int8 linear layers (a different, faster model on CPU)
    extension: str | None = None  # context extension, as --extend spells it (models.extension); None: the window
    kv_quant: str | None = None  # int8, int4 or int2: documents are stored and held quantized in memory (KIVI)
    store_root: Path | str | None = None  # document store folder; None: $KVLAB_CACHE_DIR/kv
    max_queue: int = 8  # requests waiting for the model beyond the one running; more get 429
    request_timeout_s: float = 300.0  # from arrival to the last token, queueing included; then 504
    max_body_bytes: int = 16 * MIB  # larger request bodies get 413
    default_max_tokens: int = 512  # chat tokens generated when a request names no max_tokens (capped by the window)
    session_cache_bytes: int = 1024 * MIB  # KV bytes the prefix cache may hold (documents and conversations)
    session_cache_entries: int = 64  # and at most this many cached prefixes
    chunk_tokens: int = 512  # prefill chunk; cancellation and timeouts are checked between chunks
    max_document_tokens: int | None = None  # longest document a POST may store (tokens); None: the model's window
    max_store_bytes: int | None = None  # a POST that would take the store past this many bytes gets 507; None: no quota
    max_store_documents: int | None = None  # and past this many entries (all of the store's files); None: no limit
    api_key: str | None = None  # when set, every route but /health needs "Authorization: Bearer KEY"
    metrics_public: bool = False  # /metrics without the key
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS  # Host header values answered (DNS rebinding); "*": any
    served_model_name: str | None = None  # the model id clients send and /v1/models lists; None: the model's name
    # a request without a document whose prompt is longer than this many tokens is compressed with ``policy``
    # (0: every prompt that has a context before its question; None: never, unless the request asks for a policy)
    compress_above: int | None = DEFAULT_COMPRESS_ABOVE_TOKENS

    def __post_init__(self) -> None:
        checks = [
            (self.max_queue >= 0, f"max_queue must be >= 0 (got {self.max_queue})"),
            (self.request_timeout_s > 0, f"request timeout must be > 0 seconds (got {self.request_timeout_s})"),
            (self.max_body_bytes > 0, f"max_body_bytes must be > 0 (got {self.max_body_bytes})"),
            (self.default_max_tokens >= 1, f"default_max_tokens must be >= 1 (got {self.default_max_tokens})"),
            (self.session_cache_bytes >= 0, f"session cache bytes must be >= 0 (got {self.session_cache_bytes})"),
            (self.session_cache_entries >= 1, f"session_cache_entries must be >= 1 "
                                              f"(got {self.session_cache_entries})"),
            (self.chunk_tokens >= 1, f"chunk_tokens must be >= 1 (got {self.chunk_tokens})"),
            (self.api_key is None or len(self.api_key) >= 8, "the API key must be at least 8 characters"),
            (bool(self.allowed_hosts), "allowed_hosts must name at least one host (or '*' for any)"),
            (self.max_document_tokens is None or self.max_document_tokens >= 1,
             f"max_document_tokens must be >= 1 (got {self.max_document_tokens})"),
            (self.max_store_bytes is None or self.max_store_bytes >= 0,
             f"max_store_bytes must be >= 0 (got {self.max_store_bytes})"),
            (self.max_store_documents is None or self.max_store_documents >= 0,
             f"max_store_documents must be >= 0 (got {self.max_store_documents})"),
            (self.ratio is None or 0 <= self.ratio < 1, f"ratio must be in [0, 1) (got {self.ratio})"),
            (self.ratio is None or self.budget_tokens is None, "give either a ratio or a budget, not both"),
            (self.served_model_name is None or bool(self.served_model_name.strip()),
             "served_model_name must not be empty (leave it out to serve the model under its own name)"),
            (self.compress_above is None or self.compress_above >= 0,
             f"compress_above must be >= 0 tokens, or None for never (got {self.compress_above})"),
            (self.dtype in DTYPE_CHOICES, f"dtype must be one of {', '.join(DTYPE_CHOICES)} (got {self.dtype!r})"),
            (self.kv_quant in (None, *SCHEME_BITS), f"kv_quant must be one of {', '.join(SCHEME_BITS)} "
                                                     f"(got {self.kv_quant!r})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ParameterError(message)

    def document_ratio(self, policy: str, ratio: float | None, budget_tokens: int | None) -> float | None:
        """The ratio a document is compressed with: the request's, else the server's, else 0.5 for a policy that
        compresses (as `kvlab compress` does); None when a budget is given."""
        if ratio is not None or budget_tokens is not None:
            return ratio
        if policy == self.policy and (self.ratio is not None or self.budget_tokens is not None):
            return self.ratio
        return None if policy == "full" else 0.5

    def document_budget(self, policy: str, ratio: float | None, budget_tokens: int | None) -> int | None:
        if ratio is not None or budget_tokens is not None:
            return budget_tokens
        return self.budget_tokens if policy == self.policy else None
