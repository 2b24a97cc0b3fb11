"""One error hierarchy for everything a user can cause.

Every message names the fix. The CLI prints ``str(error)`` on one line and exits with code 2; nothing deeper in the
package catches these, so they surface unchanged.
"""

from __future__ import annotations


class KvlabError(Exception):
    """Base class: an error the user can fix; its message says how."""


class UnknownNameError(KvlabError, KeyError):
    """A name (policy, model, parameter) that is not registered."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class UnknownPolicyError(UnknownNameError):
    pass


class UnknownModelError(UnknownNameError):
    pass


class ParameterError(KvlabError, ValueError):
    """A parameter outside its allowed range, or of the wrong type."""


class BudgetError(ParameterError):
    """A ratio or token budget that cannot be honoured."""


class ContextTooLongError(KvlabError, ValueError):
    """The prompt plus the tokens to generate exceed the model's context window."""


class ModelLoadError(KvlabError, RuntimeError):
    """A model could not be located, converted or loaded."""


class UnsupportedModelError(KvlabError, RuntimeError):
    """The model's architecture does not route attention through transformers' attention interface."""


class UnknownTaskError(UnknownNameError):
    pass


class DataError(KvlabError, ValueError):
    """A benchmark data file or haystack folder that cannot be used as given."""


class CacheFileError(KvlabError, ValueError):
    """A persisted KV-cache file (``.kv``) that cannot be used; the message names the file and the fix."""


class MissingCacheFileError(CacheFileError):
    """The path does not exist, is a directory, or cannot be read."""


class CorruptCacheError(CacheFileError):
    """Not a kvlab cache file, or truncated or corrupted: it must be recreated."""


class CacheChecksumError(CorruptCacheError):
    """The recorded SHA-256 of the metadata or of the tensor payload does not match the file's contents."""


class CacheMetadataError(CorruptCacheError):
    """The metadata is malformed (missing keys, wrong types) or does not match the tensors."""


class CacheVersionError(CacheFileError):
    """The file was written in a format this kvlab does not read (made by a newer kvlab)."""


class CacheMismatchError(CacheFileError):
    """The file was made for another model or tokenizer than the one loaded."""


class UnknownCacheEntryError(UnknownNameError):
    """No entry of the cache store matches the given key or prefix."""
