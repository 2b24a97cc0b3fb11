"""The server's view of the document store: find a document by id, load its cache into the prefix cache, describe
it, and create one from a text (prefill, compress, persist) with the server's or the request's policy.

A document's id is its key in the content-addressed store (64 hex characters; ``kvlab chat --cache ID`` opens the
same file), so posting the same text with the same policy again finds the stored file instead of recomputing it.
Every read checks that the file's metadata is what the id was derived from (a file copied under another key is a
409, never that document), and errors name the document, never the server's paths.

Documents the server creates carry ``origin: "server"`` in their metadata; only those, made for this server's model,
can be deleted over HTTP (the CLI's entries and other models' are refused).

Files are read under the store's shared lock (``CacheStore.reading``), so `kvlab cache rm|gc` in another process
skips them meanwhile; one removed before the lock was taken is a 404. ``--max-store-size`` and
``--max-store-documents`` are a quota: a POST that would take the store past either gets 507 ``store_quota_exceeded``
and writes nothing (nothing is evicted to make room: the operator decides with `kvlab cache gc`). The quota is
checked before the prefill and again with the new file's size before it is committed; other processes writing to
the same store meanwhile can take it past the quota by their own files.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from kvlab.engine.conversation import CompressionRule
from kvlab.errors import CacheFileError
from kvlab.server.errors import ApiError
from kvlab.server.schemas import Document, DocumentRequest
from kvlab.server.sessions import Entry
from kvlab.server.state import ServerState
from kvlab.store.meta import CacheMeta

_KEY = re.compile(r"[0-9a-f]{64}")
ORIGIN = "server"  # metadata ``extra["origin"]`` of the documents this server created


def not_found(document_id: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"no document with id {document_id!r}; POST /v1/documents creates one and GET "
                         f"/v1/documents lists them", param=param, code="document_not_found")


@contextlib.contextmanager
def about(path: Path, document_id: str) -> Iterator[None]:
    """Re-raise cache file errors naming the document instead of the file's path on the server."""
    try:
        yield
    except CacheFileError as error:
        raise type(error)(str(error).replace(str(path), f"document {document_id[:12]}…")) from None


def document_path(state: ServerState, document_id: str, param: str | None = None) -> Path:
    """The stored file of ``document_id``; 404 ``document_not_found`` when there is none."""
    path = state.store.get(document_id) if _KEY.fullmatch(document_id) else None
    if path is None:
        state.sessions.drop_document(document_id)  # removed by `kvlab cache rm|gc`: gone from memory too
        raise not_found(document_id, param)
    return path


@contextlib.contextmanager
def reading(state: ServerState, document_id: str, param: str | None = None) -> Iterator[Path]:
    """``document_path`` held under the store's shared lock, so no other process removes it meanwhile."""
    if not _KEY.fullmatch(document_id):
        raise not_found(document_id, param)
    with state.store.reading(document_id) as path:
        if path is None:
            state.sessions.drop_document(document_id)  # removed by `kvlab cache rm|gc`: gone from memory too
            raise not_found(document_id, param)
        yield path


def document_meta(state: ServerState, document_id: str) -> tuple[CacheMeta, int]:
    """A document's metadata and file size, reading the header only; 404 unless it is one of this model's
    documents, 409 when the file under the id is not that document."""
    from kvlab.store.format import read_meta
    from kvlab.store.store import check_key

    with reading(state, document_id) as path, about(path, document_id):
        meta = read_meta(path)
        check_key(document_id, meta)
        size = path.stat().st_size
    if meta.model_fingerprint != state.fingerprint or meta.query_aware:
        raise not_found(document_id)
    return meta, size


def delete(state: ServerState, document_id: str) -> None:
    """Remove a document this server created for its model; 403 ``document_not_owned`` for any other entry."""
    meta, _ = document_meta(state, document_id)
    if meta.extra.get("origin") != ORIGIN:
        raise ApiError(403, f"document {document_id[:12]}… was not created by this server (it came from the kvlab "
                            f"command line or another tool), so it cannot be deleted over HTTP; use `kvlab cache rm "
                            f"{document_id[:12]}` on the server's machine", type="permission_error",
                       code="document_not_owned")
    state.store.remove_key(document_id)
    state.sessions.drop_document(document_id)


def load_into_sessions(state: ServerState, document_id: str) -> Entry:
    """Read a document's cache from the store (verified against the model and its id) and keep it in the prefix
    cache. Runs on the worker, so at most one load happens at a time."""
    from kvlab.store.documents import open_document
    from kvlab.store.store import check_key

    with reading(state, document_id, "kvlab.document_id") as path, about(path, document_id):
        loaded = open_document(state.engine, str(path))
        check_key(document_id, loaded.meta)
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


def create(state: ServerState, body: DocumentRequest, check=None, pause=None) -> tuple[Document, bool]:
    """Prefill and compress ``body.text`` (run it on the worker); returns the document and whether it is new.
    ``check`` (the job's) runs before the file is committed, and ``pause`` (the job's: a check that lets waiting
    chats run) between prefill chunks: a cancelled upload writes nothing and counts nothing."""
    from kvlab.cache.quant import QuantizationParams
    from kvlab.policies import make_policy
    from kvlab.store.documents import compress_document

    settings, engine = state.settings, state.engine
    name = body.policy or settings.policy
    params = body.policy_params if body.policy else {**settings.policy_params, **body.policy_params}
    policy = make_policy(name, **params)
    tokens = int(engine.prompt(body.text, "").prefix_ids.numel())
    limit = state.max_context_tokens
    if limit and tokens + 1 > limit:
        raise ApiError(400, f"this model's maximum context length is {limit} tokens; the document is {tokens} "
                            f"tokens and questions need room after it; shorten the document", param="text",
                       code="context_length_exceeded")
    if settings.max_document_tokens and tokens > settings.max_document_tokens:
        raise ApiError(400, f"the document is {tokens} tokens; this server stores documents of at most "
                            f"{settings.max_document_tokens} tokens (--max-document-tokens); shorten it",
                       param="text", code="document_too_long")
    quantization = None if settings.kv_quant is None else QuantizationParams(settings.kv_quant)
    document = compress_document(engine, body.text, policy, store=state.store, quantization=quantization,
                                 ratio=settings.document_ratio(name, body.ratio, body.budget_tokens),
                                 budget_tokens=settings.document_budget(name, body.ratio, body.budget_tokens),
                                 check=check, pause=pause, extra={"origin": ORIGIN}, admit=quota(state))
    if not document.from_store:
        state.metrics.inc("kvlab_documents_created_total")
    return describe(document.key, document.meta, document.file_bytes, kept_tokens=document.kept_tokens,
                    prefill_s=document.prefill_s, compress_s=document.compress_s), not document.from_store


def quota(state: ServerState) -> Callable[[int], None] | None:
    """The ``admit`` hook of ``compress_document`` enforcing ``--max-store-size`` and ``--max-store-documents``:
    507 ``store_quota_exceeded`` when storing ``new_bytes`` more would pass either."""
    settings = state.settings
    if settings.max_store_bytes is None and settings.max_store_documents is None:
        return None

    def admit(new_bytes: int) -> None:
        count, total = state.store.usage()
        if settings.max_store_documents is not None and count + 1 > settings.max_store_documents:
            raise quota_error(f"the store holds {count} documents, this server's limit "
                              f"(--max-store-documents {settings.max_store_documents})")
        if settings.max_store_bytes is not None and total + max(new_bytes, 1) > settings.max_store_bytes:
            size = f"this document's {new_bytes} bytes" if new_bytes else "another document"
            raise quota_error(f"the store holds {total} bytes; {size} would pass this server's limit of "
                              f"{settings.max_store_bytes} bytes (--max-store-size)")

    return admit


def quota_error(reason: str) -> ApiError:
    return ApiError(507, f"cannot store the document: {reason}; delete documents (DELETE /v1/documents/{{id}}) or "
                         f"ask the operator to run `kvlab cache gc` or raise the limit", type="server_error",
                    code="store_quota_exceeded")


def kept_tokens(state: ServerState, document_id: str, meta: CacheMeta) -> float | None:
    """Mean document tokens kept per head (full-attention layers): recorded in the metadata since issue 14, else
    from the cache when it is in memory already (a metadata read never loads a cache)."""
    from kvlab.engine import context_kept_tokens

    if "kept_tokens" in meta.extra:
        return float(meta.extra["kept_tokens"])
    entry = state.sessions.lookup(document_id, (0,))  # any entry of the document starts with its cache
    if entry is not None and entry.token_ids == ():
        return context_kept_tokens(entry.cache, meta.context_tokens)
    return None
