"""Apply a policy to a KVCache: score each full-attention layer, protect sinks and the recent window, split the
budget with the policy's rule, keep the best slots.

Sliding-window layers (Gemma 3's local ones) are trimmed to their newest tokens at the same share: a layer whose
window holds ``w`` document tokens keeps the newest ``ceil(w * budget / compressible)`` of them (``sliding_budget``).
The policy's scores are not used there: such a layer only ever sees its last ``window - 1`` tokens, and a shorter
suffix is a state the model knows (its local layers never see the sequence start once past the window), where a
scattered subset would leave slots behind that the window should have dropped. KVzip's reference code leaves these
layers whole (on 12B-scale Gemma 3 at 100K tokens they are a sliver of the cache); on Gemma 3 270M at 1K-4K tokens
they hold 38-71% of it, so without trimming no ratio can bring the cache under 1/8."""

from __future__ import annotations

import math
import time

from kvlab.cache.kvcache import KVCache
from kvlab.cache.layout import LayerSpec
from kvlab.cache.observations import Observations
from kvlab.cache.selection import eligible_scores, keep_newest, protection_mask, select_slots
from kvlab.errors import BudgetError
from kvlab.policies.base import Policy, ScoreInputs


def budget_from_ratio(ratio: float, compressible_tokens: int) -> int:
    """Tokens kept per head per layer when ``ratio`` of the ``compressible_tokens`` are evicted."""
    if not 0.0 <= ratio < 1.0:
        raise BudgetError(f"ratio must be in [0, 1): the fraction of context tokens evicted (got {ratio})")
    return max(1, math.ceil(compressible_tokens * (1.0 - ratio) - 1e-9))


def sliding_budget(spec: LayerSpec, budget_tokens: int, compressible_tokens: int) -> int:
    """Document tokens a sliding-window layer keeps: its window's share of ``compressible_tokens`` scaled by the
    full layers' ``budget_tokens / compressible_tokens`` (at least 1). It depends on the budget, not on what the
    layer holds now, so compressing the same cache again (a conversation, a streamed document) changes nothing."""
    window = spec.retained_tokens
    assert window is not None, "only sliding-window layers have a sliding budget"
    held = min(window, compressible_tokens)
    if budget_tokens >= compressible_tokens:
        return held
    return max(1, math.ceil(held * budget_tokens / compressible_tokens - 1e-9))


def compress(cache: KVCache, policy: Policy, observations: Observations, *, budget_tokens: int,
             compressible_tokens: int | None = None, trim_sliding: bool = True) -> tuple[KVCache, float]:
    """Return (compressed copy of ``cache``, seconds). ``cache`` is left untouched. The seconds include the extra
    passes of the probes ``policy`` requested (KVzip's reconstruction, for example).

    ``budget_tokens`` is the mean number of tokens kept per head per full-attention layer among positions below
    ``compressible_tokens`` (default: the whole cache); later positions (a question in query-aware mode) are kept
    on top of the budget.
    """
    started = time.perf_counter()
    compressible = cache.num_tokens if compressible_tokens is None else compressible_tokens
    sinks = policy.protected_sink_tokens()
    if budget_tokens < max(1, sinks):
        raise BudgetError(f"budget of {budget_tokens} tokens is below the {policy.name} sink size ({sinks}); "
                          f"raise --budget to at least {max(1, sinks)} or lower the ratio")
    recent = min(policy.protected_recent_tokens(budget_tokens), max(budget_tokens - sinks, 0))
    protected_tokens = min(sinks + recent, budget_tokens)

    # A fork, not the cache itself: layers that are not trimmed pass through, and decoding on the copy must not
    # grow them in ``cache``.
    compressed = cache.fork()
    full_layers = [index for index, layer in enumerate(cache.layers) if layer.spec.kind == "full"]
    ranked = []
    for index in full_layers:
        layer = cache.layers[index]
        inputs = ScoreInputs(index, layer.spec, layer.keys, layer.values, layer.positions,
                             observations.layer(index))
        scores = policy.score(inputs).to(layer.keys.device)
        if scores.shape != layer.positions.shape:
            raise RuntimeError(f"{policy.name} returned scores of shape {tuple(scores.shape)} for layer {index}, "
                               f"expected {tuple(layer.positions.shape)}")
        protected = protection_mask(layer.positions, sinks, compressible - recent, compressible)
        ranked.append(eligible_scores(scores, layer.positions, protected, compressible))
    counts = policy.budget_rule().allocate(ranked, budget_tokens, protected_tokens)
    for index, layer_ranked, layer_counts in zip(full_layers, ranked, counts):
        compressed.layers[index] = select_slots(cache.layers[index], layer_ranked, layer_counts, compressible)
    if trim_sliding and not policy.keeps_all_tokens:
        for index, layer in enumerate(cache.layers):
            if layer.spec.kind == "sliding":
                keep = sliding_budget(layer.spec, budget_tokens, compressible)
                compressed.layers[index] = keep_newest(layer, keep, compressible)
    compressed = policy.arrange(compressed, budget_tokens + cache.num_tokens - compressible)  # the question too
    return compressed, time.perf_counter() - started + observations.cost_of(policy.observation_request())
