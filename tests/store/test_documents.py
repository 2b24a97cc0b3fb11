"""Prefill once, ask many times (``kvlab.store.documents``): a document compressed into the store answers exactly
as the in-memory path does, is found again instead of recomputed, changes key with every input, and carries a
saved conversation. Tiny models only; every test takes well under a second."""

import pytest
import torch

from kvlab.bench.haystack import build_haystack
from kvlab.cache.quant import QuantizationParams
from kvlab.engine import Engine, SamplingConfig
from kvlab.errors import CacheMismatchError, KvlabError, MissingCacheFileError, ParameterError, UnknownCacheEntryError
from kvlab.policies import make_policy
from kvlab.store import CacheStore, load_cache, meta_for, save_cache
from kvlab.store.documents import (
    compress_document,
    conversation_for,
    copy_out,
    document_key,
    open_document,
    save_conversation,
)

QUESTION = "What is the pass key?"
MAX_NEW = 6


def document_text(engine: Engine, tokens: int = 300, seed: int = 0) -> str:
    count = lambda text: len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    return build_haystack(count, tokens, seed=seed, needle="The pass key is 4242.", depth=0.5).text


@pytest.fixture(scope="module")
def text(llama):
    return document_text(llama)


@pytest.fixture
def store(tmp_path):
    return CacheStore(tmp_path / "kv")


def first_logits_in_memory(engine: Engine, text: str, policy, ratio: float) -> torch.Tensor:
    """Logits for the first answer token: prefill, compress, feed the question (Engine.ask's query-agnostic path)."""
    parts = engine.prompt(text, QUESTION)
    result = engine.prefill(parts.prefix_ids, policy.observation_request())
    cache, _, _ = engine.compress(result, policy, ratio=ratio)
    return engine.feed(cache, parts.suffix_ids)


def first_logits_from_file(engine: Engine, path) -> torch.Tensor:
    loaded = open_document(engine, str(path))
    return engine.feed(loaded.cache.fork(), engine.question_ids(QUESTION))


# -- the store: found again, keyed by every input --------------------------------------------------------------
def test_second_compress_finds_the_file_without_prefilling(llama, text, store, monkeypatch):
    policy = make_policy("snapkv")
    first = compress_document(llama, text, policy, ratio=0.5, store=store)
    assert not first.from_store and first.prefill_s > 0
    assert first.path == store.path_for(first.key) and first.path.stat().st_size == first.file_bytes
    assert first.kept_tokens == pytest.approx(first.context_tokens * 0.5, abs=1)

    def no_prefill(*args, **kwargs):
        raise AssertionError("a stored document was prefilled again")

    monkeypatch.setattr(llama, "prefill", no_prefill)
    # the CLI passes policy parameters as strings: "-p window_tokens=32" is the default and must find the file
    again = compress_document(llama, text, make_policy("snapkv", window_tokens="32"), ratio=0.5, store=store)
    assert again.from_store and (again.key, again.path) == (first.key, first.path)
    assert (again.kept_tokens, again.kv_bytes_full, again.kv_bytes_kept) == (
        first.kept_tokens, first.kv_bytes_full, first.kv_bytes_kept)
    assert again.prefill_s == 0.0


def test_key_changes_with_text_policy_parameters_ratio_budget_and_quantization(llama, text, store):
    base = dict(text=text, policy=make_policy("snapkv"), ratio=0.5, budget_tokens=None, quantization=None)
    variants = {
        "ratio": dict(ratio=0.75),
        "budget": dict(ratio=None, budget_tokens=100),
        "policy parameter": dict(policy=make_policy("snapkv", window_tokens=16)),
        "policy": dict(policy=make_policy("h2o")),
        "quantization": dict(quantization=QuantizationParams("int8")),
        "quantization group": dict(quantization=QuantizationParams("int8", group_size=16)),
        "text": dict(text=text + " One more sentence."),
    }
    documents = {"base": compress_document(llama, base["text"], base["policy"], ratio=base["ratio"], store=store)}
    for name, change in variants.items():
        args = {**base, **change}
        documents[name] = compress_document(llama, args["text"], args["policy"], ratio=args["ratio"],
                                            budget_tokens=args["budget_tokens"], quantization=args["quantization"],
                                            store=store)
        assert not documents[name].from_store, name
    keys = {name: document.key for name, document in documents.items()}
    assert len(set(keys.values())) == len(keys), keys
    assert {entry.key for entry in store.list()} == set(keys.values())
    assert documents["quantization"].kv_bytes_kept < 0.6 * documents["base"].kv_bytes_kept
    budget = load_cache(documents["base"].path).meta.budget_tokens
    assert document_key(llama, text, make_policy("snapkv"), 0.5, budget, None) == keys["base"]


def test_a_damaged_stored_file_is_recomputed_not_reported_forever(llama, text, store):
    policy = make_policy("snapkv")
    first = compress_document(llama, text, policy, ratio=0.5, store=store)
    data = first.path.read_bytes()
    first.path.write_bytes(data[: len(data) // 2])  # a truncated entry, e.g. after a full disk
    again = compress_document(llama, text, policy, ratio=0.5, store=store)
    assert not again.from_store and again.path == first.path
    assert load_cache(again.path).meta.num_tokens == first.context_tokens
    assert compress_document(llama, text, policy, ratio=0.5, store=store).from_store


# -- the file answers like memory ------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["llama", "gemma"])
@pytest.mark.parametrize("policy_name", ["snapkv", "adakv", "h2o"])
def test_file_answers_exactly_like_memory(request, model, policy_name, store):
    engine = request.getfixturevalue(model)
    text = document_text(engine)
    policy = make_policy(policy_name)
    document = compress_document(engine, text, policy, ratio=0.5, store=store)
    expected = first_logits_in_memory(engine, text, policy, 0.5)
    assert torch.equal(first_logits_from_file(engine, document.path), expected)
    for sampling in (SamplingConfig(), SamplingConfig(temperature=3.0, seed=1)):  # sampled: gemma's greedy is flat
        answer = engine.ask(text, QUESTION, policy, ratio=0.5, max_new_tokens=MAX_NEW, sampling=sampling)
        turn = conversation_for(engine, open_document(engine, str(document.path))).ask(
            QUESTION, max_new_tokens=MAX_NEW, sampling=sampling)
        assert turn.token_ids == answer.token_ids
        assert turn.question_tokens == answer.question_tokens and not turn.recompressed


@pytest.mark.parametrize("model", ["llama", "gemma"])
def test_int8_file_is_close_to_memory_and_int4_further(request, model, store):
    engine = request.getfixturevalue(model)
    text = document_text(engine)
    policy = make_policy("snapkv")
    expected = first_logits_in_memory(engine, text, policy, 0.5)
    errors = {}
    for scheme in ("int8", "int4"):
        document = compress_document(engine, text, policy, ratio=0.5, quantization=QuantizationParams(scheme),
                                     store=store)
        assert load_cache(document.path).meta.quantization.scheme == scheme
        errors[scheme] = float((first_logits_from_file(engine, document.path) - expected).abs().max() / expected.std())
    assert 0 < errors["int8"] < 0.05, errors
    assert errors["int4"] > errors["int8"], errors


# -- opening ---------------------------------------------------------------------------------------------------
def test_open_by_key_prefix_records_load_time(llama, text, store):
    document = compress_document(llama, text, make_policy("streaming_llm"), budget_tokens=64, store=store)
    loaded = open_document(llama, document.key[:8].upper(), store)
    assert loaded.meta.policy == "streaming_llm" and loaded.meta.budget_tokens == 64
    assert loaded.cache.kept_tokens() == 64 and loaded.meta.extra["load_s"] >= 0
    with pytest.raises(UnknownCacheEntryError):
        open_document(llama, "ffffffffff", store)


def test_a_missing_path_is_a_missing_file_not_an_unknown_key(llama, tmp_path, store):
    for path in (tmp_path / "nope.kv", tmp_path / "sub" / "doc"):
        with pytest.raises(MissingCacheFileError, match="no cache file"):
            open_document(llama, str(path), store)


def test_a_file_for_another_model_is_refused_naming_it(llama, gemma, store):
    document = compress_document(gemma, document_text(gemma, 120), make_policy("snapkv"), ratio=0.5, store=store)
    with pytest.raises(CacheMismatchError, match="tiny-gemma3"):
        open_document(llama, str(document.path))


def test_copy_out_to_a_file_or_folder(llama, text, store, tmp_path):
    document = compress_document(llama, text, make_policy("knorm"), ratio=0.5, store=store)
    assert copy_out(document.path, tmp_path / "doc.kv").read_bytes() == document.path.read_bytes()
    (tmp_path / "folder").mkdir()
    assert copy_out(document.path, tmp_path / "folder") == tmp_path / "folder" / document.path.name
    with pytest.raises(KvlabError, match="cannot write"):
        copy_out(document.path, "/proc/no-such-dir/doc.kv")


def test_a_query_aware_cache_cannot_start_a_conversation(llama, text, tmp_path):
    parts = llama.prompt(text, QUESTION)
    result = llama.prefill(torch.cat([parts.prefix_ids, parts.suffix_ids]))
    policy = make_policy("full")
    meta = meta_for(llama.loaded, result.cache, text=text, policy=policy, ratio=None,
                    budget_tokens=result.cache.num_tokens, query_aware=True,
                    context_tokens=int(parts.prefix_ids.numel()))
    save_cache(tmp_path / "aware.kv", result.cache, meta, result.last_logits)
    with pytest.raises(ParameterError, match="query-aware"):
        conversation_for(llama, open_document(llama, str(tmp_path / "aware.kv")))


# -- saved conversations ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["llama", "gemma"])
def test_saved_conversation_continues_where_it_stopped(request, model, store, tmp_path):
    engine = request.getfixturevalue(model)
    policy = make_policy("snapkv", window_tokens=8)
    document = compress_document(engine, document_text(engine, 200), policy, ratio=0.5, store=store)
    stored_bytes = document.path.read_bytes()
    loaded = open_document(engine, str(document.path))
    conversation = conversation_for(engine, loaded)
    with pytest.raises(ParameterError, match="nothing to save"):
        save_conversation(tmp_path / "early.kv", engine, conversation, loaded)
    for question in ("Tell me more about the pass key, please?", "And then?"):
        turn = conversation.ask(question, max_new_tokens=5)
    assert turn.stopped_by == "max_new_tokens" and conversation.pending_ids == turn.token_ids[-1:]
    assert any(t.recompressed for t in conversation.turns)
    written = save_conversation(tmp_path / "chat.kv", engine, conversation, loaded)

    reopened = open_document(engine, str(tmp_path / "chat.kv"))
    assert written == reopened.file_bytes
    assert reopened.meta.extra["turns"] == 2 and reopened.meta.extra["pending_token_ids"] == turn.token_ids[-1:]
    assert reopened.meta.num_tokens == conversation.cache.num_tokens
    assert reopened.meta.context_tokens == document.context_tokens and "load_s" not in load_cache(
        tmp_path / "chat.kv").meta.extra
    assert document.path.read_bytes() == stored_bytes  # the document in the store is left as it was
    continued = conversation_for(engine, reopened)
    assert continued.answered == 2 and continued.pending_ids == conversation.pending_ids
    sampling = SamplingConfig(temperature=3.0, seed=2)
    assert continued.ask("Why?", max_new_tokens=5, sampling=sampling).token_ids == conversation.ask(
        "Why?", max_new_tokens=5, sampling=sampling).token_ids
