"""Persisted compressed KV caches: the ``.kv`` file format (``format``) and a content-addressed store (``store``)."""

from kvlab.store.format import FILE_SUFFIX, LoadedCache, load_cache, meta_for, read_meta, save_cache
from kvlab.store.meta import FORMAT_VERSION, CacheMeta
from kvlab.store.store import CacheStore, StoreEntry, key_for, key_for_meta, parse_size

__all__ = ["FILE_SUFFIX", "FORMAT_VERSION", "CacheMeta", "CacheStore", "LoadedCache", "StoreEntry", "key_for",
           "key_for_meta", "load_cache", "meta_for", "parse_size", "read_meta", "save_cache"]
