"""selective_context — Li et al., 2023, "Compressing Context to Enhance Inference Efficiency of Large Language
Models" (Selective Context, arXiv:2310.06201).

Rule: the model itself scores every token's self-information ``-log p(x_i | x_<i)`` over the whole document; a
lexical unit's self-information is the sum over its tokens (the paper's definition); the units with the least are
dropped until the rest fits the budget. Query-agnostic.

Units: ``sentence`` (default; cut after . ! ? followed by whitespace, and at line breaks) or ``phrase`` (also cut
after , ; :). Differences from the paper: the paper's phrases are spaCy noun chunks and its filter keeps the units
above a percentile of self-information; here units come from punctuation (no parser dependency) and the filter is a
token budget, so the kept share is the same fraction of tokens as a KV policy's. The scoring model is the answering
model, not a separate small one, and a budget left over after whole units goes to the start of the best unit that
did not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvlab.inputs import register_input_method
from kvlab.inputs.base import Document, InputMethod, keep_best
from kvlab.inputs.surprisal import token_self_information
from kvlab.policies.base import param


@register_input_method("selective_context")
@dataclass(frozen=True)
class SelectiveContext(InputMethod):
    paper = ("Li et al., 2023 — Compressing Context to Enhance Inference Efficiency of Large Language Models "
             "(arXiv:2310.06201)")
    rule = "drop the lexical units with the least self-information (summed -log p under the model) to the budget"
    query_aware = False

    unit: str = param("sentence", "lexical unit that is kept or dropped whole", choices=("sentence", "phrase"))

    def select(self, engine, document: Document, question: str, budget_tokens: int) -> str:
        info = token_self_information(engine, document.ids)
        units = document.split(self.unit)
        scores = [float(info[unit.start:unit.end].sum()) for unit in units]
        return keep_best(document, units, scores, budget_tokens)
