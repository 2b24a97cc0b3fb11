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
    its protected slots, and the rest goes to the best scores anywhere, so the scores must be comparable across
    layers (attention probabilities are). ``heads`` says how a layer's heads share what it wins:

    - ``"padded"`` (default): the budget counts held slots, ``budget_tokens x heads x layers`` of them. A layer is
      held padded to its longest head, so every head of the layer keeps that many of its best slots (the padding
      a free split would waste holds real tokens); the global cut-off is the lowest at which the held slots fit.
    - ``"free"``: each head keeps exactly what it won (the reference code's rule); the budget counts kept tokens,
      and the padding up to a layer's longest head is held on top.
    - ``"shared"``: every head of a layer keeps the layer's mean share of what it won.
    """

    heads: str = "padded"
    name = "global"

    def allocate(self, ranked, budget_tokens, protected_tokens):
        if not ranked:
            return []
        if self.heads not in ("padded", "free", "shared"):
            raise ValueError(f"heads must be padded, free or shared (got {self.heads!r})")
        eligible = torch.cat([_eligible(scores) for scores in ranked])
        protected = torch.cat([(scores == float("inf")).sum(dim=-1) for scores in ranked])
        layer_of_head = torch.cat([torch.full((scores.shape[0],), index) for index, scores in enumerate(ranked)])
        head_of_slot = torch.cat([first + torch.arange(scores.shape[0]).repeat_interleave(scores.shape[1])
                                  for first, scores in zip(_firsts(ranked), ranked)])
        competing = torch.cat([scores.masked_fill(~torch.isfinite(scores), float("-inf")).flatten()
                               for scores in ranked])
        finite = int(torch.isfinite(competing).sum())
        order = competing.topk(finite).indices  # best first
        total = budget_tokens * len(eligible)

        def counts(winners: int) -> torch.Tensor:
            won = torch.bincount(head_of_slot[order[:winners]], minlength=len(eligible))
            return (protected + won).clamp(max=eligible)

        if self.heads == "padded":
            def held(winners: int) -> int:
                widest = torch.zeros(len(ranked), dtype=torch.long).scatter_reduce(
                    0, layer_of_head, counts(winners), reduce="amax")
                return int((widest[layer_of_head]).sum())

            low, high = 0, finite  # the most winners whose padded layers fit the budget
            while low < high:
                middle = (low + high + 1) // 2
                low, high = (middle, high) if held(middle) <= total else (low, middle - 1)
            widest = torch.zeros(len(ranked), dtype=torch.long).scatter_reduce(0, layer_of_head, counts(low),
                                                                             reduce="amax")
            result = torch.minimum(widest[layer_of_head], eligible)
        else:
            spare = min(max(total - int(protected.sum()), 0), finite)
            result = counts(spare)
            if self.heads == "shared":
                won = (result - protected).float()
                means = torch.zeros(len(ranked)).scatter_reduce(0, layer_of_head, won, reduce="mean",
                                                                include_self=False)
                result = (protected + means[layer_of_head].floor().long()).clamp(max=eligible)
        return list(result.split([scores.shape[0] for scores in ranked]))


def _firsts(ranked: list[torch.Tensor]) -> list[int]:
    """The index of each layer's first head among all heads."""
    firsts, head = [], 0
    for scores in ranked:
        firsts.append(head)
        head += scores.shape[0]
    return firsts


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
