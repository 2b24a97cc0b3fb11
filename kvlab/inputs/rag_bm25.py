"""rag_bm25 — retrieval-augmented generation over the document's own chunks, ranked by BM25 (Robertson and
Zaragoza, 2009, "The Probabilistic Relevance Framework: BM25 and Beyond"; retrieve-then-read as in Lewis et al.,
2020, "Retrieval-Augmented Generation for Knowledge-Intensive NLP Tasks", arXiv:2005.11401).

Rule: cut the document into chunks of ``chunk_tokens`` model tokens, score each against the question with BM25
(the ``bm25s`` package: Lucene's variant, English stop words, no stemming), keep the best chunks that fit the budget,
in document order. Query-aware: each question retrieves its own chunks. Differences from a usual RAG pipeline: the
corpus is the one document, chunks are cut at model-token boundaries rather than at sentences, and a chunk whose
words never occur in the question scores 0 (ties keep the earlier chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvlab.inputs import register_input_method
from kvlab.inputs.base import Document, InputMethod, keep_best
from kvlab.policies.base import param


def bm25_scores(chunks: list[str], query: str) -> list[float]:
    """BM25 score of every chunk for ``query`` (0 for a chunk without any of the query's terms)."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(chunks, stopwords="en", show_progress=False), show_progress=False)
    query_terms = bm25s.tokenize([query], stopwords="en", show_progress=False, return_ids=False)[0]
    if not query_terms:
        return [0.0] * len(chunks)
    return [float(score) for score in retriever.get_scores(query_terms)]


@register_input_method("rag_bm25")
@dataclass(frozen=True)
class RagBM25(InputMethod):
    paper = "Robertson and Zaragoza, 2009 — The Probabilistic Relevance Framework: BM25 and Beyond"
    rule = "keep the chunks with the best BM25 score against the question, in document order"
    query_aware = True

    chunk_tokens: int = param(128, "tokens per retrieved chunk", unit="tokens", minimum=1)

    def select(self, engine, document: Document, question: str, budget_tokens: int) -> str:
        units = document.chunks(self.chunk_tokens)
        scores = bm25_scores([document.text_of([unit]) for unit in units], question)
        return keep_best(document, units, scores, budget_tokens)
