"""Measure a model's head profile: how much each KV head of each full-attention layer retrieves from the context.

Rule (``copy-attention``): the retrieval score of Wu et al., 2024, "Retrieval Head Mechanistically Explains
Long-Context Factuality" (arXiv:2404.15574), made teacher-forced and soft. A sample is a haystack with a needle of
random tokens at some depth, followed by the needle again. While the model reads that copy, the query at copy token
i should fetch needle token i + 1 from the context: a head's score for the step is the attention probability it
puts on exactly that source position, as KVzip scores what reconstruction queries attend to (Kim et al., 2025,
arXiv:2505.23416). Scores are averaged over steps and samples per query head; a KV head takes the largest score of
the query heads sharing it, since it must keep the context if any of them retrieves. Scores lie in [0, 1].

Deviations from Wu et al.: the copy is fed (teacher forcing) rather than generated, so no decoding is needed, the
score is defined even for a model that cannot copy, and the run is deterministic for a seed; and attention mass
replaces the argmax hit, so a few samples rank heads without ties. Only full-attention layers are scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from kvlab.cache.kvcache import PADDING_POSITION
from kvlab.cache.layout import LayerSpec, layout_from_config
from kvlab.engine.prefill import DEFAULT_CHUNK_TOKENS, empty_cache
from kvlab.engine.runner import ModelRunner
from kvlab.errors import ParameterError, UnsupportedModelError
from kvlab.models import LoadedModel
from kvlab.models.profile import HeadProfile

METHOD = "copy-attention"


@dataclass(frozen=True)
class CopySample:
    """``token_ids`` (T,): a haystack holding the needle at ``needle_start``, then the needle again (its last
    ``needle_tokens`` tokens)."""

    token_ids: torch.Tensor
    needle_start: int
    needle_tokens: int

    @property
    def copy_start(self) -> int:
        return int(self.token_ids.numel()) - self.needle_tokens


def copy_sample(haystack_ids: torch.Tensor, needle_ids: torch.Tensor, depth: float) -> CopySample:
    """The needle inserted into the haystack at relative ``depth`` (0 = start, 1 = end), then repeated."""
    split = round(depth * int(haystack_ids.numel()))
    ids = torch.cat([haystack_ids[:split], needle_ids, haystack_ids[split:], needle_ids])
    return CopySample(ids, split, int(needle_ids.numel()))


def copy_samples(vocab_ids: torch.Tensor, *, samples: int, length_tokens: int, needle_tokens: int, seed: int = 0,
                 haystack: Callable[[int, int], torch.Tensor] | None = None) -> list[CopySample]:
    """``samples`` copy samples of ``length_tokens`` tokens each, needle depths spread evenly from 0 to 1.

    Needles are ``needle_tokens`` distinct tokens drawn from ``vocab_ids`` (1-D, seeded by ``seed``); the haystack
    is ``haystack(sample_index, tokens)`` (1-D token ids of that length) or, by default, random tokens of
    ``vocab_ids``.
    """
    haystack_tokens = length_tokens - 2 * needle_tokens
    if samples < 1 or needle_tokens < 2 or haystack_tokens < 1:
        raise ParameterError(f"profiling needs at least 1 sample, needles of at least 2 tokens and a length above "
                             f"twice the needle (got {samples} samples, length {length_tokens}, needle "
                             f"{needle_tokens}); raise --length or lower --needle-tokens")
    if int(vocab_ids.numel()) < needle_tokens:
        raise ParameterError(f"the vocabulary has {vocab_ids.numel()} tokens, fewer than a {needle_tokens}-token "
                             f"needle; lower --needle-tokens")
    generator = torch.Generator().manual_seed(seed)
    built = []
    for index in range(samples):
        depth = 0.5 if samples == 1 else index / (samples - 1)
        needle = vocab_ids[torch.randperm(int(vocab_ids.numel()), generator=generator)[:needle_tokens]]
        if haystack is None:
            hay = vocab_ids[torch.randint(int(vocab_ids.numel()), (haystack_tokens,), generator=generator)]
        else:
            hay = haystack(index, haystack_tokens).reshape(-1)[:haystack_tokens]
            if int(hay.numel()) != haystack_tokens:
                raise ParameterError(f"the haystack gave {hay.numel()} tokens, not {haystack_tokens}")
        built.append(copy_sample(hay.long(), needle.long(), depth))
    return built


class CopyAttention:
    """An attention observer: per full layer and query head, the summed probability that the copy queries of the
    current ``sample`` pay their source position, and how many such queries it saw."""

    def __init__(self) -> None:
        self.sample: CopySample | None = None
        self.sums: dict[int, torch.Tensor] = {}  # (query_heads,) float64
        self.steps: dict[int, int] = {}

    def __call__(self, layer_index: int, spec: LayerSpec, queries: torch.Tensor, keys: torch.Tensor,
                 slot_positions: torch.Tensor, query_positions: torch.Tensor, scaling: float) -> None:
        sample = self.sample
        if spec.kind != "full" or sample is None:
            return
        first = sample.copy_start  # copy token i (i < needle - 1) should fetch needle token i + 1
        chosen = (query_positions >= first) & (query_positions < first + sample.needle_tokens - 1)
        if not bool(chosen.any()):
            return
        positions = query_positions[chosen]
        sources = positions - first + sample.needle_start + 1  # (m,)
        grouped = keys.float().repeat_interleave(spec.group_size, dim=0)  # (query_heads, K, d)
        slots = slot_positions.repeat_interleave(spec.group_size, dim=0)[:, None, :]  # (query_heads, 1, K)
        visible = (slots <= positions[None, :, None]) & (slots != PADDING_POSITION)
        logits = queries[:, chosen].float() @ grouped.transpose(1, 2) * scaling  # (query_heads, m, K)
        probabilities = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        on_source = (probabilities * (slots == sources[None, :, None])).sum(dim=-1)  # (query_heads, m)
        total = on_source.sum(dim=-1).double().cpu()
        self.sums[layer_index] = self.sums.get(layer_index, torch.zeros_like(total)) + total
        self.steps[layer_index] = self.steps.get(layer_index, 0) + int(positions.numel())

    def kv_head_scores(self, layout: list[LayerSpec]) -> dict[int, torch.Tensor]:
        """Per observed full layer, (kv_heads,) float64: the best mean score among each KV head's query heads."""
        scores = {}
        for index, sums in self.sums.items():
            spec = layout[index]
            mean = sums / max(self.steps[index], 1)
            scores[index] = mean.reshape(spec.kv_heads, spec.group_size).amax(dim=1).clamp(0.0, 1.0)
        return scores


def measure_copy_scores(model, layout: list[LayerSpec], samples: Sequence[CopySample], *,
                        chunk_tokens: int = DEFAULT_CHUNK_TOKENS, progress: bool = False) -> dict[int, torch.Tensor]:
    """Feed every sample from an empty cache (in chunks of ``chunk_tokens``) and score the heads (see module)."""
    observer = CopyAttention()
    for sample in tqdm(samples, desc="profile", unit="sample", disable=not progress, leave=False):
        ids = sample.token_ids
        cache = empty_cache(model, layout)
        cache.reserve(int(ids.numel()), chunk_tokens)
        runner = ModelRunner(model, cache)
        observer.sample = sample
        for start in range(0, int(ids.numel()), chunk_tokens):
            runner.feed(ids[start:start + chunk_tokens], observer=observer, logits_to_keep=0)
    observer.sample = None
    return observer.kv_head_scores(layout)


def measure_profile(loaded: LoadedModel, samples: Sequence[CopySample], *, settings: dict | None = None,
                    chunk_tokens: int = DEFAULT_CHUNK_TOKENS, progress: bool = False) -> HeadProfile:
    """The head profile of ``loaded`` measured on ``samples``; ``settings`` records how they were built."""
    layout = layout_from_config(loaded.model.config)
    full_layers = tuple(index for index, spec in enumerate(layout) if spec.kind == "full")
    if not full_layers:
        raise UnsupportedModelError(f"{loaded.name} has no full-attention layers: there is nothing to profile")
    scores = measure_copy_scores(loaded.model, layout, samples, chunk_tokens=chunk_tokens, progress=progress)
    rows = tuple(tuple(round(float(score), 6) for score in scores[index]) for index in full_layers)
    return HeadProfile(loaded.name, loaded.fingerprint, len(layout), full_layers, rows, METHOD,
                       {"samples": len(samples), **(settings or {})})
