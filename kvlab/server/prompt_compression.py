"""Compress the prompt of a request without a document, the way a posted document is compressed.

``plan`` runs in the route, before the request is queued: it picks the recipe (policy, ratio or budget, KV
quantization) and refuses a bad one with a 400 that names the fix. A request whose ``kvlab`` object names a
``policy``, ``policy_params``, ``ratio``, ``budget_tokens`` or ``kv_quant`` is compressed with it whatever its
length; any other is compressed with the server's policy once its prompt is longer than ``--compress-above``
tokens. The full policy without quantization evicts nothing, so it is never run.

``answer`` runs on the worker. It splits the prompt into its context and its question (``prompts.py``), prefills
the context with the policy's observations and compresses it query-agnostically (``engine.prefill`` then
``engine.compress``, then ``quantize_in_memory``: the path of ``store.documents.compress_document``, without the
file), and answers the question on top with ``generation.generate``, as on a document. The compressed context stays
in the prefix cache as the *base* of the conversation (id ``prompt:<hash of recipe and ids>``), so the next turn,
whose ids start with the same context, feeds only its new tokens under the document sessions' conversation rule
(compressed again past the budget's headroom) instead of compressing everything again.

The ``kvlab`` object of the response says what was done (``Outcome``); its token counts treat a context compressed
in this request as prefilled, not cached, and so do the server's counters (``generate``'s ``fresh_tokens``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvlab.errors import ParameterError, UnknownPolicyError
from kvlab.policies.base import Policy
from kvlab.server.errors import ApiError
from kvlab.server.generation import Options, Result, _max_new_tokens, generate
from kvlab.server.prompts import Prompt
from kvlab.server.sessions import Base, Entry

if TYPE_CHECKING:
    from kvlab.server.schemas import KvlabOptions
    from kvlab.server.settings import Settings
    from kvlab.server.state import ServerState
    from kvlab.server.worker import Job

BASE_PREFIX = "prompt:"  # prefix-cache ids of compressed prompt contexts (document ids are 64 hex characters)


@dataclass(frozen=True)
class Recipe:
    """How a context is compressed: ``ratio`` or ``budget_tokens`` (context tokens kept per head per layer)."""

    policy: Policy
    ratio: float | None
    budget_tokens: int | None
    kv_quant: str | None  # int8, int4, int2 or None

    @property
    def key(self) -> str:
        return json.dumps([self.policy.name, self.policy.params(), self.ratio, self.budget_tokens, self.kv_quant],
                          sort_keys=True, default=str)


@dataclass(frozen=True)
class Plan:
    """What a request's prompt gets: ``recipe`` (None: never compressed, ``reason`` says why) once the prompt is
    longer than ``above_tokens`` (None: whatever its length)."""

    recipe: Recipe | None
    reason: str
    above_tokens: int | None = None


@dataclass(frozen=True)
class Outcome:
    """What was done to the prompt's context; the compression fields of the response's ``kvlab`` object."""

    compressed: bool
    reason: str
    policy: str | None = None
    policy_params: dict = dataclasses.field(default_factory=dict)
    ratio: float | None = None
    budget_tokens: int | None = None
    kv_quant: str | None = None
    context_tokens: int = 0
    kept_tokens: float | None = None

    def fields(self) -> dict:
        data = dataclasses.asdict(self)
        data["compression_reason"] = data.pop("reason")
        if data["kept_tokens"] is not None:
            data["kept_tokens"] = round(data["kept_tokens"], 3)
        return data


@dataclass
class Answered(Result):
    """A generation's result with what was done to its prompt."""

    outcome: Outcome = Outcome(False, "no_context")


# -- the route side -----------------------------------------------------------------------------------------------
def plan(settings: Settings, options: KvlabOptions, document: bool) -> Plan:
    """The recipe of one request (400 for an unknown policy or parameter, or a recipe given with a document)."""
    if options.compression_requested:
        if document:
            raise ApiError(400, "kvlab.policy, policy_params, ratio, budget_tokens and kv_quant apply to requests "
                                "without a document; a document is compressed when it is posted (POST "
                                "/v1/documents with policy and ratio)", param="kvlab.policy")
        name = options.policy or settings.policy
        given = options.policy_params or {}
        params = given if options.policy else {**settings.policy_params, **given}
        amount = (options.ratio, options.budget_tokens)
        if amount == (None, None):
            amount = (settings.document_ratio(name, None, None), settings.document_budget(name, None, None))
        kv_quant = settings.kv_quant if options.kv_quant is None else options.kv_quant
        recipe = Recipe(_policy(name, params), *amount, None if kv_quant == "none" else kv_quant)
        reason = "requested"
    elif document:
        return Plan(None, "document")
    elif settings.compress_above is None:
        return Plan(None, "disabled")
    else:
        recipe = Recipe(_policy(settings.policy, settings.policy_params),
                        settings.document_ratio(settings.policy, None, None),
                        settings.document_budget(settings.policy, None, None), settings.kv_quant)
        reason = "over_threshold"
    if recipe.policy.name == "full" and recipe.kv_quant is None:
        return Plan(None, "policy_full")
    return Plan(recipe, reason, settings.compress_above if reason == "over_threshold" else None)


def _policy(name: str, params: dict) -> Policy:
    from kvlab.policies import make_policy

    try:
        return make_policy(name, **params)
    except UnknownPolicyError as error:
        raise ApiError(400, str(error), param="kvlab.policy", code="unknown_policy") from None
    except ParameterError as error:
        raise ApiError(400, f"{error}; fix kvlab.policy_params", param="kvlab.policy_params",
                       code="invalid_parameter") from None


# -- the worker side ----------------------------------------------------------------------------------------------
def answer(state: ServerState, job: Job, prompt: Prompt, context_tokens: Callable[[list[int]], int], plan: Plan,
           options: Options, submitted: float, run: Callable[..., Result] = generate) -> Answered:
    """Run one request on the worker: compress its context when ``plan`` says so, then generate with ``run``
    (``generation.generate``; the route passes its own reference, which tests replace). ``context_tokens(ids)``
    counts the context at the start of ``prompt.token_ids`` (called only when needed). An echoed prompt
    (/v1/completions ``echo``) is never compressed: its text and logprobs cover all of it."""
    queue_s = time.monotonic() - submitted
    if prompt.document_id is not None:
        return _with(run(state, job, prompt, options, submitted), _document_outcome(state, prompt.document_id))
    ids, recipe = prompt.token_ids, plan.recipe
    if recipe is None or getattr(options, "echo", False):
        reason = plan.reason if recipe is None else "echo"
        return _with(run(state, job, prompt, options, submitted), Outcome(False, reason))
    if plan.above_tokens is not None and len(ids) <= plan.above_tokens:
        return _with(run(state, job, prompt, options, submitted), Outcome(False, "under_threshold"))
    context = min(context_tokens(ids), len(ids) - 1)
    budget = _budget(recipe, context)
    if context <= 0:
        return _with(run(state, job, prompt, options, submitted), Outcome(False, "no_context"))
    if budget is None:
        if plan.reason == "requested":
            _budget(recipe, context, strict=True)  # a 400 that names the fix
        return _with(run(state, job, prompt, options, submitted), Outcome(False, "context_too_short"))
    _max_new_tokens(state, len(ids), options.max_new_tokens)  # a prompt too long fails before the prefill
    fresh_tokens, fresh_s = 0, 0.0
    base = state.prompt_bases.find(state.sessions, recipe.key, ids, context)
    entry = None if base is None else state.sessions.lookup(base.id, ids[len(base.token_ids):])
    if base is None or entry is None:
        base, entry, fresh_s = _compress(state, job, ids[:context], recipe, budget)
        fresh_tokens = context
    with state.sessions.holding(entry) if fresh_tokens else contextlib.nullcontext():
        result = run(state, job, Prompt(ids[len(base.token_ids):], base.id), options, submitted,
                     fresh_tokens=fresh_tokens)
    result.document_id = None
    result.prefill_s += fresh_s
    result.queue_s = queue_s  # ``run`` counted the compression as waiting
    params = recipe.policy.params()
    return _with(result, Outcome(True, plan.reason, recipe.policy.name, params, recipe.ratio, base.budget_tokens,
                                 recipe.kv_quant, len(base.token_ids), base.kept_tokens))


def _budget(recipe: Recipe, context_tokens: int, strict: bool = False) -> int | None:
    """Context tokens kept per head, or None when the context is too short for the policy's protected sinks."""
    from kvlab.engine import resolve_budget
    from kvlab.errors import BudgetError

    if context_tokens <= 0:
        return None
    budget = resolve_budget(recipe.ratio, recipe.budget_tokens, context_tokens)
    sinks = recipe.policy.protected_sink_tokens()
    if budget < max(1, sinks):
        if strict:
            raise BudgetError(f"the prompt's context is {context_tokens} tokens: a budget of {budget} is below the "
                              f"{recipe.policy.name} sink size ({sinks}); lower kvlab.ratio or send a longer context")
        return None
    return budget


def _compress(state: ServerState, job: Job, context_ids: list[int], recipe: Recipe,
              budget_tokens: int) -> tuple[Base, Entry, float]:
    """Prefill and compress the context, keep it in the prefix cache; returns the base, its entry and seconds."""
    from kvlab.cache.quant import QuantizationParams
    from kvlab.cache.quantized import quantization_of, quantize_in_memory
    from kvlab.engine import context_kept_tokens
    from kvlab.engine.conversation import CompressionRule

    engine = state.engine
    result = engine.prefill(torch.tensor(context_ids, dtype=torch.long), recipe.policy.observation_request(),
                            check=job.check)
    cache, budget, compress_s = engine.compress(result, recipe.policy, budget_tokens=budget_tokens)
    seconds = result.seconds + compress_s
    del result  # the full cache is freed before decoding
    if recipe.kv_quant is not None:
        cache = quantize_in_memory(cache, QuantizationParams(recipe.kv_quant))
    rule = None if recipe.policy.name == "full" else CompressionRule(recipe.policy, budget,
                                                                     kv_quant=quantization_of(cache))
    digest = hashlib.sha256(recipe.key.encode() + b"\0" + array("q", context_ids).tobytes()).hexdigest()
    base = Base(f"{BASE_PREFIX}{digest[:32]}", recipe.key, tuple(context_ids), budget,
                context_kept_tokens(cache, len(context_ids)))
    state.sessions.put(base.id, (), cache, 0, rule=rule)
    state.prompt_bases.add(base, state.settings.session_cache_entries)
    return base, Entry(base.id, (), cache, 0, None, rule), seconds


def _document_outcome(state: ServerState, document_id: str) -> Outcome:
    """The recipe a document was compressed with when it was posted (from its file's header)."""
    from kvlab.server.library import document_meta

    try:
        meta, _ = document_meta(state, document_id)
    except ApiError:  # removed from the store; generate answers from memory or with the 404
        return Outcome(False, "document")
    quant = None if meta.quantization is None else meta.quantization.scheme
    kept = meta.extra.get("kept_tokens")
    return Outcome(meta.policy != "full" or quant is not None, "document", meta.policy, dict(meta.policy_params),
                   meta.ratio, meta.budget_tokens, quant, meta.context_tokens,
                   None if kept is None else float(kept))


def _with(result: Result, outcome: Outcome) -> Answered:
    return Answered(**{field.name: getattr(result, field.name) for field in dataclasses.fields(Result)},
                    outcome=outcome)
