"""Answer a question with an input method: shorten the document, prefill what is left with the full cache, answer.

The ``Answer`` it returns reads like a KV policy's: ``context_tokens`` and the ``kv_bytes_full*`` figures are those
of the *original* document (so ``compression`` compares with its full cache), ``kept_tokens`` are the context tokens
the model was given, ``prefill_s`` the shortened prefill, and ``compress_s`` the method's own time (scoring passes
through the model included). ``extra`` adds ``family``, ``input_context_tokens`` and ``method_query_aware``.
"""

from __future__ import annotations

import dataclasses

from kvlab.engine import Answer, Engine
from kvlab.inputs.base import InputMethod
from kvlab.inputs.surprisal import fresh_cache
from kvlab.policies import make_policy


def full_cache_bytes(engine: Engine, tokens: int) -> tuple[int, int]:
    """(bytes at the model's dtype, bytes at fp16) of an uncompressed cache of ``tokens`` tokens."""
    probe = fresh_cache(engine)
    probe.num_tokens = tokens
    return probe.full_bytes(), probe.kv_bytes_full_fp16


def ask_with_method(engine: Engine, method: InputMethod, context: str, question: str, *,
                    ratio: float | None = None, budget_tokens: int | None = None, query_aware: bool = False,
                    answer_prefix: str = "", **ask_options) -> Answer:
    """``Engine.ask`` on ``context`` shortened by ``method`` (``ask_options``: max_new_tokens, sampling, force,
    progress, kv_quant, ignore_eos). ``budget_tokens`` counts the document's own tokens, like ``ratio``."""
    original = engine.prompt(context, question, answer_prefix)
    engine.check_length(original.total_tokens + ask_options.get("max_new_tokens", 64),
                        force=ask_options.get("force", False))
    reduction = method.reduce(engine, context, question, ratio=ratio, budget_tokens=budget_tokens)
    answer = engine.ask(reduction.text, question, make_policy("full"), query_aware=query_aware,
                        answer_prefix=answer_prefix, **ask_options)
    original_tokens = int(original.prefix_ids.numel()) + (int(original.suffix_ids.numel()) if query_aware else 0)
    full_bytes, full_fp16 = full_cache_bytes(engine, original_tokens)
    return dataclasses.replace(
        answer, policy=method.name, policy_params=method.params(), ratio=ratio,
        budget_tokens=reduction.budget_tokens, context_tokens=int(original.prefix_ids.numel()),
        kept_tokens=float(answer.context_tokens), kv_bytes_full=full_bytes, kv_bytes_full_fp16=full_fp16,
        compress_s=answer.compress_s + reduction.seconds,
        extra={**answer.extra, "family": "input", "input_context_tokens": answer.context_tokens,
               "method_query_aware": method.query_aware})
