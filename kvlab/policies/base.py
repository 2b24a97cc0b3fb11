"""The policy contract: a score over a layer's slots, the windows it protects, and a budget rule.

A policy is a frozen dataclass whose fields are its parameters, each declared with ``param`` (help text, unit,
range). The CLI flags, ``kvlab policies`` and validation are all derived from those fields. Selection, budgets,
protection and position bookkeeping are shared (``kvlab.cache.selection``, ``kvlab.policies.budgets``); a policy
file says only what is new.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvlab.cache.kvcache import KVCache
from kvlab.cache.layout import LayerSpec
from kvlab.cache.observations import LayerObservation, ObservationRequest
from kvlab.errors import ParameterError
from kvlab.policies.budgets import BudgetRule, KeepAllBudget, UniformBudget


def param(default: Any, help: str, *, unit: str = "", minimum: float | None = None,
          maximum: float | None = None, choices: tuple[str, ...] | None = None):
    """A policy parameter: a dataclass field carrying its help text, unit and allowed range."""
    return dataclasses.field(default=default, metadata={
        "help": help, "unit": unit, "minimum": minimum, "maximum": maximum, "choices": choices,
    })


@dataclass(frozen=True)
class ScoreInputs:
    """One layer as a policy sees it (shapes without batch dimension).

    keys, values: (kv_heads, slots, head_dim); positions: (kv_heads, slots), -1 for padding;
    observation: what prefill recorded for this layer (None if nothing was requested).
    """

    layer_index: int
    spec: LayerSpec
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    observation: LayerObservation | None


@dataclass(frozen=True)
class Policy:
    """Base class; subclasses are registered with ``@register_policy(name)`` and set ``paper`` and ``rule``."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    rule: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            validate_param(self.name, field, getattr(self, field.name))

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """(kv_heads, slots) float: higher means keep."""
        raise NotImplementedError

    def observation_request(self) -> ObservationRequest:
        return ObservationRequest()

    def protected_sink_tokens(self) -> int:
        """Tokens at the start of the sequence that are always kept (tokens)."""
        return 0

    def protected_recent_tokens(self, budget_tokens: int) -> int:
        """Tokens at the end of the compressible region that are always kept (tokens)."""
        return 0

    def budget_rule(self) -> BudgetRule:
        return UniformBudget()

    @property
    def keeps_all_tokens(self) -> bool:
        """True for policies that evict nothing (``full``, ``quest``): there is nothing to compress again."""
        return isinstance(self.budget_rule(), KeepAllBudget)

    def arrange(self, cache: KVCache, budget_tokens: int) -> KVCache:
        """The cache as this policy decodes on it, after selection (and again when a file is loaded): the kept
        layers as they are, unless the policy holds them another way (``quest`` pages them)."""
        return cache

    def params(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def describe(self) -> str:
        settings = ", ".join(f"{key}={value}" for key, value in self.params().items())
        return f"{self.name}({settings})"


def validate_param(policy_name: str, field: dataclasses.Field, value: Any) -> None:
    meta = field.metadata
    label = f"{policy_name}: {field.name}"
    if meta.get("choices") and value not in meta["choices"]:
        raise ParameterError(f"{label} must be one of {', '.join(meta['choices'])} (got {value!r})")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta.get("minimum") is not None and value < meta["minimum"]:
            raise ParameterError(f"{label} must be >= {meta['minimum']} (got {value}); pass -p {field.name}=VALUE")
        if meta.get("maximum") is not None and value > meta["maximum"]:
            raise ParameterError(f"{label} must be <= {meta['maximum']} (got {value}); pass -p {field.name}=VALUE")


def group_mean(per_query_head: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """Average a (query_heads, ...) tensor over the query heads that share each KV head → (kv_heads, ...)."""
    return per_query_head.reshape(spec.kv_heads, spec.group_size, *per_query_head.shape[1:]).mean(dim=1)
