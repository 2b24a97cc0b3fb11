"""Policy registry: ``@register_policy(name)`` in the defining file; ``make_policy(name, **params)`` to build one.

Outside packages add policies through the ``kvlab.policies`` entry-point group (the entry point's module registers
its classes on import).
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
    from kvlab.policies.base import Policy

POLICIES: Registry[type[Policy]] = Registry("policy", UnknownPolicyError, entry_point_group="kvlab.policies")


def register_policy(name: str):
    def decorator(cls):
        cls.name = name
        return POLICIES.register(name)(cls)

    return decorator


def list_policies() -> list[str]:
    return POLICIES.names()


def policy_class(name: str) -> type:
    return POLICIES.get(name)


def make_policy(name: str, **params: Any):
    """Build a policy; string values (from the CLI) are converted to each field's type; unknown keys are refused."""
    return build_from_params(name, POLICIES.get(name), params)


def build_from_params(name: str, cls: type, params: dict[str, Any]):
    """``cls(**params)`` for a frozen dataclass of parameters (a policy, an input method): string values (from the
    CLI) are converted to each field's type; an unknown key is refused with the closest name and the known ones."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    converted = {}
    for key, value in params.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.4)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            known = ", ".join(fields) or "none"
            raise ParameterError(f"{name} has no parameter {key!r}.{hint} Its parameters: {known}")
        converted[key] = _convert(name, key, value, hints[key])
    return cls(**converted)


def _convert(policy: str, key: str, value: Any, target: type) -> Any:
    if not isinstance(value, str) or target is str:
        return value
    try:
        if target is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        return target(value)
    except ValueError:
        raise ParameterError(f"{policy}: {key} must be a {target.__name__} (got {value!r})") from None


BUILTIN_POLICY_MODULES = ("adakv", "duo", "expected_attention", "full", "h2o", "knorm", "kvzip", "pyramidkv",
                          "quest", "random", "snapkv", "streaming_llm", "tova")


def _import_builtin_policies() -> None:
    for module in BUILTIN_POLICY_MODULES:
        importlib.import_module(f"kvlab.policies.{module}")


_import_builtin_policies()

__all__ = ["POLICIES", "build_from_params", "list_policies", "make_policy", "policy_class", "register_policy"]
