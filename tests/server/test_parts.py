"""The server's parts without a socket: the prefix cache, incremental text with stop strings, the metrics text."""

from __future__ import annotations

import torch

from kvlab.cache.kvcache import KVCache
from kvlab.engine.prefill import empty_cache
from kvlab.engine.text import TextStream
from kvlab.server.metrics import Metrics, parse
from kvlab.server.sessions import PrefixCache


def grown(engine, tokens: int) -> KVCache:
    cache = empty_cache(engine.model, engine.layout)
    engine.feed(cache, torch.arange(3, 3 + tokens))
    return cache


def test_lookup_finds_the_longest_usable_prefix(tiny_engine):
    sessions = PrefixCache(max_bytes=10**9)
    short, longer = grown(tiny_engine, 3), grown(tiny_engine, 5)
    sessions.put("", [1, 2, 3], short, 3, last_logits=torch.zeros(4))
    sessions.put("", [1, 2, 3, 4, 5], longer, 4)  # the 5th token is pending
    assert sessions.lookup("", [1, 2, 3, 4, 5, 6]).token_ids == (1, 2, 3, 4, 5)
    assert sessions.lookup("", [1, 2, 3, 4, 5]).pending_ids == (5,)
    assert sessions.lookup("", [1, 2, 3]).last_logits is not None  # exact match needs its logits: it has them
    assert sessions.lookup("", [1, 2, 9]) is None
    assert sessions.lookup("doc", [1, 2, 3, 4]) is None  # another document's ids never match
    sessions.put("doc", [], short, 0)
    assert sessions.lookup("doc", [7]).token_ids == ()
    assert sessions.drop_document("doc") == 1 and sessions.lookup("doc", [7]) is None


def test_exact_match_without_logits_or_pending_is_not_usable(tiny_engine):
    sessions = PrefixCache(max_bytes=10**9)
    sessions.put("", [1, 2], grown(tiny_engine, 2), 2)
    assert sessions.lookup("", [1, 2]) is None
    assert sessions.lookup("", [1, 2, 3]) is not None


def test_bounds_evict_least_recently_used(tiny_engine):
    one = grown(tiny_engine, 8)
    sessions = PrefixCache(max_bytes=10**9, max_entries=2)
    for first in (1, 2, 3):
        sessions.put("", [first], grown(tiny_engine, 8), 1)
    assert len(sessions) == 2 and sessions.lookup("", [1, 0]) is None
    sessions.lookup("", [2, 0])  # 2 is now the most recently used
    sessions.put("", [4], one, 1)
    assert sessions.lookup("", [3, 0]) is None and sessions.lookup("", [2, 0]) is not None

    by_bytes = PrefixCache(max_bytes=int(one.allocated_bytes * 2.5))
    for first in (1, 2, 3):
        by_bytes.put("", [first], grown(tiny_engine, 8), 1)
    assert len(by_bytes) == 2 and by_bytes.kv_bytes <= by_bytes.max_bytes


def test_shared_tensors_are_counted_once(tiny_engine):
    cache = grown(tiny_engine, 8)
    sessions = PrefixCache(max_bytes=10**9)
    sessions.put("", [1], cache, 1)
    alone = sessions.kv_bytes
    sessions.put("", [2], cache.fork(), 1)
    assert sessions.kv_bytes == alone >= cache.allocated_bytes


def push_text(stream: TextStream, tokenizer, text: str) -> list[str]:
    pieces = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        stream.push(token)
        pieces.append(stream.take())
        if stream.stopped:
            break
    stream.finish()
    pieces.append(stream.take(final=True))
    return pieces


def test_text_is_released_in_whole_characters(tiny_engine):
    tokenizer = tiny_engine.tokenizer
    pieces = push_text(TextStream(tokenizer, []), tokenizer, "naïve café ☕")
    assert "".join(pieces) == "naïve café ☕"
    assert all("\ufffd" not in piece for piece in pieces)  # a multi-byte character is never split


def test_stop_string_cuts_and_is_held_back_until_decided(tiny_engine):
    tokenizer = tiny_engine.tokenizer
    stream = TextStream(tokenizer, ["STOP", "xyz"])
    pieces = push_text(stream, tokenizer, "abc STOx STOP def")
    assert stream.stopped and stream.text == "abc STOx "
    assert "".join(pieces) == "abc STOx "
    assert "S" not in "".join(pieces[:5])  # "S" could begin "STOP", so it waited until "x" ruled that out
    unstopped = TextStream(tokenizer, ["STOP"])
    assert "".join(push_text(unstopped, tokenizer, "ends with ST")) == "ends with ST"  # released at the end


def test_metrics_render_prometheus_text():
    metrics = Metrics()
    metrics.inc("kvlab_requests_total", route="/v1/models", status="200")
    metrics.inc("kvlab_prefill_seconds_total", 0.25)
    metrics.gauge("kvlab_kv_bytes_held", "bytes", lambda: 1024)
    text = metrics.render()
    assert "# HELP kvlab_requests_total " in text and "# TYPE kvlab_kv_bytes_held gauge" in text
    values = parse(text)
    assert values['kvlab_requests_total{route="/v1/models",status="200"}'] == 1
    assert values["kvlab_prefill_seconds_total"] == 0.25 and values["kvlab_kv_bytes_held"] == 1024
    assert values["kvlab_completion_tokens_total"] == 0  # every counter is exposed from the start
