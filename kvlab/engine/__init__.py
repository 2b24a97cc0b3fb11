"""Engine: prefill a document, compress its KV cache with a policy, answer a question on top of it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from kvlab.cache.kvcache import KVCache
from kvlab.cache.layout import layout_from_config
from kvlab.cache.observations import ObservationRequest
from kvlab.cache.quant import QuantizationParams
from kvlab.cache.quantized import quantize_in_memory
from kvlab.engine.attention import Observer, install
from kvlab.engine.compress import budget_from_ratio, compress
from kvlab.engine.generate import Generation, decode, decode_rows
from kvlab.engine.prefill import DEFAULT_CHUNK_TOKENS, PrefillResult, prefill
from kvlab.engine.prompt import PromptParts, question_ids, split_prompt, stop_token_ids
from kvlab.engine.runner import ModelRunner
from kvlab.engine.sampling import Sampler, SamplingConfig
from kvlab.engine.text import TextStream
from kvlab.errors import BudgetError, ContextTooLongError, ParameterError
from kvlab.models import LoadedModel
from kvlab.policies.base import Policy


@dataclass
class Answer:
    """One answered question with its costs. Bytes are KV bytes; seconds are wall-clock."""

    answer: str
    token_ids: list[int]
    policy: str
    policy_params: dict
    query_aware: bool
    ratio: float | None
    budget_tokens: int
    context_tokens: int
    question_tokens: int
    kept_tokens: float
    kv_bytes_full: int
    kv_bytes_kept: int
    kv_bytes_allocated: int
    kv_bytes_full_fp16: int
    prefill_s: float
    compress_s: float
    decode_s: float
    decode_tokens: int
    kv_quant: str | None = None
    extra: dict = field(default_factory=dict)
    question_s: float = 0.0  # query-agnostic: feeding the question onto the compressed cache (0: it was prefilled)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def compression(self) -> float:
        """``kv_bytes_full_fp16 / kv_bytes_kept``: how many times smaller the held cache is than fp16 full."""
        return compression(self.kv_bytes_full_fp16, self.kv_bytes_kept)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["decode_tokens_per_s"] = round(self.decode_tokens_per_s, 2)
        data["compression"] = round(self.compression, 3)
        return data


def compression(kv_bytes_full_fp16: int, kv_bytes_kept: int) -> float:
    return kv_bytes_full_fp16 / kv_bytes_kept if kv_bytes_kept else float("inf")


def memory_figures(kv_bytes_full: int, kv_bytes_kept: int, kv_bytes_full_fp16: int) -> dict:
    """The byte figures every front end reports, under one set of names (see the README's definitions):
    ``kv_bytes_full`` the uncompressed cache at the model's dtype, ``kv_bytes_kept`` what is held in memory while
    decoding (quantized payload, scales and padding included), ``kv_bytes_full_fp16`` the uncompressed cache at 2
    bytes per element, and ``compression`` = ``kv_bytes_full_fp16 / kv_bytes_kept``."""
    return {"kv_bytes_full": int(kv_bytes_full), "kv_bytes_kept": int(kv_bytes_kept),
            "kv_bytes_full_fp16": int(kv_bytes_full_fp16),
            "compression": round(compression(kv_bytes_full_fp16, kv_bytes_kept), 3)}


class Engine:
    """Wraps a LoadedModel; one sequence at a time."""

    def __init__(self, loaded: LoadedModel, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
        if chunk_tokens < 1:
            raise ParameterError(f"chunk_tokens must be >= 1 (got {chunk_tokens})")
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.layout = layout_from_config(self.model.config)
        self.chunk_tokens = chunk_tokens
        self.stop_ids = stop_token_ids(self.tokenizer, self.model)
        install(self.model)

    # -- building blocks -------------------------------------------------------------------------------------
    def prompt(self, context: str, question: str, answer_prefix: str = "") -> PromptParts:
        return split_prompt(self.tokenizer, context, question, answer_prefix)

    def question_ids(self, question: str, answer_prefix: str = "", *, follow_up: bool = False) -> torch.Tensor:
        """Tokens that ask ``question`` on top of a cache holding the document (or, for a follow-up, a previous
        answer); see ``engine.prompt.question_text``."""
        return question_ids(self.tokenizer, question, answer_prefix, follow_up=follow_up)

    def check_length(self, total_tokens: int, *, force: bool = False) -> None:
        limit = self.loaded.max_context_tokens
        if limit and total_tokens > limit and not force:
            raise ContextTooLongError(
                f"prompt plus generation needs {total_tokens} tokens but {self.loaded.name} has a {limit}-token "
                f"window; shorten the document or lower --max-new-tokens (or pass --force to run past the window)")

    def prefill(self, token_ids: torch.Tensor, request: ObservationRequest = ObservationRequest(),
                progress: bool = False, check: Callable[[], None] | None = None) -> PrefillResult:
        """``check`` runs before every forward pass (prefill chunks, probes' replays) and may raise to cancel."""
        return prefill(self.model, self.layout, token_ids, request=request, chunk_tokens=self.chunk_tokens,
                       progress=progress, question_ids=self.question_ids, decode=self.tokenizer.decode,
                       model_fingerprint=self.loaded.fingerprint, check=check)

    def compress(self, result: PrefillResult, policy: Policy, *, ratio: float | None = None,
                 budget_tokens: int | None = None,
                 compressible_tokens: int | None = None) -> tuple[KVCache, int, float]:
        """Compress a copy of ``result.cache``; returns (cache, budget_tokens, seconds)."""
        compressible = result.cache.num_tokens if compressible_tokens is None else compressible_tokens
        budget = resolve_budget(ratio, budget_tokens, compressible)
        cache, seconds = compress(result.cache, policy, result.observations, budget_tokens=budget,
                                  compressible_tokens=compressible)
        return cache, budget, seconds

    def continue_and_decode(self, cache: KVCache, suffix_ids: torch.Tensor | None, first_logits: torch.Tensor | None,
                            *, max_new_tokens: int, sampling: SamplingConfig, stop: list[str] | None = None,
                            on_text=None, check=None, interrupted=None, ignore_eos: bool = False) -> Generation:
        """Prefill ``suffix_ids`` on top of ``cache`` (it grows in place), then decode (``engine.generate.decode``:
        ``stop`` strings, ``on_text`` deltas, a ``check`` callback and an ``interrupted`` flag are optional)."""
        runner = ModelRunner(self.model, cache)
        if suffix_ids is not None and suffix_ids.numel():
            first_logits = self._feed(runner, suffix_ids)
        if first_logits is None:
            raise ParameterError("nothing to continue from: give a non-empty question")
        text = TextStream(self.tokenizer, stop or []) if stop is not None or on_text is not None else None
        return decode(runner, first_logits, max_new_tokens=max_new_tokens, sampler=Sampler(sampling),
                      stop_token_ids=set() if ignore_eos else self.stop_ids, text=text, on_text=on_text,
                      check=check, interrupted=interrupted)

    def decode_rows(self, caches: list[KVCache], first_logits: list[torch.Tensor], *, max_new_tokens: int,
                    sampling: SamplingConfig = SamplingConfig()) -> list[Generation]:
        """Answer on several caches at once (they grow in place; pass forks to keep them): the decode loop of
        ``continue_and_decode`` with each step's forward pass shared by the rows still running."""
        runners = [ModelRunner(self.model, cache) for cache in caches]
        return decode_rows(runners, first_logits, max_new_tokens=[max_new_tokens] * len(caches),
                           samplers=[Sampler(sampling) for _ in caches], stop_token_ids=self.stop_ids)

    def feed(self, cache: KVCache, token_ids: torch.Tensor, observer: Observer | None = None, *,
             check: Callable[[], None] | None = None, chunk_tokens: int | None = None) -> torch.Tensor:
        """Append ``token_ids`` (1-D) to ``cache`` in place, in chunks (``chunk_tokens``, default the engine's);
        ``check`` runs before each chunk and may raise to cancel. Returns the last position's logits (vocab,)."""
        return self._feed(ModelRunner(self.model, cache), token_ids, observer, check=check, chunk_tokens=chunk_tokens)

    def _feed(self, runner: ModelRunner, token_ids: torch.Tensor, observer: Observer | None = None, *,
              check: Callable[[], None] | None = None, chunk_tokens: int | None = None) -> torch.Tensor:
        if not token_ids.numel():
            raise ParameterError("nothing to feed: the token sequence is empty")
        chunk = chunk_tokens or self.chunk_tokens
        for start in range(0, int(token_ids.numel()), chunk):
            if check is not None:
                check()
            chunk_logits = runner.feed(token_ids[start:start + chunk], observer=observer)
            assert chunk_logits is not None  # feed returns logits unless logits_to_keep=0
            logits = chunk_logits[-1]
        return logits

    # -- the whole job ----------------------------------------------------------------------------------------
    def ask(self, context: str, question: str, policy: Policy, *, ratio: float | None = None,
            budget_tokens: int | None = None, query_aware: bool = False, max_new_tokens: int = 64,
            sampling: SamplingConfig = SamplingConfig(), force: bool = False, progress: bool = False,
            answer_prefix: str = "", kv_quant: QuantizationParams | None = None,
            ignore_eos: bool = False) -> Answer:
        """Prefill ``context``, compress with ``policy`` (then quantize with ``kv_quant``), answer ``question``.

        Query-agnostic (default): the document is compressed before the question is seen, as when a cache is
        reused. Query-aware: the question is part of the prefix, so the policy's observation window is the question.
        The full cache is freed before decoding starts.
        """
        if max_new_tokens < 1:
            raise ParameterError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
        parts = self.prompt(context, question, answer_prefix)
        self.check_length(parts.total_tokens + max_new_tokens, force=force)
        context_tokens = int(parts.prefix_ids.numel())
        resolve_budget(ratio, budget_tokens, context_tokens)  # fail on bad arguments before the slow prefill
        request = policy.observation_request()
        if query_aware:
            result = self.prefill(torch.cat([parts.prefix_ids, parts.suffix_ids]), request, progress)
            suffix, first_logits = None, result.last_logits
        else:
            result = self.prefill(parts.prefix_ids, request, progress)
            suffix, first_logits = parts.suffix_ids, None
        full_bytes, prefill_s = result.cache.held_bytes, result.seconds
        cache, budget, compress_s = self.compress(result, policy, ratio=ratio, budget_tokens=budget_tokens,
                                                  compressible_tokens=context_tokens)
        del result  # frees the full cache (and the observations) before decoding
        if kv_quant is not None:
            started = time.perf_counter()
            cache = quantize_in_memory(cache, kv_quant)
            compress_s += time.perf_counter() - started
        kept_bytes, allocated_bytes, kept = cache.held_bytes, cache.allocated_bytes, context_kept_tokens(
            cache, context_tokens)
        read_bytes = cache.decode_read_bytes
        full_fp16 = cache.kv_bytes_full_fp16
        question_s = 0.0
        if suffix is not None and suffix.numel():  # timed on its own: neither the prefill nor decoding
            started = time.perf_counter()
            first_logits = self.feed(cache, suffix)
            question_s = time.perf_counter() - started
        generation = self.continue_and_decode(cache, None, first_logits, max_new_tokens=max_new_tokens,
                                              sampling=sampling, ignore_eos=ignore_eos)
        return Answer(
            answer=self.tokenizer.decode(generation.token_ids, skip_special_tokens=True).strip(),
            token_ids=generation.token_ids, policy=policy.name, policy_params=policy.params(),
            query_aware=query_aware, ratio=ratio, budget_tokens=budget, context_tokens=context_tokens,
            question_tokens=int(parts.suffix_ids.numel()), kept_tokens=kept, kv_bytes_full=full_bytes,
            kv_bytes_kept=kept_bytes, kv_bytes_allocated=allocated_bytes, kv_bytes_full_fp16=full_fp16,
            prefill_s=prefill_s, compress_s=compress_s, decode_s=generation.seconds,
            decode_tokens=len(generation.token_ids), kv_quant=None if kv_quant is None else kv_quant.scheme,
            question_s=question_s, extra={"stopped_by": generation.stopped_by, "kv_bytes_read": read_bytes},
        )


def resolve_budget(ratio: float | None, budget_tokens: int | None, compressible_tokens: int) -> int:
    """Tokens kept per head per layer, from exactly one of ``ratio`` and ``budget_tokens`` (neither: keep all)."""
    if ratio is not None and budget_tokens is not None:
        raise BudgetError("give either a ratio or a budget, not both")
    if budget_tokens is not None:
        if budget_tokens < 1:
            raise BudgetError(f"budget must be >= 1 token per layer (got {budget_tokens})")
        return min(budget_tokens, compressible_tokens)
    return budget_from_ratio(0.0 if ratio is None else ratio, compressible_tokens)


def context_kept_tokens(cache: KVCache, context_tokens: int) -> float:
    """Mean context tokens kept per head over the full-attention layers."""
    counts = [((layer.positions >= 0) & (layer.positions < context_tokens)).sum(-1).float().mean()
              for layer in cache.layers if layer.spec.kind == "full"]
    return float(torch.stack(counts).mean()) if counts else float(context_tokens)


__all__ = ["Answer", "Engine", "PrefillResult", "SamplingConfig", "compression", "context_kept_tokens",
           "memory_figures", "resolve_budget"]
