"""Feed tokens to the model on top of a KVCache: the cache appends in transformers' update step
(``cache.hf.HFCacheView``) and the kvlab attention function reads it (``engine.attention``). Single-token steps
of Llama-architecture models take the decode fast path (``engine.fastpath``), which computes the same logits."""

from __future__ import annotations

import torch

from kvlab.cache.hf import HFCacheView, cache_argument
from kvlab.cache.kvcache import KVCache
from kvlab.cache.paged import PagedLayerCache
from kvlab.engine.attention import STEP_KEYWORD, Observer, Step, install
from kvlab.engine.fastpath import FastDecoder
from kvlab.models.extension import SelfExtend, extension_of


class ModelRunner:
    """Runs forward passes that append to ``cache``; tokens get positions ``cache.num_tokens`` onwards."""

    def __init__(self, model, cache: KVCache) -> None:
        install(model)
        self.model = model
        self.cache = cache
        self.view = HFCacheView(cache)
        self.cache_argument = cache_argument(model)
        self.device = next(model.parameters()).device
        extension = extension_of(model)
        # Self-Extend changes attention (the model's own rotary embedding carries YaRN); the decode fast path attends
        # plainly, so a Self-Extended model takes the full forward, whose attention groups
        self.grouping = extension if isinstance(extension, SelfExtend) else None
        self.fast = None if self.grouping is not None else FastDecoder.for_model(model)

    @torch.inference_mode()
    def feed(self, token_ids: torch.Tensor, *, observer: Observer | None = None,
             logits_to_keep: int = 1) -> torch.Tensor | None:
        """Append ``token_ids`` (1-D); return logits (logits_to_keep, vocab) as fp32, or None if 0 were asked."""
        count = int(token_ids.numel())
        start = self.cache.num_tokens
        positions = torch.arange(start, start + count, device=self.device)
        if count == 1 and observer is None and self.fast is not None and logits_to_keep <= 1:
            logits = self.fast.step(token_ids.to(self.device), self.cache, positions)
            self.cache.num_tokens += 1
            self.cache.settle()
            return logits[None] if logits_to_keep else None
        if count > 1:
            observer = question_observer(self.cache, observer)
        self.view.begin(positions)
        output = self.model(
            input_ids=token_ids.to(self.device).reshape(1, -1), position_ids=positions[None], use_cache=True,
            logits_to_keep=max(logits_to_keep, 1), **{self.cache_argument: self.view,
                                                      STEP_KEYWORD: Step(self.cache, positions, observer,
                                                                         self.grouping)},
        )
        self.cache.num_tokens += count
        self.cache.settle()
        return output.logits[0, -logits_to_keep:].float() if logits_to_keep else None

    def step(self, token: int) -> torch.Tensor:
        """Append one token; return the logits (vocab,) fp32 predicting the next."""
        logits = self.feed(torch.tensor([token], dtype=torch.long))
        assert logits is not None  # logits_to_keep is 1
        return logits[-1]


QUESTION_WINDOW = 32  # a question's last queries that choose the pages a paged layer reads while answering


def question_observer(cache: KVCache, observer: Observer | None) -> Observer | None:
    """``observer``, plus handing each paged layer (``cache.paged``, ``quest``) the last queries of the tokens fed
    (a question) so that it can read the pages they attend to while the answer is decoded; ``observer`` itself
    where no layer is paged."""
    if not any(isinstance(layer, PagedLayerCache) for layer in cache.layers):
        return observer

    def observe(index, spec, queries, keys, slot_positions, query_positions, scale) -> None:
        if observer is not None:
            observer(index, spec, queries, keys, slot_positions, query_positions, scale)
        layer = cache.layers[index]
        if isinstance(layer, PagedLayerCache):
            layer.observe_question(queries[:, -QUESTION_WINDOW:], scale)

    return observe


def feed_rows(runners: list[ModelRunner], tokens: list[int]) -> list[torch.Tensor]:
    """One token for each runner's cache; returns each row's logits (vocab,). Where the decode fast path applies,
    all rows go through one forward pass, so they share the weight reads (``FastDecoder.step_rows``); otherwise
    each runner takes its own step."""
    fast = runners[0].fast if runners else None
    if fast is None or len(runners) == 1 or any(runner.model is not runners[0].model for runner in runners):
        return [runner.step(token) for runner, token in zip(runners, tokens)]
    device = runners[0].device
    positions = torch.tensor([runner.cache.num_tokens for runner in runners], device=device)
    logits = fast.step_rows(torch.tensor(tokens, dtype=torch.long, device=device),
                            [runner.cache for runner in runners], positions)
    for runner in runners:
        runner.cache.num_tokens += 1
        runner.cache.settle()
    return list(logits)
