"""The server's view of the document store: find a document by id, load its cache into the prefix cache, describe
it, and create one from a text (prefill, compress, persist) with the server's or the request's policy.

A document's id is its key in the content-addressed store (64 hex characters; ``kvlab chat --cache ID`` opens the
same file), so posting the same text with the same policy again finds the stored file instead of recomputing it.
"""

from __future__ import annotations

import re
from pathlib import Path

from kvlab.engine.conversation import CompressionRule
from kvlab.server.errors import ApiError
from kvlab.server.schemas import Document, DocumentRequest
from kvlab.server.sessions import Entry
from kvlab.server.state import ServerState
from kvlab.store.meta import CacheMeta

_KEY = re.compile(r"[0-9a-f]{64}")


def document_path(state: ServerState, document_id: str, param: str | None = None) -> Path:
    """The stored file of ``document_id``; 404 ``document_not_found`` when there is none."""
    path = state.store.get(document_id) if _KEY.fullmatch(document_id) else None
    if path is None:
        raise ApiError(404, f"no document with id {document_id!r}; POST /v1/documents creates one and GET "
                            f"/v1/documents lists them", param=param, code="document_not_found")
    return path


def load_into_sessions(state: ServerState, document_id: str) -> Entry:
    """Read a document's cache from the store (verified against the model) and keep it in the prefix cache."""
    from kvlab.store.documents import open_document

    loaded = open_document(state.engine, str(document_path(state, document_id, "kvlab.document_id")))
    state.metrics.inc("kvlab_document_loads_total")
    rule = session_rule(loaded.meta, loaded.cache)
    state.sessions.put(document_id, (), loaded.cache, 0, rule=rule)
    return Entry(document_id, (), loaded.cache, 0, None, rule)


def session_rule(meta: CacheMeta, cache) -> CompressionRule | None:
    """The conversation rule of a document's sessions: its own policy and budget, as `kvlab chat` uses them."""
    from kvlab.cache.quantized import quantization_of
    from kvlab.policies import make_policy

    if meta.policy == "full":
        return None
    return CompressionRule(make_policy(meta.policy, **meta.policy_params), meta.budget_tokens,
                           kv_quant=quantization_of(cache))


def document_cache(state: ServerState, document_id: str):
    """The document's cache, from the prefix cache or the store."""
    entry = state.sessions.lookup(document_id, (0,))  # any entry of the document starts with its cache
    if entry is not None and entry.token_ids == ():
        return entry.cache
    return load_into_sessions(state, document_id).cache


def describe(document_id: str, meta: CacheMeta, file_bytes: int, **extra) -> Document:
    from kvlab.engine import compression

    kept = int(meta.extra.get("kv_bytes_kept", meta.extra.get("kv_bytes_stored", 0)))
    full_fp16 = int(meta.extra.get("kv_bytes_full_fp16", 0))
    return Document(id=document_id, created_at=meta.created_at, model=meta.model, policy=meta.policy,
                    policy_params=meta.policy_params, ratio=meta.ratio, budget_tokens=meta.budget_tokens,
                    context_tokens=meta.context_tokens, kv_bytes_full=int(meta.extra.get("kv_bytes_full", 0)),
                    kv_bytes_kept=kept, kv_bytes_full_fp16=full_fp16,
                    compression=round(compression(full_fp16, kept), 3),
                    file_bytes=file_bytes, **extra)


def create(state: ServerState, body: DocumentRequest) -> tuple[Document, bool]:
    """Prefill and compress ``body.text`` (run it on the worker); returns the document and whether it is new."""
    from kvlab.cache.quant import QuantizationParams
    from kvlab.errors import ContextTooLongError
    from kvlab.policies import make_policy
    from kvlab.store.documents import compress_document
    from kvlab.store.format import read_meta

    settings, engine = state.settings, state.engine
    name = body.policy or settings.policy
    params = body.policy_params if body.policy else {**settings.policy_params, **body.policy_params}
    policy = make_policy(name, **params)
    tokens = int(engine.prompt(body.text, "").prefix_ids.numel())
    limit = state.max_context_tokens
    if limit and tokens + 1 > limit:
        raise ContextTooLongError(f"this model's maximum context length is {limit} tokens; the document is "
                                  f"{tokens} tokens and questions need room after it; shorten the document")
    if settings.max_document_tokens and tokens > settings.max_document_tokens:
        raise ApiError(400, f"the document is {tokens} tokens; this server stores documents of at most "
                            f"{settings.max_document_tokens} tokens (--max-document-tokens); shorten it",
                       param="text", code="document_too_long")
    quantization = None if settings.kv_quant is None else QuantizationParams(settings.kv_quant)
    document = compress_document(engine, body.text, policy, store=state.store, quantization=quantization,
                                 ratio=settings.document_ratio(name, body.ratio, body.budget_tokens),
                                 budget_tokens=settings.document_budget(name, body.ratio, body.budget_tokens))
    if not document.from_store:
        state.metrics.inc("kvlab_documents_created_total")
    return describe(document.key, read_meta(document.path), document.file_bytes, kept_tokens=document.kept_tokens,
                    prefill_s=document.prefill_s, compress_s=document.compress_s), not document.from_store


def kept_tokens(state: ServerState, document_id: str, context_tokens: int) -> float:
    """Mean document tokens kept per head (full-attention layers), from the cache itself."""
    from kvlab.engine import context_kept_tokens

    return context_kept_tokens(document_cache(state, document_id), context_tokens)
