"""Multi-turn questions over one (compressed) document cache.

Each turn appends the question to the cache, decodes the answer and leaves the answer in the cache, so the next
question sees the conversation so far. When the cache outgrows its budget by more than ``headroom`` the policy
compresses it again, scoring with what the newest turn's tokens observed (their queries form the observation
window; H2O's sums cover them only). The newest question is never evicted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from kvlab.cache.kvcache import KVCache
from kvlab.cache.observations import ObservationRequest, Observations
from kvlab.engine.compress import compress
from kvlab.engine.observe import ObservationRecorder
from kvlab.engine.sampling import SamplingConfig
from kvlab.errors import ParameterError
from kvlab.policies.base import Policy

DEFAULT_HEADROOM = 0.25  # fraction above the budget a cache may grow before it is compressed again


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
    but not yet fed (the last token of an answer cut at ``max_new_tokens``). Without ``policy`` or
    ``budget_tokens`` the cache only grows.
    """

    engine: object
    cache: KVCache
    policy: Policy | None = None
    budget_tokens: int | None = None
    headroom: float = DEFAULT_HEADROOM
    turns_before: int = 0
    pending_ids: list[int] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.headroom < 0:
            raise ParameterError(f"headroom must be >= 0 (got {self.headroom})")
        self.cache = self.cache.fork()

    @property
    def answered(self) -> int:
        return self.turns_before + len(self.turns)

    def ask(self, question: str, *, max_new_tokens: int = 64, sampling: SamplingConfig = SamplingConfig(),
            answer_prefix: str = "", force: bool = False) -> Turn:
        if not question.strip():
            raise ParameterError("the question is empty")
        if max_new_tokens < 1:
            raise ParameterError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
        engine = self.engine
        asked = engine.question_ids(question, answer_prefix, follow_up=self.answered > 0)
        new_ids = torch.cat([torch.tensor(self.pending_ids, dtype=torch.long), asked])
        engine.check_length(self.cache.num_tokens + int(new_ids.numel()) + max_new_tokens, force=force)
        started = time.perf_counter()
        first_logits, observations = self._feed(new_ids)
        question_s = time.perf_counter() - started
        compress_s, recompressed = 0.0, False
        if self._over_budget():
            self.cache, compress_s = compress(self.cache, self.policy, observations,
                                              budget_tokens=self.budget_tokens,
                                              compressible_tokens=self.cache.num_tokens - int(new_ids.numel()))
            recompressed = True
        generation = engine.continue_and_decode(self.cache, None, first_logits, max_new_tokens=max_new_tokens,
                                                sampling=sampling)
        # the decoder feeds every sampled token but the last of an answer cut short; it goes in with the next turn
        self.pending_ids = generation.token_ids[-1:] if generation.stopped_by == "max_new_tokens" else []
        turn = Turn(question=question,
                    answer=engine.tokenizer.decode(generation.token_ids, skip_special_tokens=True).strip(),
                    token_ids=generation.token_ids, question_tokens=int(asked.numel()), question_s=question_s,
                    compress_s=compress_s, decode_s=generation.seconds, recompressed=recompressed,
                    kept_tokens=self.cache.kept_tokens(), stopped_by=generation.stopped_by)
        self.turns.append(turn)
        return turn

    def _feed(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, Observations]:
        """Append ``token_ids``; return the last logits and what their queries observed (for re-compression)."""
        count = int(token_ids.numel())
        request = self.policy.observation_request() if self.policy is not None else ObservationRequest()
        recorder = None
        if request.window_tokens or request.attention_sums:
            window = ObservationRequest(min(request.window_tokens or count, count), request.attention_sums)
            recorder = ObservationRecorder(window, self.engine.layout, total_tokens=self.cache.num_tokens + count)
        logits = self.engine.feed(self.cache, token_ids, observer=recorder)
        return logits, recorder.observations if recorder is not None else Observations()

    def _over_budget(self) -> bool:
        if self.policy is None or self.budget_tokens is None or self.policy.name == "full":
            return False
        return self.cache.kept_tokens() > math.floor(self.budget_tokens * (1 + self.headroom))
