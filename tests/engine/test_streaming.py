"""Streaming prefill under a budget (``engine.streaming``): memory stays at the budget plus a chunk, a budget that
holds the whole document changes nothing, and `kvlab compress --max-kv-memory` streams only when the full cache
would not fit, keyed apart from a compress-after-prefill copy."""

from __future__ import annotations

import json

import pytest
import torch

from kvlab.engine import Engine
from kvlab.engine.compress import sliding_budget
from kvlab.engine.streaming import kv_bytes_per_token, streaming_prefill
from kvlab.errors import BudgetError
from kvlab.policies import make_policy
from kvlab.store import CacheStore
from kvlab.store.documents import compress_document


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return Engine(tiny_llama, chunk_tokens=64)


def test_held_memory_stays_at_the_budget_plus_one_chunk(engine):
    ids = torch.randint(3, 200, (600,))
    budget, chunk = 100, 64
    streamed = streaming_prefill(engine, ids, make_policy("snapkv"), budget, chunk_tokens=chunk)
    per_token = kv_bytes_per_token(engine)
    assert streamed.peak_kv_bytes <= (budget + chunk) * per_token
    assert streamed.cache.num_tokens == 600 and streamed.cache.kept_tokens() <= budget
    assert streamed.compressions >= (600 - budget) // chunk
    full = engine.prefill(ids)
    assert full.cache.held_bytes == 600 * per_token > 3 * streamed.peak_kv_bytes


def test_a_budget_holding_the_whole_document_changes_nothing(engine):
    ids = torch.randint(3, 200, (300,))
    streamed = streaming_prefill(engine, ids, make_policy("snapkv"), 400, chunk_tokens=64)
    assert streamed.compressions == 0
    torch.testing.assert_close(streamed.last_logits, engine.prefill(ids).last_logits, rtol=1e-4, atol=1e-4)


def test_the_full_policy_cannot_stream(engine):
    with pytest.raises(BudgetError, match="needs a policy that evicts"):
        streaming_prefill(engine, torch.randint(3, 200, (100,)), make_policy("full"), 50)


def test_compress_document_streams_only_past_the_memory_limit(engine, tmp_path):
    text = "The harbour master counted the boats. " * 40
    store = CacheStore(tmp_path / "store")
    policy = make_policy("streaming_llm")
    per_token = kv_bytes_per_token(engine)
    context = int(engine.prompt(text, "").prefix_ids.numel())
    roomy = compress_document(engine, text, policy, ratio=0.75, store=store, max_kv_bytes=2 * context * per_token)
    assert "streamed" not in roomy.meta.extra
    tight = compress_document(engine, text, policy, ratio=0.75, store=store,
                              max_kv_bytes=(context // 4 + 1 + 80) * per_token)
    streamed = tight.meta.extra["streamed"]
    assert tight.key != roomy.key and streamed["chunk_tokens"] >= 64
    assert streamed["peak_kv_bytes"] <= (context // 4 + 1 + streamed["chunk_tokens"]) * per_token
    assert tight.kv_bytes_full == context * per_token  # what a full prefill would have held
    with pytest.raises(BudgetError, match="raise the limit"):
        compress_document(engine, text, policy, ratio=0.5, store=store, max_kv_bytes=(context // 4) * per_token)
    with pytest.raises(BudgetError, match="--policy full evicts nothing"):
        compress_document(engine, text, make_policy("full"), store=store, max_kv_bytes=(context // 4) * per_token)


def test_compress_cli_reports_the_streamed_peak(tmp_path, monkeypatch, capsys):
    from kvlab.cli import main

    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path / "cache"))
    document = tmp_path / "doc.txt"
    document.write_text("The pass key is 4242. Remember it. " * 60)
    code = main(["compress", "--context-file", str(document), "--model", "tiny-llama", "--policy", "snapkv",
                 "--ratio", "0.8", "--chunk-tokens", "128", "--max-kv-memory", "1MiB", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["streamed"]["peak_kv_bytes"] <= 1024 * 1024 < result["kv_bytes_full"]


def test_masked_attention_in_query_blocks_equals_one_block(engine, monkeypatch):
    """A long chunk over a compressed (padded) cache attends in query blocks to bound its score matrix; each query's
    output must not depend on the blocking."""
    import kvlab.engine.attention as attention

    ids = torch.randint(3, 200, (300,))
    policy = make_policy("adakv")  # head-wise budgets: heads keep different numbers of tokens
    compressed, _, _ = engine.compress(engine.prefill(ids[:200], policy.observation_request()), policy, ratio=0.5)
    assert any(layer.padding_free is not None for layer in compressed.layers)  # heads kept different tokens
    whole = engine.feed(compressed.fork(), ids[200:], chunk_tokens=100)
    monkeypatch.setattr(attention, "MASKED_SCORE_ELEMENTS", 1)  # one query per block
    torch.testing.assert_close(engine.feed(compressed.fork(), ids[200:], chunk_tokens=100), whole, rtol=1e-4,
                               atol=1e-4)


def test_sliding_layers_count_their_window_not_the_document_when_deciding_to_stream(tiny_gemma3, tmp_path):
    """Gemma 3's local layers hold at most window - 1 tokens plus a chunk: a document whose full cache fits the
    limit on that count is prefilled whole, though every layer at full length would not fit."""
    from kvlab.engine.streaming import full_cache_bytes

    gemma = Engine(tiny_gemma3, chunk_tokens=64)
    text = "The harbour master counted the boats. " * 60
    context = int(gemma.prompt(text, "").prefix_ids.numel())
    full = full_cache_bytes(gemma, context)
    assert gemma.prefill(gemma.prompt(text, "").prefix_ids).cache.held_bytes <= full
    windows = [spec.window_tokens for spec in gemma.layout if spec.window_tokens is not None]
    assert windows and context > max(windows) + 64
    assert full < context * kv_bytes_per_token(gemma)
    limit = (full + context * kv_bytes_per_token(gemma)) // 2
    roomy = compress_document(gemma, text, make_policy("streaming_llm"), ratio=0.75,
                              store=CacheStore(tmp_path / "store"), max_kv_bytes=limit)
    assert "streamed" not in roomy.meta.extra


def test_sliding_layers_keep_the_whole_window_while_streaming_and_are_trimmed_once_at_the_end(tiny_gemma3):
    """Between chunks a sliding layer keeps its window (the next chunk needs it); after the last chunk it holds its
    newest ``sliding_budget`` tokens, as compress-after-prefill leaves it."""
    engine = Engine(tiny_gemma3, chunk_tokens=32)
    ids = torch.randint(3, 259, (200,), generator=torch.Generator().manual_seed(3))
    policy, budget = make_policy("knorm"), 50
    held_after_chunk = []
    streamed = streaming_prefill(engine, ids, policy, budget, chunk_tokens=32,
                                 on_chunk=lambda fed, held: held_after_chunk.append(held))
    assert streamed.compressions >= 4
    sliding = [layer for layer in streamed.cache.layers if layer.spec.kind == "sliding"]
    keep = sliding_budget(sliding[0].spec, budget, 200)
    assert keep == 4  # ceil(15 * 50 / 200)
    for layer in sliding:
        assert layer.positions.tolist() == [list(range(200 - keep, 200))]
    after, _, _ = engine.compress(engine.prefill(ids), policy, budget_tokens=budget)
    assert [layer.slots for layer in after.layers if layer.spec.kind == "sliding"] == [keep] * len(sliding)
    # Between chunks (after a compression) every sliding layer still holds its whole window (15 slots) and every
    # full layer the budget: the next chunk reads its whole local context, as a whole prefill would.
    slot_bytes = [2 * spec.kv_heads * spec.head_dim * 4 for spec in engine.layout]
    between = sum(size * (15 if spec.kind == "sliding" else budget) for spec, size in zip(engine.layout, slot_bytes))
    assert held_after_chunk[3:-1] and set(held_after_chunk[3:-1]) == {between}
    trimmed = sum(size * (keep if spec.kind == "sliding" else budget) for spec, size in zip(engine.layout, slot_bytes))
    assert held_after_chunk[-1] == trimmed == streamed.cache.held_bytes
