"""Input-level methods: shorten the context text to the budget, then prefill it with the full cache.

``@register_input_method(name)`` in the defining file; ``make_input_method(name, **params)`` builds one (string
values from the CLI are converted to each field's type, unknown keys refused, as for policies). Outside packages add
methods through the ``kvlab.inputs`` entry-point group.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvlab.errors import UnknownPolicyError
from kvlab.policies import build_from_params
from kvlab.registry import Registry

if TYPE_CHECKING:
    from kvlab.inputs.base import InputMethod

INPUT_METHODS: Registry[type[InputMethod]] = Registry("input method", UnknownPolicyError,
                                                      entry_point_group="kvlab.inputs")


def register_input_method(name: str):
    def decorator(cls):
        cls.name = name
        return INPUT_METHODS.register(name)(cls)

    return decorator


def list_input_methods() -> list[str]:
    return INPUT_METHODS.names()


def is_input_method(name: str) -> bool:
    return name in INPUT_METHODS


def make_input_method(name: str, **params: Any) -> InputMethod:
    """Build an input method; string values are converted to the field's type; unknown keys are refused."""
    cls = INPUT_METHODS.get(name)
    return build_from_params(name, cls, params)


BUILTIN_INPUT_MODULES = ("llmlingua", "rag_bm25", "rag_dense", "selective_context")


def _import_builtin_methods() -> None:
    for module in BUILTIN_INPUT_MODULES:
        importlib.import_module(f"kvlab.inputs.{module}")


_import_builtin_methods()

__all__ = ["INPUT_METHODS", "is_input_method", "list_input_methods", "make_input_method", "register_input_method"]
