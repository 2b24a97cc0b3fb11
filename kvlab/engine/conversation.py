"""Multi-turn questions over one (compressed) document cache.

Each turn appends the question to the cache, decodes the answer and leaves the answer in the cache, so the next
question sees the conversation so far. The conversation rule (``CompressionRule``), the same for ``kvlab chat``,
``ask --cache`` and the server's document sessions: when the cache outgrows its budget by more than ``headroom``
the policy compresses it again, scoring with what the newest turn's tokens observed (their queries form the
observation window; H2O's sums cover them only), and a quantized cache is quantized again. The newest question is
never evicted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvlab.cache.kvcache import KVCache
from kvlab.cache.layout import LayerSpec
from kvlab.cache.observations import ObservationRequest, Observations
from kvlab.cache.quant import QuantizationParams
from kvlab.cache.quantized import quantize_in_memory
from kvlab.engine.compress import compress
from kvlab.engine.observe import ObservationRecorder
from kvlab.engine.sampling import SamplingConfig
from kvlab.errors import ParameterError
from kvlab.policies.base import Policy

if TYPE_CHECKING:
    from kvlab.engine import Engine

DEFAULT_HEADROOM = 0.25  # fraction above the budget a cache may grow before it is compressed again


@dataclass(frozen=True)
class CompressionRule:
    """When and how a growing cache is compressed again: past ``budget_tokens * (1 + headroom)`` kept tokens per
    head, ``policy`` brings it back to ``budget_tokens``; ``kv_quant`` re-quantizes the result."""

    policy: Policy
    budget_tokens: int
    headroom: float = DEFAULT_HEADROOM
    kv_quant: QuantizationParams | None = None

    def __post_init__(self) -> None:
        if self.headroom < 0:
            raise ParameterError(f"headroom must be >= 0 (got {self.headroom})")

    def recorder(self, layout: list[LayerSpec], cache_tokens: int, new_tokens: int,
                 fingerprint: str | None = None) -> ObservationRecorder | None:
        """What the ``new_tokens`` fed on top of ``cache_tokens`` must observe for a re-compression (or None)."""
        request = self.policy.observation_request()
        if request.empty or self.policy.keeps_all_tokens:
            return None
        window = ObservationRequest(min(request.window_tokens or new_tokens, new_tokens), request.attention_sums,
                                    request.probes)
        return ObservationRecorder(window, layout, total_tokens=cache_tokens + new_tokens,
                                   first_position=cache_tokens, model_fingerprint=fingerprint)

    def over_budget(self, cache: KVCache) -> bool:
        if self.policy.keeps_all_tokens:
            return False
        return cache.kept_tokens() > math.floor(self.budget_tokens * (1 + self.headroom))

    def apply(self, cache: KVCache, observations: Observations, protected_from: int, *,
              trim_sliding: bool = True) -> tuple[KVCache, float]:
        """Compress ``cache`` back to the budget; tokens at or after ``protected_from`` (the newest question) stay.
        ``trim_sliding``: see ``engine.compress.compress``. Returns (new cache, seconds)."""
        started = time.perf_counter()
        compressed, _ = compress(cache.dense(), self.policy, observations, budget_tokens=self.budget_tokens,
                                 compressible_tokens=protected_from, trim_sliding=trim_sliding)
        if self.kv_quant is not None:
            compressed = quantize_in_memory(compressed, self.kv_quant)
        return compressed, time.perf_counter() - started


@dataclass
class FedTokens:
    """New tokens fed under a rule: the cache afterwards (compressed again if they took it past the headroom),
    the logits (vocab,) after the last token, and the seconds spent feeding and compressing."""

    cache: KVCache
    logits: torch.Tensor
    feed_s: float
    compress_s: float
    recompressed: bool


def feed_under_rule(engine: Engine, cache: KVCache, token_ids: torch.Tensor, rule: CompressionRule | None, *,
                    check: Callable[[], None] | None = None, chunk_tokens: int | None = None) -> FedTokens:
    """Append ``token_ids`` to ``cache`` (in place), recording what ``rule``'s policy observes, then apply the
    conversation rule: the one step ``kvlab chat`` and the server's document sessions share."""
    started = time.perf_counter()
    count = int(token_ids.numel())
    recorder = None if rule is None else rule.recorder(engine.layout, cache.num_tokens, count,
                                                       engine.loaded.fingerprint)
    logits = engine.feed(cache, token_ids, observer=recorder, check=check, chunk_tokens=chunk_tokens)
    feed_s = time.perf_counter() - started
    if rule is None or not rule.over_budget(cache):
        return FedTokens(cache, logits, feed_s, 0.0, False)
    # probes finish without a replay here: a turn is scored by what its own queries attended to
    observations = recorder.finish(None) if recorder is not None else Observations()
    compressed, compress_s = rule.apply(cache, observations, protected_from=cache.num_tokens - count)
    return FedTokens(compressed, logits, feed_s, compress_s, True)


@dataclass
class Turn:
    """One answered question. Seconds are wall-clock; ``kept_tokens`` is the mean per head after the turn."""

    question: str
    answer: str
    token_ids: list[int]
    question_tokens: int
    question_s: float
    compress_s: float
    decode_s: float
    recompressed: bool
    kept_tokens: float
    stopped_by: str


@dataclass
class Conversation:
    """Questions asked in order over ``cache`` (it is forked, never changed).

    ``turns_before`` counts answers already in the cache (a saved chat); ``pending_ids`` are answer tokens sampled
    but not yet fed (the last token of an answer cut at ``max_new_tokens``). Without ``rule`` the cache only
    grows.
    """

    engine: Engine
    cache: KVCache
    rule: CompressionRule | None = None
    turns_before: int = 0
    pending_ids: list[int] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cache = self.cache.fork()

    @property
    def policy(self) -> Policy | None:
        return None if self.rule is None else self.rule.policy

    @property
    def answered(self) -> int:
        return self.turns_before + len(self.turns)

    def ask(self, question: str, *, max_new_tokens: int = 64, sampling: SamplingConfig = SamplingConfig(),
            answer_prefix: str = "", force: bool = False, on_text: Callable[[str], None] | None = None,
            interrupted: Callable[[], bool] | None = None) -> Turn:
        """Answer ``question`` on top of the conversation so far. ``on_text`` receives the answer's text as it is
        decoded (unstripped deltas); ``interrupted`` returning True ends the answer early, and the partial answer
        stays in the conversation as this turn's (``stopped_by="interrupted"``), as an answer cut at
        ``max_new_tokens`` does."""
        if not question.strip():
            raise ParameterError("the question is empty")
        if max_new_tokens < 1:
            raise ParameterError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
        engine = self.engine
        asked = engine.question_ids(question, answer_prefix, follow_up=self.answered > 0)
        new_ids = torch.cat([torch.tensor(self.pending_ids, dtype=torch.long), asked])
        engine.check_length(self.cache.num_tokens + int(new_ids.numel()) + max_new_tokens, force=force)
        fed = feed_under_rule(engine, self.cache, new_ids, self.rule)
        self.cache = fed.cache
        question_s, compress_s, recompressed = fed.feed_s, fed.compress_s, fed.recompressed
        generation = engine.continue_and_decode(self.cache, None, fed.logits, max_new_tokens=max_new_tokens,
                                                sampling=sampling, on_text=on_text, interrupted=interrupted)
        # the decoder feeds every sampled token but the last of an answer cut short; it goes in with the next turn
        cut_short = generation.stopped_by in ("max_new_tokens", "interrupted")
        self.pending_ids = generation.token_ids[-1:] if cut_short else []
        turn = Turn(question=question,
                    answer=engine.tokenizer.decode(generation.token_ids, skip_special_tokens=True).strip(),
                    token_ids=generation.token_ids, question_tokens=int(asked.numel()), question_s=question_s,
                    compress_s=compress_s, decode_s=generation.seconds, recompressed=recompressed,
                    kept_tokens=self.cache.kept_tokens(), stopped_by=generation.stopped_by)
        self.turns.append(turn)
        return turn
