"""The prefix cache: KV caches of conversations already seen, so a session's next turn prefills only what is new.

An entry is keyed by the hash of (document id, token ids after the document). Its ``cache`` covers the first
``fed_tokens`` of those ids (on top of the document's cache); any remaining ids are *pending*: sampled but not yet
fed, such as the end-of-turn token that stopped an answer. A request whose token ids extend an entry's ids forks the
entry's cache and feeds only the rest; an entry whose ids equal the request's can continue only if it kept the
logits of its last position (``last_logits``).

Two entries are stored per request: the prompt, right after prefill (with its logits), and the prompt plus the
answer. The next turn of a session matches the second when the client sends the answer back as it was generated,
and the first otherwise (for example after a stop string cut the answer, or when its text re-tokenizes differently).
A document's own cache is the entry with no ids after it.

``holding(entry)`` keeps an entry findable while one request runs on it even if the bounds evict it at once (a
compressed prompt larger than the byte bound is still answered; it is just not kept for the next turn).

Bounded by entries and by bytes: least recently used entries go first. ``kv_bytes`` counts the storage of every
tensor behind a cache once, even when entries share tensors (a fork shares its parent's).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from array import array
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from kvlab.cache.kvcache import KVCache
from kvlab.engine.conversation import CompressionRule


@dataclass
class Entry:
    document_id: str  # "" when the conversation has no document
    token_ids: tuple[int, ...]  # tokens after the document
    cache: KVCache  # holds the document plus token_ids[:fed_tokens]; never modified (requests fork it)
    fed_tokens: int
    last_logits: torch.Tensor | None  # (vocab,) fp32 predicting the token after token_ids, when all were fed
    rule: CompressionRule | None = None  # a document session's re-compression rule (its policy and budget)

    @property
    def document_tokens(self) -> int:
        """Tokens of the document this entry continues (0 without a document)."""
        return self.cache.num_tokens - self.fed_tokens

    @property
    def pending_ids(self) -> tuple[int, ...]:
        return self.token_ids[self.fed_tokens:]


def prefix_key(document_id: str, token_ids: Sequence[int]) -> str:
    data = array("q", token_ids).tobytes()
    return hashlib.sha256(document_id.encode() + b"\0" + data).hexdigest()


class PrefixCache:
    """LRU of Entry objects; thread-safe (the worker reads and writes, request threads delete and measure)."""

    def __init__(self, max_bytes: int, max_entries: int = 64) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lengths: dict[str, Counter] = {}  # document id -> Counter of stored token-id lengths
        self._held: dict[str, Entry] = {}  # document id -> its base entry while ``holding`` it
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, document_id: str, token_ids: Sequence[int]) -> Entry | None:
        """The entry with the longest ids that ``token_ids`` starts with and that can continue to it, or None."""
        wanted = len(token_ids)
        with self._lock:
            lengths = sorted(self._lengths.get(document_id, ()), reverse=True)
            for length in lengths:
                if length > wanted:
                    continue
                key = prefix_key(document_id, token_ids[:length])
                entry = self._entries.get(key)
                if entry is None or list(entry.token_ids) != list(token_ids[:length]):
                    continue
                if length == wanted and entry.pending_ids == () and entry.last_logits is None:
                    continue  # nothing left to feed and no logits to sample from
                self._entries.move_to_end(key)
                return entry
            held = self._held.get(document_id)
        if held is None or len(held.token_ids) >= wanted:
            return None
        return held if list(held.token_ids) == list(token_ids[:len(held.token_ids)]) else None

    @contextlib.contextmanager
    def holding(self, entry: Entry) -> Iterator[None]:
        """While the block runs, ``lookup`` on ``entry.document_id`` falls back to ``entry`` (a base with no ids after
        it) when nothing longer matches, whether or not the bounds kept it."""
        with self._lock:
            self._held[entry.document_id] = entry
        try:
            yield
        finally:
            with self._lock:
                self._held.pop(entry.document_id, None)

    def put(self, document_id: str, token_ids: Sequence[int], cache: KVCache, fed_tokens: int,
            last_logits: torch.Tensor | None = None, rule: CompressionRule | None = None) -> None:
        """Keep ``cache`` (the caller must not grow it afterwards: pass a fork) and evict down to the bounds."""
        entry = Entry(document_id, tuple(int(t) for t in token_ids), cache, fed_tokens, last_logits, rule)
        key = prefix_key(document_id, entry.token_ids)
        with self._lock:
            if key in self._entries:
                self._forget(key)
            self._entries[key] = entry
            self._lengths.setdefault(document_id, Counter())[len(entry.token_ids)] += 1
            while self._entries and (len(self._entries) > self.max_entries or self._kv_bytes() > self.max_bytes):
                self._forget(next(iter(self._entries)))

    def drop_document(self, document_id: str) -> int:
        """Forget every entry on ``document_id``; returns how many there were."""
        with self._lock:
            keys = [key for key, entry in self._entries.items() if entry.document_id == document_id]
            for key in keys:
                self._forget(key)
            return len(keys)

    def has_document(self, document_id: str) -> bool:
        with self._lock:
            return document_id in self._lengths

    @property
    def kv_bytes(self) -> int:
        with self._lock:
            return self._kv_bytes()

    def _kv_bytes(self) -> int:
        storages: dict[int, int] = {}
        for entry in self._entries.values():
            for layer in entry.cache.layers:
                for tensor in layer.storages():
                    storage = tensor.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def _forget(self, key: str) -> None:
        entry = self._entries.pop(key)
        lengths = self._lengths[entry.document_id]
        lengths[len(entry.token_ids)] -= 1
        if lengths[len(entry.token_ids)] <= 0:
            del lengths[len(entry.token_ids)]
        if not lengths:
            del self._lengths[entry.document_id]


@dataclass(frozen=True)
class Base:
    """A compressed context in the prefix cache: ``token_ids`` are the context's, under ``id``."""

    id: str
    recipe_key: str
    token_ids: tuple[int, ...]
    budget_tokens: int
    kept_tokens: float


class PromptBases:
    """The compressed prompt contexts (``server.prompt_compression``) the prefix cache may still hold, to find the
    one a later turn continues. Holds no cache itself (the prefix cache bounds the memory); an id the prefix cache
    has dropped is forgotten here too."""

    def __init__(self) -> None:
        self._bases: dict[str, Base] = {}
        self._lock = threading.Lock()

    def add(self, base: Base, max_bases: int) -> None:
        with self._lock:
            self._bases.pop(base.id, None)
            self._bases[base.id] = base
            while len(self._bases) > max_bases:
                del self._bases[next(iter(self._bases))]

    def find(self, sessions: PrefixCache, recipe_key: str, token_ids: list[int], context_tokens: int) -> Base | None:
        """The longest base made with ``recipe_key`` whose ids start ``token_ids`` within its first
        ``context_tokens``, if the prefix cache still holds it."""
        with self._lock:
            for gone in [id for id in self._bases if not sessions.has_document(id)]:
                del self._bases[gone]
            found = [base for base in self._bases.values() if base.recipe_key == recipe_key
                     and len(base.token_ids) <= context_tokens
                     and tuple(token_ids[:len(base.token_ids)]) == base.token_ids]
        return max(found, key=lambda base: len(base.token_ids), default=None)
