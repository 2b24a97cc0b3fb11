"""Budget rules: how many slots each head of each compressed layer keeps.

A rule sees every compressed layer's ranked scores (from ``cache.selection.eligible_scores``: +inf protected,
-inf not competing) and returns, per layer, a (kv_heads,) count of budgeted slots. ``budget_tokens`` is the mean
number of tokens kept per head per layer; every rule spends exactly that on average (up to rounding), unless a
head has fewer eligible tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class BudgetRule:
    name = ""

    def allocate(self, ranked: list[torch.Tensor], budget_tokens: int, protected_tokens: int) -> list[torch.Tensor]:
        raise NotImplementedError


def _eligible(ranked: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(ranked).sum(dim=-1) + (ranked == float("inf")).sum(dim=-1)


@dataclass(frozen=True)
class UniformBudget(BudgetRule):
    """Every head of every layer keeps ``budget_tokens``."""

    name = "uniform"

    def allocate(self, ranked, budget_tokens, protected_tokens):
        return [_eligible(scores).clamp(max=budget_tokens) for scores in ranked]


@dataclass(frozen=True)
class KeepAllBudget(BudgetRule):
    """Nothing is evicted (the ``full`` baseline)."""

    name = "keep-all"

    def allocate(self, ranked, budget_tokens, protected_tokens):
        return [_eligible(scores) for scores in ranked]


@dataclass(frozen=True)
class PyramidBudget(BudgetRule):
    """PyramidKV (Cai et al., 2024): budgets fall linearly with depth; the deepest layer gets 1/beta of the mean
    unprotected budget, the first layer 2 - 1/beta of it. Protected tokens are added to every layer on top."""

    beta: float = 20.0
    name = "pyramid"

    def layer_budgets(self, num_layers: int, budget_tokens: int, protected_tokens: int) -> list[int]:
        spare = max(budget_tokens - protected_tokens, 0)
        if num_layers == 1:
            return [budget_tokens]
        smallest = spare / self.beta
        largest = 2 * spare - smallest
        step = (largest - smallest) / (num_layers - 1)
        return [protected_tokens + round(largest - index * step) for index in range(num_layers)]

    def allocate(self, ranked, budget_tokens, protected_tokens):
        budgets = self.layer_budgets(len(ranked), budget_tokens, protected_tokens)
        capacities = [int(_eligible(scores).max()) if scores.numel() else 0 for scores in ranked]
        budgets = _redistribute_overflow(budgets, capacities)
        return [_eligible(scores).clamp(max=budget) for scores, budget in zip(ranked, budgets)]


def _redistribute_overflow(requested: list[int], capacities: list[int]) -> list[int]:
    """Give what layers cannot hold (budget above their token count) to the layers that still have room, evenly,
    so the total is spent whenever it fits: at ratio 0 every layer keeps everything."""
    budgets = [min(budget, capacity) for budget, capacity in zip(requested, capacities)]
    overflow = sum(requested) - sum(budgets)
    while overflow > 0:
        open_layers = [index for index, budget in enumerate(budgets) if budget < capacities[index]]
        if not open_layers:
            break
        share = max(1, overflow // len(open_layers))
        for index in open_layers:
            grant = min(share, capacities[index] - budgets[index], overflow)
            budgets[index] += grant
            overflow -= grant
    return budgets


@dataclass(frozen=True)
class HeadwiseBudget(BudgetRule):
    """Ada-KV (Feng et al., 2024): within a layer, the heads share ``budget_tokens * kv_heads`` slots, given to the
    best scores across heads; every head first gets a floor of ``floor_fraction * budget_tokens`` (the paper's
    safeguard, alpha)."""

    floor_fraction: float = 0.2
    name = "headwise"

    def allocate(self, ranked, budget_tokens, protected_tokens):
        return [self._layer_counts(scores, budget_tokens, protected_tokens) for scores in ranked]

    def _layer_counts(self, scores: torch.Tensor, budget_tokens: int, protected_tokens: int) -> torch.Tensor:
        heads = scores.shape[0]
        eligible = _eligible(scores)
        floor = min(budget_tokens, max(protected_tokens, int(self.floor_fraction * budget_tokens)))
        floors = eligible.clamp(max=floor)
        spare = min(int(eligible.sum()), budget_tokens * heads) - int(floors.sum())
        if spare <= 0:
            return floors
        rank_in_head = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
        contenders = scores.masked_fill(rank_in_head < floors[:, None], float("-inf")).flatten()
        winners = contenders.topk(spare).indices
        winners = winners[contenders[winners] > float("-inf")]
        extra = torch.bincount(winners // scores.shape[1], minlength=heads)
        return floors + extra


@dataclass(frozen=True)
class GlobalBudget(BudgetRule):
    """One budget for the whole cache (KVzip's non-uniform allocation): every head of every compressed layer keeps
    its protected slots, and the rest of ``budget_tokens x heads x layers`` goes to the best scores anywhere, so
    the scores must be comparable across layers (attention probabilities are).

    ``headwise=False`` lets layers differ but gives every head of a layer the same count: a layer is padded to its
    longest head, so free per-head counts can cost held bytes that the budget does not see.
    """

    headwise: bool = True
    name = "global"

    def allocate(self, ranked, budget_tokens, protected_tokens):
        if not ranked:
            return []
        eligible = [_eligible(scores) for scores in ranked]
        protected = [(scores == float("inf")).sum(dim=-1) for scores in ranked]
        total = budget_tokens * sum(scores.shape[0] for scores in ranked)
        spare = total - int(sum(int(count.sum()) for count in protected))
        competing = torch.cat([scores.masked_fill(~torch.isfinite(scores), float("-inf")).flatten()
                               for scores in ranked])
        spare = min(max(spare, 0), int(torch.isfinite(competing).sum()))
        winners = competing.topk(spare).indices if spare else competing.new_zeros(0, dtype=torch.long)
        counts, offset = [], 0
        for scores, kept, limit in zip(ranked, protected, eligible):
            heads, slots = scores.shape
            mine = winners[(winners >= offset) & (winners < offset + heads * slots)] - offset
            won = torch.bincount(mine // slots, minlength=heads) if slots else torch.zeros_like(kept)
            if not self.headwise:
                won = torch.full_like(won, int(won.sum()) // heads)
            counts.append((kept + won).clamp(max=limit))
            offset += heads * slots
        return counts


@dataclass(frozen=True)
class WholeHeadBudget(BudgetRule):
    """DuoAttention's split with a fixed share: the ``round(share x heads)`` heads (``granularity="layer"``: the
    ``round(share x layers)`` layers) with the best competing score keep every eligible slot, the others only their
    protected ones; ``budget_tokens`` does not enter. Rank heads through their scores (duo puts each head's profile
    rank in every slot's score)."""

    share: float
    granularity: str = "head"
    name = "whole-head"

    def allocate(self, ranked, budget_tokens, protected_tokens):
        protected = [(scores == float("inf")).sum(dim=-1) for scores in ranked]
        best = [scores.masked_fill(~torch.isfinite(scores), float("-inf")).amax(dim=-1) for scores in ranked]
        if self.granularity == "layer":
            order = torch.stack([layer.max() for layer in best]).argsort(descending=True, stable=True)
            chosen_layers = set(order[:round(self.share * len(best))].tolist())
            chosen = [torch.full_like(layer, index in chosen_layers, dtype=torch.bool)
                      for index, layer in enumerate(best)]
        else:
            flat = torch.cat(best)
            picked = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
            picked[flat.argsort(descending=True, stable=True)[:round(self.share * flat.numel())]] = True
            chosen = list(picked.split([layer.numel() for layer in best]))
        return [torch.where(keep, _eligible(scores), kept) for keep, scores, kept in zip(chosen, ranked, protected)]
