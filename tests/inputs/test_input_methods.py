"""Input methods: the budget holds, kept text stays in document order, each method keeps what its rule says."""

from __future__ import annotations

import time

import pytest
import torch

from kvlab.engine import Engine
from kvlab.errors import ParameterError, UnknownPolicyError
from kvlab.inputs import list_input_methods, make_input_method
from kvlab.inputs.base import Document, Unit, keep_best
from kvlab.inputs.surprisal import token_self_information

FILLER = [f"Line {index} of the log says the pumps ran at normal speed." for index in range(24)]
NEEDLE = "The vault combination is 48213 and only Ada knows it."
QUESTION = "What is the vault combination?"


def document_text(needle_at: int = 15) -> str:
    sentences = FILLER[:needle_at] + [NEEDLE] + FILLER[needle_at:]
    return " ".join(sentences)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return Engine(tiny_llama, chunk_tokens=128)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tiny random BERT encoder with the tiny models' byte tokenizer, saved like a downloaded one."""
    from transformers import BertConfig, BertModel

    from kvlab.models.tiny import byte_tokenizer

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=512,
                                 pad_token_id=tokenizer.pad_token_id))
    folder = tmp_path_factory.mktemp("encoder")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def method(name: str, encoder_dir: str):
    return make_input_method(name, encoder=encoder_dir) if name == "rag_dense" else make_input_method(name)


def is_subsequence(kept: str, original: str) -> bool:
    """Every character of ``kept`` appears in ``original`` in the same order."""
    position = 0
    for char in kept:
        position = original.find(char, position)
        if position < 0:
            return False
        position += 1
    return True


@pytest.mark.parametrize("name", ["rag_bm25", "rag_dense", "selective_context", "llmlingua"])
@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_budget_respected_and_order_preserved(engine, encoder_dir, name, ratio):
    text = document_text()
    reduction = method(name, encoder_dir).reduce(engine, text, QUESTION, ratio=ratio)
    document = Document(engine.tokenizer, text)
    assert reduction.original_tokens == document.tokens
    assert reduction.budget_tokens == pytest.approx(document.tokens * (1 - ratio), abs=1)
    assert 0.8 * reduction.budget_tokens <= reduction.reduced_tokens <= reduction.budget_tokens
    assert reduction.reduced_tokens == document.count_tokens(reduction.text)
    assert is_subsequence(reduction.text, text)


def test_every_registered_method_is_covered():
    assert set(list_input_methods()) == {"rag_bm25", "rag_dense", "selective_context", "llmlingua"}


def test_ratio_zero_returns_the_context_unchanged(engine):
    text = document_text()
    assert make_input_method("selective_context").reduce(engine, text, QUESTION, ratio=0.0).text == text


@pytest.mark.parametrize("needle_at", [2, 12, 22])
def test_bm25_keeps_the_chunk_with_the_needle(engine, needle_at):
    text = document_text(needle_at)
    reduction = make_input_method("rag_bm25", chunk_tokens=64).reduce(engine, text, QUESTION, ratio=0.9)
    document = Document(engine.tokenizer, text)
    needle_chunks = [document.text_of([chunk]) for chunk in document.chunks(64)
                     if "vault" in document.text_of([chunk])]
    assert needle_chunks and all(chunk in reduction.text for chunk in needle_chunks)
    # the same budget without the question's words finds nothing to prefer: the first chunks win the ties
    blind = make_input_method("rag_bm25", chunk_tokens=64).reduce(engine, text, "zzz", ratio=0.9)
    assert blind.text == text[:len(blind.text)]


def test_dense_keeps_the_chunk_closest_to_the_question(engine, encoder_dir):
    from kvlab.inputs.rag_dense import embed

    text = document_text()
    document = Document(engine.tokenizer, text)
    chunks = document.chunks(64)
    # encode separately, one text at a time, so batching and padding are checked too
    vectors = torch.cat([embed(encoder_dir, [piece]) for piece in [QUESTION] + [document.text_of([c]) for c in chunks]])
    best = chunks[int((vectors[1:] @ vectors[0]).argmax())]
    reduction = make_input_method("rag_dense", chunk_tokens=64, encoder=encoder_dir).reduce(
        engine, text, QUESTION, budget_tokens=64)
    assert reduction.text == document.text_of([best])


def test_dense_encoder_that_cannot_load_names_the_fix(engine, tmp_path):
    rag = make_input_method("rag_dense", encoder=str(tmp_path / "missing"))
    with pytest.raises(Exception, match="-p encoder=PATH"):
        rag.reduce(engine, document_text(), QUESTION, ratio=0.5)


@pytest.mark.parametrize("chunk_tokens", [512, 37])
def test_self_information_is_minus_log_p_from_the_models_logits(engine, chunk_tokens):
    ids = Document(engine.tokenizer, document_text()).ids[:300]
    info = token_self_information(engine, ids, chunk_tokens=chunk_tokens)  # 37: chunk seams inside the text
    with torch.inference_mode():
        logits = engine.model(input_ids=ids[None]).logits[0].float()
    direct = -torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[1:, None])[:, 0]
    torch.testing.assert_close(info[1:], direct, rtol=1e-4, atol=1e-4)
    assert info[0] == pytest.approx(float(direct.mean()), rel=1e-4)


def test_selective_context_keeps_the_sentences_with_the_most_self_information(engine):
    text = document_text()
    document = Document(engine.tokenizer, text)
    sentences = document.split("sentence")
    assert document.text_of(sentences) == text and len(sentences) == len(FILLER) + 1
    info = token_self_information(engine, document.ids)
    ranked = sorted(sentences, key=lambda unit: -float(info[unit.start:unit.end].sum()))
    best = ranked[:5]
    kept = make_input_method("selective_context").reduce(engine, text, QUESTION,
                                                         budget_tokens=sum(unit.tokens for unit in best))
    assert kept.text == document.text_of(best)
    assert kept.text != document.text_of(sorted(sentences, key=lambda unit: unit.start)[:5])


def test_llmlingua_keeps_budget_and_leaves_the_question_untouched(engine):
    text = document_text()
    lingua = make_input_method("llmlingua", segment_tokens=64)
    reduction = lingua.reduce(engine, text, QUESTION, ratio=0.75)
    assert reduction.reduced_tokens <= reduction.budget_tokens
    # the question is not part of what is compressed: the prompt ends with it, token for token
    full_parts = engine.prompt(text, QUESTION)
    reduced_parts = engine.prompt(reduction.text, QUESTION)
    assert torch.equal(full_parts.suffix_ids, reduced_parts.suffix_ids)
    assert QUESTION not in reduction.text
    # its choice does not depend on the question (query-agnostic)
    assert lingua.reduce(engine, text, "Something else entirely?", ratio=0.75).text == reduction.text


def test_llmlingua_coarse_stage_keeps_whole_sentences(engine):
    text = document_text()
    lingua = make_input_method("llmlingua", coarse_factor=1.0)
    document = Document(engine.tokenizer, text)
    tokens = lingua.coarse_tokens(engine, document, budget_tokens=document.tokens // 3)
    sentence_starts = {unit.start for unit in document.split("sentence")}
    runs = [tokens[0]] + [b for a, b in zip(tokens, tokens[1:]) if b != a + 1]
    assert set(runs) <= sentence_starts
    assert len(tokens) <= document.tokens // 3


@pytest.mark.parametrize("unit", ["word", "token"])
def test_llmlingua_fine_stage_keeps_whole_words_or_single_tokens(engine, unit):
    """unit=word keeps or drops each word whole (a number is never cut to some of its digits), picked by total
    self-information; unit=token is the paper's rule, picked token by token."""
    document = Document(engine.tokenizer, document_text())
    lingua = make_input_method("llmlingua", segment_tokens=1000, unit=unit)  # one segment: the first is unscored
    tokens = list(range(document.tokens))
    kept, _ = lingua.fine_tokens(engine, document, tokens, budget_tokens=document.tokens // 2)
    assert len(kept) <= document.tokens // 2
    starts = document.word_starts(tokens)
    words = [set(range(a, b)) for a, b in zip(starts, starts[1:] + [document.tokens])]
    whole = all(word <= set(kept) or not word & set(kept) for word in words)
    number = next(word for word in words if "48213" in document.text_of([Unit(min(word), max(word) + 1)]))
    assert len(number) > 1  # the tiny tokenizer splits the number: the test can tell the rules apart
    if unit == "word":
        assert whole
        info = token_self_information(engine, document.ids)
        totals = [float(info[sorted(word)].sum()) for word in words[1:]]
        kept_totals = [total for word, total in zip(words[1:], totals) if word <= set(kept)]
        dropped = [total for word, total in zip(words[1:], totals) if not word & set(kept)]
        # greedy by total: every dropped word is less informative than the least kept one, unless it did not fit
        assert max(dropped) <= max(kept_totals)
    else:
        assert not whole  # token by token, some word is cut


def test_a_reused_scoring_pass_is_still_charged_to_each_reduction(engine, monkeypatch):
    """selective_context at two ratios scores the document once, but both reductions report the pass's time."""
    import kvlab.inputs.surprisal as surprisal

    monkeypatch.setattr(surprisal, "_REMEMBERED", {})
    real_feed = surprisal.feed_scored

    def slow_feed(*args, **kwargs):
        time.sleep(0.3)  # the pass, made slow enough to tell apart from the selection itself
        return real_feed(*args, **kwargs)

    monkeypatch.setattr(surprisal, "feed_scored", slow_feed)
    method = make_input_method("selective_context")
    first = method.reduce(engine, document_text(), QUESTION, ratio=0.5)
    second = method.reduce(engine, document_text(), QUESTION, ratio=0.75)
    assert len(surprisal._REMEMBERED) == 1  # one pass between them
    assert first.seconds >= 0.3 and second.seconds >= 0.3


def test_keep_best_fills_a_budget_smaller_than_any_unit(tiny_llama):
    document = Document(tiny_llama.tokenizer, document_text())
    units = document.chunks(100)
    scores = [0.0] * len(units)
    scores[3] = 1.0
    text = keep_best(document, units, scores, budget_tokens=40)
    assert text == document.text_of([Unit(units[3].start, units[3].start + 40)])


def test_unknown_parameter_and_bad_value_name_the_fix():
    with pytest.raises(ParameterError, match="chunk_tokens"):
        make_input_method("rag_bm25", chunk_size="64")
    with pytest.raises(ParameterError, match=">= 1"):
        make_input_method("rag_bm25", chunk_tokens="0")
    with pytest.raises(ParameterError, match="sentence, phrase"):
        make_input_method("selective_context", unit="word")
    with pytest.raises(UnknownPolicyError, match="Did you mean: rag_bm25"):
        make_input_method("rag_bm52")
