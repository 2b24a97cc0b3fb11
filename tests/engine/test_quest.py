"""``quest`` end to end on the tiny models: a file written before the question is loaded memory-mapped and paged,
decodes exactly as the same cache arranged in memory, reads fewer bytes per step than it holds, is never
compressed again in a conversation, and goes through `kvlab compress` and `ask --cache`."""

from __future__ import annotations

import json

import pytest
import torch

from kvlab.bench.haystack import build_haystack
from kvlab.cache.paged import PagedLayerCache
from kvlab.cache.quant import QuantizationParams
from kvlab.cache.quantized import QuantizedLayerCache, quantize_in_memory
from kvlab.cli import main
from kvlab.engine.conversation import CompressionRule
from kvlab.engine.runner import ModelRunner
from kvlab.engine.streaming import streaming_prefill
from kvlab.errors import BudgetError
from kvlab.policies import make_policy
from kvlab.store import CacheStore, load_cache
from kvlab.store.documents import compress_document

QUESTION = "What is the pass key?"


@pytest.fixture(scope="module")
def text(tiny_llama):
    count = lambda value: len(tiny_llama.tokenizer(value, add_special_tokens=False)["input_ids"])  # noqa: E731
    return build_haystack(count, 600, seed=3, needle="The pass key is 4242.", depth=0.4).text


def answer_logits(engine, cache, steps: int = 6) -> torch.Tensor:
    runner = ModelRunner(engine.model, cache.fork())
    runner.feed(engine.question_ids(QUESTION, ""))
    return torch.stack([runner.step(token) for token in range(7, 7 + steps)])


@pytest.mark.parametrize("quantization", [None, QuantizationParams("int4")], ids=["plain", "int4"])
def test_a_stored_quest_file_is_mapped_paged_and_decodes_as_in_memory(llama, text, tmp_path, quantization):
    policy = make_policy("quest", dense_layers=0)  # the tiny Llama has 2 layers
    stored = compress_document(llama, text, policy, ratio=0.875, quantization=quantization,
                               store=CacheStore(tmp_path))
    loaded = load_cache(stored.path).cache
    full_layers = [layer for layer in loaded.layers if layer.spec.kind == "full"]
    assert full_layers and all(isinstance(layer, PagedLayerCache) for layer in full_layers)
    base = full_layers[0].base
    payload = base.codes["key_codes"] if quantization else base.keys
    assert isinstance(base, QuantizedLayerCache) == (quantization is not None)
    assert not payload.untyped_storage().resizable()  # a view of the file's mapping, not a copy in memory

    prefill = llama.prefill(llama.prompt(text, "").prefix_ids)
    in_memory, _, _ = llama.compress(prefill, policy, ratio=0.875)
    if quantization is not None:
        in_memory = quantize_in_memory(in_memory, quantization)
    torch.testing.assert_close(answer_logits(llama, loaded), answer_logits(llama, in_memory))
    assert loaded.decode_read_bytes < loaded.held_bytes / 2


def test_gemma_pages_only_its_global_layers_and_decodes_through_the_full_forward(gemma, text):
    prefill = gemma.prefill(gemma.prompt(text, "").prefix_ids)
    full, _, _ = gemma.compress(prefill, make_policy("full"))
    everything, _, _ = gemma.compress(prefill, make_policy("quest", page_tokens=16, dense_layers=0), ratio=0.0)
    kinds = {(layer.spec.kind, isinstance(layer, PagedLayerCache)) for layer in everything.layers}
    assert kinds == {("sliding", False), ("full", True)}
    torch.testing.assert_close(answer_logits(gemma, everything), answer_logits(gemma, full))
    sparse, _, _ = gemma.compress(prefill, make_policy("quest", page_tokens=16, dense_layers=0), ratio=0.75)
    assert not torch.allclose(answer_logits(gemma, sparse), answer_logits(gemma, full))


def test_a_conversation_never_compresses_quest_again_and_streaming_refuses_it(llama, text):
    rule = CompressionRule(make_policy("quest", dense_layers=0), budget_tokens=64, headroom=0.0)
    prefill = llama.prefill(llama.prompt(text, "").prefix_ids)
    cache, _, _ = llama.compress(prefill, rule.policy, budget_tokens=64)
    assert not rule.over_budget(cache) and rule.recorder(llama.layout, cache.num_tokens, 10) is None
    with pytest.raises(BudgetError, match="quest keeps every token"):
        streaming_prefill(llama, llama.prompt(text, "").prefix_ids, rule.policy, 64)


def test_compress_and_ask_through_the_cli(text, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path / "store"))
    document = tmp_path / "doc.txt"
    document.write_text(text)
    assert main(["compress", "--context-file", str(document), "--model", "tiny-llama", "--policy", "quest",
                 "--ratio", "0.875", "--kv-quant", "int4", "-p", "page_tokens=32", "-p", "dense_layers=0",
                 "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert main(["ask", "--cache", made["path"], "--model", "tiny-llama", "--question", QUESTION,
                 "--max-new-tokens", "4", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["policy"] == "quest" and answer["kept_tokens"] == made["kept_tokens"]
    assert answer["extra"]["kv_bytes_read"] < answer["kv_bytes_kept"]


def test_feeding_a_question_hands_its_queries_to_the_paged_layers(llama, text):
    prefill = llama.prefill(llama.prompt(text, "").prefix_ids)
    cache, _, _ = llama.compress(prefill, make_policy("quest", dense_layers=0, page_tokens=8), ratio=0.75)
    fork = cache.fork()
    llama.feed(fork, llama.question_ids(QUESTION, ""))
    assert all(layer.question_pages is not None for layer in fork.layers)
    assert all(layer.question_pages is None for layer in cache.layers)  # the stored document is untouched
    published, _, _ = llama.compress(prefill, make_policy("quest", dense_layers=0, page_tokens=8, question_share=0.0),
                                     ratio=0.75)
    llama.feed(published, llama.question_ids(QUESTION, ""))
    assert all(layer.question_pages is None for layer in published.layers)
