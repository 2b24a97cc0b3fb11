"""Input-level methods: shorten the context text to the budget, then prefill it with the full cache.

``@register_input_method(name)`` in the defining file; ``make_input_method(name, **params)`` builds one (string
values from the CLI are converted to each field's type, unknown keys refused, as for policies). Outside packages add
methods through the ``kvlab.inputs`` entry-point group.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import typing
from typing import TYPE_CHECKING, Any

from kvlab.errors import ParameterError, UnknownPolicyError
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
    fields = {field.name: field for field in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    converted = {}
    for key, value in params.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.4)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ParameterError(f"{name} has no parameter {key!r}.{hint} Its parameters: {', '.join(fields)}")
        converted[key] = _convert(name, key, value, hints[key])
    return cls(**converted)


def _convert(method: str, key: str, value: Any, target: type) -> Any:
    if not isinstance(value, str) or target is str:
        return value
    try:
        return target(value)
    except ValueError:
        raise ParameterError(f"{method}: {key} must be a {target.__name__} (got {value!r})") from None


BUILTIN_INPUT_MODULES = ("llmlingua", "rag_bm25", "rag_dense", "selective_context")


def _import_builtin_methods() -> None:
    for module in BUILTIN_INPUT_MODULES:
        importlib.import_module(f"kvlab.inputs.{module}")


_import_builtin_methods()

__all__ = ["INPUT_METHODS", "is_input_method", "list_input_methods", "make_input_method", "register_input_method"]
