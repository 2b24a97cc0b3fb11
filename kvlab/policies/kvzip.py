"""kvzip — Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction"
(arXiv:2505.23416).

Rule: after prefill, the model is asked to repeat the document ("Repeat the previous context exactly.") and is fed
the document again, chunk by chunk, on a throwaway fork of its cache. A KV pair's score is the largest attention
any reconstruction query pays it (max over the chunk's queries and over the query heads sharing its KV head). What
the model needs to rebuild the whole document is what any later question can need, so the cache is compressed
before the question is known. Scores are attention probabilities, comparable across heads and layers, so one
budget is shared by the whole cache (``GlobalBudget``): heads and layers that retrieve keep more. The first
``sink_tokens`` are kept. The reconstruction pass and its scoring cost two to three prefills (measured on SmolLM2,
CPU); they are counted in ``compress_s``.

As in the reference code, each chunk's softmax runs over the sinks, the chunk's own keys in the cache and the
reconstruction tokens (causal), not the whole document; later chunks' prompts quote the last 8 tokens of the
previous chunk ("Repeat the part of the previous context exactly, starting with ..."). Deviations: the prompt is
formatted by kvlab's question rule (the model's chat template, or "Question: ... Answer:" without one); and in a
conversation, where the turns' tokens are not kept to be replayed, a re-compression scores the cache by the largest
attention the new turn's own queries paid each pair (softmax over the whole cache). A layer is held padded to its
longest head, so by default (``heads=padded``) the budget counts held slots and the shorter heads of a layer fill
that padding with their next-best pairs; ``heads=free`` is the reference's split (padding held on top of the
budget), ``heads=shared`` equal counts within a layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.cache.kernels import flash_available, flash_with_lse
from kvlab.cache.kvcache import PADDING_POSITION
from kvlab.cache.layout import LayerSpec
from kvlab.cache.observations import (
    ObservationRequest,
    Observations,
    Probe,
    ProbeContext,
    ProbeState,
    Replay,
)
from kvlab.errors import KvlabError
from kvlab.policies import register_policy
from kvlab.policies.base import Policy, ScoreInputs, param
from kvlab.policies.budgets import GlobalBudget

FIRST_PROMPT = "Repeat the previous context exactly."
LATER_PROMPT = "Repeat the part of the previous context exactly, starting with"
QUOTED_TOKENS = 8  # tokens of the previous chunk quoted in a later chunk's prompt (the reference's choice)
QUERY_BLOCK = 256  # reconstruction queries scored at a time: memory is query_heads x 256 x keys floats


@dataclass(frozen=True)
class Reconstruction(Probe):
    """Max attention each KV pair receives while the model reconstructs the context (per full layer:
    (kv_heads, total_tokens) float32, indexed by position)."""

    chunk_tokens: int = 2048
    sink_tokens: int = 4

    def start(self, context: ProbeContext) -> ProbeState:
        return _ReconstructionState(self, context)


class _ReconstructionState(ProbeState):
    def __init__(self, probe: Reconstruction, context: ProbeContext) -> None:
        self.probe = probe
        self.total_tokens = context.total_tokens
        self.in_conversation = context.first_position > 0
        self.scores: dict[int, torch.Tensor] = {}
        self.scaling: dict[int, float] = {}
        self.span: tuple[int, int] | None = None  # context positions being reconstructed (during a replay)

    def _layer_scores(self, layer_index: int, spec: LayerSpec, device: torch.device, scaling: float) -> torch.Tensor:
        if layer_index not in self.scores:
            self.scores[layer_index] = torch.zeros((spec.kv_heads, self.total_tokens), device=device)
            self.scaling[layer_index] = float(scaling)
        return self.scores[layer_index]

    def on_attention(self, layer_index, spec, queries, keys, slot_positions, query_positions, scaling) -> None:
        if self.span is not None:
            self._score_reconstruction(layer_index, spec, queries, keys, slot_positions, query_positions, scaling)
        elif self.in_conversation:
            self._score_turn(layer_index, spec, queries, keys, slot_positions, query_positions, scaling)

    def _score_reconstruction(self, layer_index, spec, queries, keys, slot_positions, query_positions,
                              scaling) -> None:
        """Chunk-local softmax over [sinks, the span's keys, the replayed tokens (causal)]; the span's columns are
        kept. The normalizer is split: the context part from the explicit logits, the replayed part from a fused
        attention kernel's log-sum-exp where one is available, so no (queries x keys) mask is ever built."""
        assert self.span is not None
        start, end = self.span
        scores = self._layer_scores(layer_index, spec, keys.device, scaling)
        # every head of an uncompressed prefill cache holds the same positions: use head 0's to pick the keys
        positions = slot_positions[0]
        span = ((positions >= start) & (positions < end)).nonzero().squeeze(-1)
        sinks = ((positions >= 0) & (positions < min(self.probe.sink_tokens, start))).nonzero().squeeze(-1)
        replayed = (positions >= self.total_tokens).nonzero().squeeze(-1)
        context_keys = keys[:, torch.cat([sinks, span])].float().repeat_interleave(spec.group_size, dim=0)
        replay_lse = _replay_log_normalizer(queries.float(), keys[:, replayed].float(), positions[replayed],
                                            query_positions, spec.group_size, scaling)
        first = int(sinks.numel())
        best = torch.zeros((spec.kv_heads, int(span.numel())), device=keys.device)
        for block in range(0, queries.shape[1], QUERY_BLOCK):
            chunk = queries[:, block:block + QUERY_BLOCK].float()
            logits = chunk @ context_keys.transpose(1, 2) * scaling  # (query_heads, q, sinks + span)
            lse = torch.logaddexp(torch.logsumexp(logits, dim=-1), replay_lse[:, block:block + QUERY_BLOCK])
            probabilities = (logits[..., first:] - lse[..., None]).exp_()
            per_head = probabilities.amax(dim=1).reshape(spec.kv_heads, spec.group_size, -1).amax(dim=1)
            best = torch.maximum(best, per_head)
        target = positions[span]
        scores[:, target] = torch.maximum(scores[:, target], best)

    def _score_turn(self, layer_index, spec, queries, keys, slot_positions, query_positions, scaling) -> None:
        scores = self._layer_scores(layer_index, spec, keys.device, scaling)
        grouped = keys.float().repeat_interleave(spec.group_size, dim=0)
        slots = slot_positions.repeat_interleave(spec.group_size, dim=0)[:, None, :]
        best = torch.zeros(slot_positions.shape, device=keys.device)  # (kv_heads, K)
        for block in range(0, queries.shape[1], QUERY_BLOCK):
            chunk = queries[:, block:block + QUERY_BLOCK].float()
            chunk_positions = query_positions[block:block + QUERY_BLOCK]
            visible = (slots <= chunk_positions[None, :, None]) & (slots != PADDING_POSITION)
            logits = (chunk @ grouped.transpose(1, 2) * scaling).masked_fill(~visible, float("-inf"))
            per_head = logits.softmax(dim=-1).amax(dim=1).reshape(spec.kv_heads, spec.group_size, -1).amax(dim=1)
            best = torch.maximum(best, per_head)
        valid = slot_positions != PADDING_POSITION
        scores.scatter_reduce_(-1, slot_positions.clamp(min=0), best * valid, reduce="amax")

    def finish(self, observations: Observations, replay: Replay | None) -> None:
        if replay is not None and not self.in_conversation:
            self._reconstruct(replay)
        for layer_index, scores in self.scores.items():
            observations.put_layer_extra(layer_index, self.probe, scores, self.scaling[layer_index])

    def _reconstruct(self, replay: Replay) -> None:
        context = replay.context_ids
        size = self.probe.chunk_tokens
        for start in range(0, int(context.numel()), size):
            chunk = context[start:start + size]
            if start == 0:
                prompt = replay.question_ids(FIRST_PROMPT)
            else:
                quoted = replay.text(context[max(0, start - QUOTED_TOKENS):start])
                prompt = replay.question_ids(f"{LATER_PROMPT} {quoted}")
            self.span = (start, start + int(chunk.numel()))
            try:
                replay.feed_fork(torch.cat([prompt, chunk]), self.on_attention)
            finally:
                self.span = None


def _replay_log_normalizer(queries: torch.Tensor, keys: torch.Tensor, key_positions: torch.Tensor,
                           query_positions: torch.Tensor, group: int, scaling: float) -> torch.Tensor:
    """(query_heads, q): log of the softmax mass each replayed query gives the replayed keys it can see (causal).

    When the queries are exactly the replayed keys (one forward pass), the CPU flash kernel returns it as its
    log-sum-exp; otherwise (several passes, or no such kernel) it is computed block by block with a mask."""
    grouped = keys.repeat_interleave(group, dim=0)  # (query_heads, R, d)
    aligned = key_positions.numel() == query_positions.numel() and bool((key_positions == query_positions).all())
    if aligned and flash_available(queries):
        return flash_with_lse(queries[None], grouped[None], grouped[None], causal=True, scale=scaling)[1][0]
    parts = []
    for block in range(0, queries.shape[1], QUERY_BLOCK):
        logits = queries[:, block:block + QUERY_BLOCK] @ grouped.transpose(1, 2) * scaling
        hidden = key_positions[None, :] > query_positions[block:block + QUERY_BLOCK, None]
        parts.append(torch.logsumexp(logits.masked_fill(hidden[None], float("-inf")), dim=-1))
    return torch.cat(parts, dim=1)


@register_policy("kvzip")
@dataclass(frozen=True)
class KVzip(Policy):
    paper = ("Kim et al., 2025 — KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction "
             "(arXiv:2505.23416)")
    rule = "score = max attention received while the model repeats the context; one budget across heads and layers"

    chunk_tokens: int = param(2048, "context tokens reconstructed per extra pass", unit="tokens", minimum=16)
    sink_tokens: int = param(4, "first tokens always kept (attention sinks)", unit="tokens", minimum=0)
    heads: str = param("padded", "how a layer's heads share the budget: padded (held slots are the budget, shorter "
                                 "heads fill the layer's padding), free (the reference's split; padding held on top) "
                                 "or shared (equal counts in a layer)", choices=("padded", "free", "shared"))

    @property
    def probe(self) -> Reconstruction:
        return Reconstruction(self.chunk_tokens, self.sink_tokens)

    def observation_request(self) -> ObservationRequest:
        return ObservationRequest(probes=(self.probe,))

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        observation = inputs.observation
        scores = None if observation is None else observation.extras.get(self.probe)
        if scores is None:
            raise KvlabError("kvzip needs its reconstruction pass; prefill with the policy's observation_request() "
                             "through an Engine")
        positions = inputs.positions
        gathered = scores.gather(-1, positions.clamp(min=0).clamp(max=scores.shape[-1] - 1))
        return gathered.masked_fill((positions == PADDING_POSITION) | (positions >= scores.shape[-1]), 0.0)

    def protected_sink_tokens(self) -> int:
        return self.sink_tokens

    def budget_rule(self):
        return GlobalBudget(heads=self.heads)
