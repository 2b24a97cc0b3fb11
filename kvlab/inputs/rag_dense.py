"""rag_dense — retrieval-augmented generation over the document's own chunks, ranked by dense embeddings (dense
passage retrieval, Karpukhin et al., 2020, "Dense Passage Retrieval for Open-Domain Question Answering",
arXiv:2004.04906; retrieve-then-read as in Lewis et al., 2020, arXiv:2005.11401).

Rule: cut the document into chunks of ``chunk_tokens`` model tokens, embed each chunk and the question with an
encoder (``transformers.AutoModel``, last hidden states mean-pooled over the attention mask, L2-normalised), rank by
cosine similarity and keep the best chunks that fit the budget, in document order. Query-aware.

``encoder`` is a local folder or a Hugging Face id (the default, all-MiniLM-L6-v2, is fetched once by transformers
when the hub can be reached). Differences from DPR: one encoder embeds both question and passages (DPR trains two),
and the passages are the one document's chunks, cut at model-token boundaries.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kvlab.errors import ModelLoadError
from kvlab.inputs import register_input_method
from kvlab.inputs.base import Document, InputMethod, keep_best
from kvlab.policies.base import param

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
ENCODER_BATCH = 16


@functools.lru_cache(maxsize=2)
def load_encoder(name: str):
    """(tokenizer, model) of ``name``, loaded once per process, on the CPU, in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name), AutoModel.from_pretrained(name).eval()
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"rag_dense cannot load encoder {name!r} ({first_line}); pass a local encoder folder "
                             f"with -p encoder=PATH (or rag_dense:encoder=PATH in a bench grid)") from None


@torch.inference_mode()
def embed(name: str, texts: list[str], max_tokens: int = 512) -> torch.Tensor:
    """(len(texts), hidden) L2-normalised mean-pooled embeddings."""
    tokenizer, model = load_encoder(name)
    rows = []
    for start in range(0, len(texts), ENCODER_BATCH):
        batch = tokenizer(texts[start:start + ENCODER_BATCH], padding=True, truncation=True, max_length=max_tokens,
                          return_tensors="pt")
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"][..., None].float()
        rows.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
    return torch.nn.functional.normalize(torch.cat(rows), dim=-1)


@register_input_method("rag_dense")
@dataclass(frozen=True)
class RagDense(InputMethod):
    paper = ("Karpukhin et al., 2020 — Dense Passage Retrieval for Open-Domain Question Answering "
             "(arXiv:2004.04906)")
    rule = "keep the chunks whose embedding is closest to the question's (cosine), in document order"
    query_aware = True

    chunk_tokens: int = param(128, "tokens per retrieved chunk", unit="tokens", minimum=1)
    encoder: str = param(DEFAULT_ENCODER, "embedding model: a local folder or a Hugging Face id")

    def select(self, engine, document: Document, question: str, budget_tokens: int) -> str:
        units = document.chunks(self.chunk_tokens)
        vectors = embed(self.encoder, [question] + [document.text_of([unit]) for unit in units])
        scores = (vectors[1:] @ vectors[0]).tolist()
        return keep_best(document, units, scores, budget_tokens)
