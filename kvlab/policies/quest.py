"""quest — Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference"
(arXiv:2406.10774).

Rule: evict nothing. Every full-attention layer is kept in pages of ``page_tokens`` with a per-channel key minimum
and maximum; at each decode step every KV head reads only the pages whose bound on the query's attention is
highest, within the budget (``--ratio 0.875`` reads 1/8 of the tokens per step), plus the sink and recent pages.
The cache is built before any question (query-agnostic), the choice is made per query. The mechanics, and the
deviations from the reference code, are in ``kvlab.cache.paged``; a quantized cache's pages are its key groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlab.cache.kvcache import KVCache
from kvlab.cache.paged import page_cache_layers
from kvlab.policies import register_policy
from kvlab.policies.base import Policy, ScoreInputs, param
from kvlab.policies.budgets import KeepAllBudget


@register_policy("quest")
@dataclass(frozen=True)
class Quest(Policy):
    paper = ("Tang et al., 2024 — Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference "
             "(arXiv:2406.10774)")
    rule = ("keep every token in pages with key min/max summaries; each decode step reads the pages with the "
            "highest attention bound, within the budget, plus sink and recent pages")

    page_tokens: int = param(32, "tokens per page (with --kv-quant: the quantization group)", unit="tokens",
                             minimum=4, maximum=256)
    sink_tokens: int = param(4, "first tokens whose pages every step reads (attention sinks)", unit="tokens",
                             minimum=0)
    recent_tokens: int = param(32, "newest tokens whose pages every step reads", unit="tokens", minimum=0)
    dense_layers: int = param(2, "first layers read whole at every step (their attention is not sparse)",
                              unit="layers", minimum=0)
    question_share: float = param(0.5, "share of the per-step budget held by the pages the question attended most "
                                  "(0: Quest as published)", minimum=0.0, maximum=1.0)
    follow_pages: int = param(1, "pages after each page the question attended to that rank with it (the answer "
                              "follows the key it names)", unit="pages", minimum=0, maximum=8)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        return torch.zeros(inputs.positions.shape)

    def budget_rule(self):
        return KeepAllBudget()

    def arrange(self, cache: KVCache, budget_tokens: int) -> KVCache:
        paged = page_cache_layers(cache.layers[self.dense_layers:], page_tokens=self.page_tokens,
                                  read_tokens=budget_tokens, sink_tokens=self.sink_tokens,
                                  recent_tokens=self.recent_tokens, question_share=self.question_share,
                                  follow_pages=self.follow_pages)
        return KVCache(layers=cache.layers[:self.dense_layers] + paged, num_tokens=cache.num_tokens)
