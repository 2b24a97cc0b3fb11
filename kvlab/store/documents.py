"""Prefill once, ask many times: compress a document into a verified ``.kv`` file, reopen it, ask, save chats.

Documents are compressed query-agnostically (the question is not known yet) and go through the content-addressed
store, so compressing the same text with the same model, policy, parameters and quantization again finds the file
instead of recomputing it. Stored files are read under the store's shared lock and written under its exclusive one,
so `kvlab cache rm|gc` in another process never deletes a file while it is loaded or written here.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvlab.cache.quant import QuantizationParams, QuantizedKVCache, quantize_cache
from kvlab.cache.quantized import from_stored, quantization_of, quantize_in_memory
from kvlab.engine import Engine, memory_figures, resolve_budget
from kvlab.engine.conversation import CompressionRule, Conversation
from kvlab.errors import (
    BudgetError,
    CacheMismatchError,
    CorruptCacheError,
    KvlabError,
    MissingCacheFileError,
    ParameterError,
)
from kvlab.fileio import atomic_write
from kvlab.models.fingerprint import tokenizer_fingerprint
from kvlab.policies.base import Policy
from kvlab.store.format import LoadedCache, load_cache, meta_for, save_cache
from kvlab.store.meta import CacheMeta
from kvlab.store.store import CacheStore, check_key, entry_of, key_for, keyed_policy_params

MIN_STREAM_CHUNK_TOKENS = 64  # a streamed prefill's smallest chunk: below it, forward passes cost more than they read

_KEY_PREFIX = re.compile(r"[0-9a-fA-F]{1,64}")  # what `kvlab cache ls` shows; anything else is a file path


@dataclass(frozen=True)
class Recipe:
    """A method-and-quantization recipe: a policy with its parameters, an eviction ratio, a KV quantization."""

    policy: str
    params: tuple[tuple[str, str], ...]
    ratio: float
    kv_quant: QuantizationParams | None

    def describe(self) -> str:
        settings = "".join(f" -p {key}={value}" for key, value in self.params)
        quant = "none" if self.kv_quant is None else self.kv_quant.scheme
        residual = "" if self.kv_quant is None else f" --kv-residual-tokens {self.kv_quant.residual_tokens}"
        return f"--policy {self.policy}{settings} --ratio {self.ratio:g} --kv-quant {quant}{residual}"


# What `kvlab compress` does when no --policy is given: the knee of the query-agnostic frontier measured in
# benchmarks/results/agnostic_smollm2 (README.md, "Compressing before the question is known"): the smallest held
# cache that still scored like the full cache on the needle tasks.
DEFAULT_RECIPE = Recipe("kvzip", (), 0.625, QuantizationParams("int4", residual_tokens=0))


@dataclass
class CompressedDocument:
    """Where a compressed document lives and what it cost. Bytes are KV bytes unless named ``file_bytes``."""

    path: Path
    key: str
    from_store: bool
    context_tokens: int
    kept_tokens: float
    kv_bytes_full: int
    kv_bytes_kept: int
    kv_bytes_full_fp16: int
    file_bytes: int
    prefill_s: float
    compress_s: float
    meta: CacheMeta  # the file's metadata (payload checksum aside), so callers need not read the file again


def document_key(engine: Engine, text: str, policy: Policy, ratio: float | None, budget_tokens: int,
                 quantization: QuantizationParams | None, streamed_chunk_tokens: int | None = None) -> str:
    """The store key: model, text, policy and parameters, resolved budget (tokens) and quantization. ``ratio`` is
    not part of it (only the budget it resolves to determines the cache; see ``kvlab.store.store``). A document
    compressed while streaming is another cache than one compressed after a full prefill: its chunk size joins the
    policy's parameters in the key."""
    params = keyed_policy_params(policy.params(), streamed_chunk_tokens)
    return key_for(model_fingerprint=engine.loaded.fingerprint, text_sha256=hashlib.sha256(text.encode()).hexdigest(),
                   policy=policy.name, policy_params=params, ratio=None, budget_tokens=budget_tokens,
                   query_aware=False, quantization=quantization)


def streaming_chunk(engine: Engine, policy: Policy, context_tokens: int, budget_tokens: int,
                    max_kv_bytes: int | None) -> int | None:
    """The chunk size to stream with under ``max_kv_bytes``, or None when the full cache fits (prefill it whole).
    The chunk is the engine's, shrunk so that the budget plus one chunk fit the limit."""
    if max_kv_bytes is None:
        return None
    from kvlab.engine.streaming import full_cache_bytes, kv_bytes_per_token
    from kvlab.units import format_mib

    per_token = kv_bytes_per_token(engine)  # every layer at a full slot: a bound for the room below
    full = full_cache_bytes(engine, context_tokens)
    if full <= max_kv_bytes:
        return None
    if policy.keeps_all_tokens:
        raise BudgetError(f"the full cache of this document ({format_mib(full)}) exceeds "
                          f"--max-kv-memory {format_mib(max_kv_bytes)} and --policy {policy.name} evicts nothing; "
                          f"pick a policy that evicts, or raise the limit")
    room = max_kv_bytes // per_token - budget_tokens
    if room < MIN_STREAM_CHUNK_TOKENS:
        raise BudgetError(f"--max-kv-memory {format_mib(max_kv_bytes)} holds {max_kv_bytes // per_token} tokens of "
                          f"this model's cache, too few for a budget of {budget_tokens} tokens plus a chunk of "
                          f"{MIN_STREAM_CHUNK_TOKENS}; raise the limit or lower the budget (a higher --ratio)")
    return min(engine.chunk_tokens, int(room))


def compress_document(engine: Engine, text: str, policy: Policy, *, ratio: float | None = None,
                      budget_tokens: int | None = None, quantization: QuantizationParams | None = None,
                      store: CacheStore | None = None, force: bool = False, progress: bool = False,
                      check: Callable[[], None] | None = None, extra: dict | None = None,
                      admit: Callable[[int], None] | None = None,
                      pause: Callable[[], None] | None = None, max_kv_bytes: int | None = None,
                      on_chunk: Callable[[int, int], None] | None = None) -> CompressedDocument:
    """Prefill ``text``, compress it with ``policy`` (and quantize), and keep it in ``store``; reuse a stored copy.

    ``check`` runs before every forward pass of the prefill and once more before the file is committed; it may raise
    to cancel, and then nothing is written. ``admit`` (a quota) is called with 0 before the prefill of a text that is
    not stored yet and with the new file's size in bytes before it is committed; it may raise to refuse, and then
    nothing is written. ``extra`` is added to the new file's metadata (not to its key). ``pause`` (the server's
    ``job.pause``) replaces ``check`` between the prefill's forward passes: other work may run there, which is why it
    is never called while the store entry is locked. ``max_kv_bytes`` bounds the KV memory held while reading: when
    the full cache would exceed it, the document is prefilled chunk by chunk and compressed as it goes
    (``engine.streaming``; ``on_chunk(tokens_read, held_bytes)`` after each chunk)."""
    store = store or CacheStore()
    prefix_ids = engine.prompt(text, "").prefix_ids
    context_tokens = int(prefix_ids.numel())
    engine.check_length(context_tokens + 1, force=force)
    budget = resolve_budget(ratio, budget_tokens, context_tokens)  # bad arguments fail before the slow prefill
    stream_chunk = streaming_chunk(engine, policy, context_tokens, budget, max_kv_bytes)
    key = document_key(engine, text, policy, ratio, budget, quantization, stream_chunk)
    with store.reading(key) as found:  # `cache rm|gc` cannot remove it while it loads
        if found is not None:
            try:
                # a full load, not just the header: a damaged payload must be recomputed here, not found again
                loaded = load_cache(found, expected_model_fingerprint=engine.loaded.fingerprint,
                                    expected_extension=engine.loaded.extension_label)
                check_key(key, loaded.meta)
                return _describe(found, key, True, loaded.meta, loaded.cache.kept_tokens(), loaded.file_bytes, 0.0,
                                 0.0)
            except (CorruptCacheError, MissingCacheFileError, CacheMismatchError):
                pass  # damaged or not this entry: compute it again and replace it
    if admit is not None:
        admit(0)
    streamed: dict = {}
    if stream_chunk is not None:
        from kvlab.engine.streaming import full_cache_bytes, streaming_prefill

        outcome = streaming_prefill(engine, prefix_ids, policy, budget, chunk_tokens=stream_chunk, progress=progress,
                                    check=pause or check, on_chunk=on_chunk)
        cache, last_logits, compress_s = outcome.cache, outcome.last_logits, outcome.compress_s
        prefill_s = outcome.seconds - outcome.compress_s
        full_bytes = full_cache_bytes(engine, context_tokens)  # what a full prefill would have held
        streamed = {"streamed": {"chunk_tokens": stream_chunk, "peak_kv_bytes": outcome.peak_kv_bytes,
                                 "compressions": outcome.compressions}}
    else:
        result = engine.prefill(prefix_ids, policy.observation_request(), progress=progress, check=pause or check)
        cache, budget, compress_s = engine.compress(result, policy, budget_tokens=budget)
        full_bytes, last_logits, prefill_s = result.cache.held_bytes, result.last_logits, result.seconds
        del result  # the full cache is freed before the file is written
    stored = cache if quantization is None else quantize_cache(cache, quantization.scheme, quantization.group_size,
                                                                quantization.residual_tokens,
                                                                quantization.quantize_tail)
    held = from_stored(stored).held_bytes if isinstance(stored, QuantizedKVCache) else cache.held_bytes
    meta = meta_for(engine.loaded, stored, text=text, policy=policy, ratio=ratio, budget_tokens=budget,
                    query_aware=False, context_tokens=context_tokens,
                    extra={**memory_figures(full_bytes, held, cache.kv_bytes_full_fp16),
                           "kv_bytes_stored": (stored.nbytes if isinstance(stored, QuantizedKVCache)
                                               else cache.held_bytes),
                           "prefill_s": prefill_s, "compress_s": compress_s, "turns": 0,
                           "pending_token_ids": [], "kept_tokens": cache.kept_tokens(), **streamed,
                           **(extra or {})})

    written = {}

    def write(temporary: Path) -> None:
        written["bytes"] = save_cache(temporary, stored, meta, last_logits)
        if admit is not None:
            admit(written["bytes"])
        if check is not None:
            check()  # the last moment to cancel: the temporary file is removed and the entry never appears

    path = store.put(key, write)  # no stat afterwards: `cache gc` may already have removed the file
    return _describe(path, key, False, meta, cache.kept_tokens(), written["bytes"], prefill_s, compress_s)


def _describe(path: Path, key: str, from_store: bool, meta: CacheMeta, kept_tokens: float, file_bytes: int,
              prefill_s: float, compress_s: float) -> CompressedDocument:
    return CompressedDocument(path=Path(path), key=key, from_store=from_store, context_tokens=meta.context_tokens,
                              kept_tokens=kept_tokens, kv_bytes_full=int(meta.extra.get("kv_bytes_full", 0)),
                              kv_bytes_kept=int(meta.extra.get("kv_bytes_kept", 0)),
                              kv_bytes_full_fp16=int(meta.extra.get("kv_bytes_full_fp16", 0)), file_bytes=file_bytes,
                              prefill_s=prefill_s, compress_s=compress_s, meta=meta)


def copy_out(source: Path, destination: str | Path) -> Path:
    """Copy a stored cache file to ``destination`` atomically (a folder gets the file's own name)."""
    destination = Path(destination).expanduser()
    if destination.is_dir():
        destination = destination / Path(source).name
    try:
        atomic_write(destination, lambda temporary: shutil.copyfile(source, temporary))
    except OSError as error:
        raise KvlabError(f"cannot write {destination}: {error.strerror}; pick another --out path") from None
    return destination


def open_document(engine: Engine, path_or_key: str, store: CacheStore | None = None,
                  kv_quant: QuantizationParams | None = None) -> LoadedCache:
    """Load a ``.kv`` file (or a store key / unique key prefix), verified against the engine's model. A quantized
    file stays quantized in memory; ``kv_quant`` quantizes a plain file's cache in memory (a quantized file must
    then have been made with the same scheme)."""
    path = Path(path_or_key).expanduser()
    if not path.exists() and _KEY_PREFIX.fullmatch(path_or_key.strip()):
        store = store or CacheStore()
        key = store.find(path_or_key).key
    elif (entry := entry_of(path)) is not None and path.is_file():  # a store's file named by its path
        store, key = entry
    else:
        return _open(engine, path, None, kv_quant)
    with store.reading(key) as found:  # `cache rm|gc` cannot remove it while it loads
        if found is None:
            raise MissingCacheFileError(f"the cache entry {key[:12]}… was removed meanwhile; compress the "
                                        f"document again")
        return _open(engine, found, key, kv_quant)


def _open(engine: Engine, path: Path, key: str | None, kv_quant: QuantizationParams | None) -> LoadedCache:
    started = time.perf_counter()
    loaded = load_cache(path, expected_model_fingerprint=engine.loaded.fingerprint,
                        expected_extension=engine.loaded.extension_label,
                        expected_tokenizer_fingerprint=tokenizer_fingerprint(engine.tokenizer),
                        expected_model_name=engine.loaded.name, device=engine.loaded.device)
    if key is not None:
        check_key(key, loaded.meta)
    if kv_quant is not None:
        held = quantization_of(loaded.cache)
        if held is not None and held.scheme != kv_quant.scheme:
            raise ParameterError(f"{path} holds an {held.scheme} cache; drop --kv-quant or pass --kv-quant "
                                 f"{held.scheme} (or compress again with the scheme you want)")
        if held is None:
            loaded.cache = quantize_in_memory(loaded.cache, kv_quant)
    loaded.meta.extra["load_s"] = time.perf_counter() - started
    return loaded


def conversation_for(engine: Engine, loaded: LoadedCache, policy: Policy | None = None) -> Conversation:
    """A conversation continuing the saved one (or starting on the document), re-compressing with the file's policy."""
    from kvlab.policies import make_policy

    meta = loaded.meta
    if meta.query_aware:
        raise ParameterError("this cache was compressed query-aware: it already holds a question, so it cannot "
                             "start a conversation; compress the document with `kvlab compress` instead")
    policy = policy or make_policy(meta.policy, **meta.policy_params)
    rule = CompressionRule(policy, meta.budget_tokens, kv_quant=quantization_of(loaded.cache))
    return Conversation(engine, loaded.cache, rule=rule,
                        turns_before=int(meta.extra.get("turns", 0)),
                        pending_ids=[int(token) for token in meta.extra.get("pending_token_ids", [])])


def save_conversation(path: str | Path, engine: Engine, conversation: Conversation, loaded: LoadedCache) -> int:
    """Persist the conversation's cache so `kvlab chat --cache` / `kvlab ask --cache` continue it."""
    import dataclasses

    if conversation.answered == 0:
        raise ParameterError("nothing to save yet: ask a question first")
    meta = loaded.meta
    cache = conversation.cache
    quantization = quantization_of(cache)
    # a quantized chat is saved quantized (its dense form re-encoded with the same scheme), never expanded on disk
    stored = cache if quantization is None else quantize_cache(cache.dense(), quantization.scheme,
                                                                quantization.group_size, quantization.residual_tokens,
                                                                quantization.quantize_tail)
    extra = {**meta.extra, "turns": conversation.answered, "pending_token_ids": conversation.pending_ids,
             **memory_figures(int(meta.extra.get("kv_bytes_full", 0)), cache.held_bytes, cache.kv_bytes_full_fp16),
             "kv_bytes_stored": stored.nbytes if isinstance(stored, QuantizedKVCache) else cache.held_bytes}
    extra.pop("load_s", None)
    dtype = stored.dtype if isinstance(stored, QuantizedKVCache) else cache.layers[0].dense().keys.dtype
    new_meta = dataclasses.replace(meta, num_tokens=cache.num_tokens, quantization=quantization,
                                   dtype=str(dtype).removeprefix("torch."), extra=extra, payload_sha256="")
    try:
        return save_cache(path, stored, new_meta, None)
    except OSError as error:
        raise KvlabError(f"cannot write {path}: {error.strerror}") from None
