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
