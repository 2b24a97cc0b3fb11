"""llmlingua — Jiang et al., 2023, "LLMLingua: Compressing Prompts for Accelerated Inference of Large Language
Models" (arXiv:2310.05736).

Rule, coarse to fine:

1. Budget controller: sentences are ranked by their perplexity under the model and the most perplexing are kept,
   whole and in document order, up to ``coarse_factor`` times the budget (the paper's granular control coefficient
   k). When that covers the document, this stage is skipped.
2. Iterative token-level compression: what the first stage kept is cut into segments of ``segment_tokens``; each
   segment is scored conditioned on the *compressed* segments before it (the model's cache holds only the tokens
   kept so far), and its most surprising tokens are kept, at the share that brings the whole to the budget.
   With ``unit="word"`` (the default) the tokens of a word are kept or dropped together, the word scored by the sum
   of its tokens' self-information (as Selective Context scores its units); ``unit="token"`` is the paper's rule.

Query-agnostic: the question is never compressed nor read (it follows the context untouched). Differences from the
paper: the small language model is the answering model itself, so the paper's distribution alignment (instruction
tuning the small model on the large one's outputs) has no purpose and is not done; the paper's "demonstrations" are
the document's sentences, and their perplexity is taken in the document's flow (one pass over the whole document)
rather than each on its own; the instruction and question get no budget of their own because only the context is
compressed; and the per-segment threshold is the keep share itself (top-k by surprisal) rather than a perplexity
threshold solved for it. Words by default: with a tokenizer that splits numbers into digits (SmolLM2, Llama), a digit
is less surprising than the average word piece of a prose haystack, so token-level pruning keeps "6709" of
"6709792" and every answer that is a number is lost (measured: 0 of 8 on niah_multikey_1 at every ratio).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvlab.engine.runner import ModelRunner
from kvlab.inputs import register_input_method
from kvlab.inputs.base import Document, InputMethod, Unit, keep_best
from kvlab.inputs.surprisal import feed_scored, fresh_cache, token_self_information
from kvlab.policies.base import param


@register_input_method("llmlingua")
@dataclass(frozen=True)
class LLMLingua(InputMethod):
    paper = ("Jiang et al., 2023 — LLMLingua: Compressing Prompts for Accelerated Inference of Large Language Models "
             "(arXiv:2310.05736)")
    rule = ("keep the most perplexing sentences up to k x the budget, then, segment by segment conditioned on what "
            "was kept, the most surprising tokens")
    query_aware = False

    coarse_factor: float = param(2.0, "sentence stage keeps up to this many times the budget (the paper's k)",
                                 minimum=1.0)
    segment_tokens: int = param(200, "tokens per segment of the token-level stage", unit="tokens", minimum=1)
    unit: str = param("word", "what the fine stage keeps or drops: whole words (scored by their total "
                              "self-information) or single tokens (the paper)", choices=("word", "token"))

    def select(self, engine, document: Document, question: str, budget_tokens: int) -> str:
        tokens = self.coarse_tokens(engine, document, budget_tokens)
        kept, scores = self.fine_tokens(engine, document, tokens, budget_tokens)
        return keep_best(document, [Unit(index, index + 1) for index in kept], scores, budget_tokens)

    def coarse_tokens(self, engine, document: Document, budget_tokens: int) -> list[int]:
        """Token indices of the sentences the budget controller keeps, in document order."""
        coarse_budget = math.ceil(self.coarse_factor * budget_tokens)
        if coarse_budget >= document.tokens:
            return list(range(document.tokens))
        info = token_self_information(engine, document.ids)
        sentences = document.split("sentence")
        perplexity = [float(info[unit.start:unit.end].mean()) for unit in sentences]  # log-perplexity, same order
        chosen, used = [], 0
        for index in sorted(range(len(sentences)), key=lambda index: (-perplexity[index], sentences[index].start)):
            if used + sentences[index].tokens <= coarse_budget:
                chosen.append(sentences[index])
                used += sentences[index].tokens
        if not chosen:  # every sentence is longer than the coarse budget: leave it all to the token stage
            return list(range(document.tokens))
        return [token for unit in sorted(chosen, key=lambda unit: unit.start) for token in range(unit.start, unit.end)]

    def fine_tokens(self, engine, document: Document, tokens: list[int],
                    budget_tokens: int) -> tuple[list[int], list[float]]:
        """(kept token indices in document order, their self-information): iterative compression of ``tokens``."""
        keep_share = min(1.0, budget_tokens / max(1, len(tokens)))
        runner = ModelRunner(engine.model, fresh_cache(engine))
        last = None
        kept: list[int] = []
        scores: list[float] = []
        for start in range(0, len(tokens), self.segment_tokens):
            segment = tokens[start:start + self.segment_tokens]
            ids = document.ids[segment]
            info, _ = feed_scored(ModelRunner(engine.model, runner.cache.fork()), ids, last)
            info = torch.nan_to_num(info, nan=math.inf)  # the document's first token: nothing predicts it
            quota = round((start + len(segment)) * keep_share) - len(kept)
            chosen = self._most_surprising(document, segment, info, quota)
            if not chosen:
                continue
            kept.extend(segment[index] for index in chosen)
            scores.extend(float(info[index]) for index in chosen)
            logits = runner.feed(ids[chosen])  # only the last position's: it predicts the next segment
            assert logits is not None
            last = torch.log_softmax(logits[-1], dim=-1)
        return kept, scores

    def _most_surprising(self, document: Document, segment: list[int], info: torch.Tensor, quota: int) -> list[int]:
        """Positions in ``segment`` to keep, ascending: the most surprising units (tokens, or whole words by their
        total self-information) while they fit ``quota`` tokens."""
        starts = document.word_starts(segment) if self.unit == "word" else list(range(len(segment)))
        groups = [range(start, end) for start, end in zip(starts, starts[1:] + [len(segment)])]
        totals = [float(info[group.start:group.stop].sum()) for group in groups]
        chosen: list[int] = []
        for index in sorted(range(len(groups)), key=lambda index: (-totals[index], groups[index].start)):
            if len(chosen) + len(groups[index]) <= quota:
                chosen.extend(groups[index])
        return sorted(chosen)
