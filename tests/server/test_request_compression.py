"""Requests without a document: a long prompt's context is compressed with the server's policy (or the request's),
the question never; the ``kvlab`` object says what was done; the next turn continues the compressed context;
``--served-model-name`` renames the model clients see."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from kvlab.server.prompts import chat_context_tokens, chat_token_ids, completion_context_tokens
from kvlab.server.schemas import ChatMessage

MODEL = "tiny-llama"  # the server fixtures serve the tiny random model
CONTEXT = "The archive opened in 1998 in Turin. Its first keeper was Ada Verne, who catalogued maps. " * 6
QUESTION = "Who was the first keeper?"
LONG = f"{CONTEXT}\n\n{QUESTION}"  # about 570 byte tokens with the template


def chat(running, content=LONG, messages=None, **kvlab) -> httpx.Response:
    body = {"model": MODEL, "messages": messages or [{"role": "user", "content": content}], "max_tokens": 4,
            "temperature": 0}
    if kvlab:
        body["kvlab"] = kvlab
    return httpx.post(f"{running.url}/v1/chat/completions", json=body, timeout=60)


@pytest.fixture(scope="module")
def snapkv_server(start):
    with start(policy="snapkv", ratio=0.5, compress_above=256) as running:
        yield running


def test_the_context_ends_where_the_last_paragraph_of_the_last_message_starts(tiny_engine):
    tokenizer = tiny_engine.tokenizer
    messages = [ChatMessage(role="user", content=LONG)]
    ids = chat_token_ids(tokenizer, messages)
    context = chat_context_tokens(tokenizer, messages, ids)
    # the same cut as a posted document and its question (engine.prompt.split_prompt)
    assert ids[:context] == tiny_engine.prompt(CONTEXT, QUESTION).prefix_ids.tolist()
    assert tokenizer.decode(ids[context:]) == f"\n\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    one_paragraph = [ChatMessage(role="user", content=CONTEXT)]
    assert chat_context_tokens(tokenizer, one_paragraph, chat_token_ids(tokenizer, one_paragraph)) == 0
    # a follow-up: every earlier turn is context, the new message is the question
    turns = [*messages, ChatMessage(role="assistant", content="Ada."), ChatMessage(role="user", content="And?")]
    turn_ids = chat_token_ids(tokenizer, turns)
    assert tokenizer.decode(turn_ids[chat_context_tokens(tokenizer, turns, turn_ids):]) == (
        "And?<|im_end|>\n<|im_start|>assistant\n")
    prompt = "Notes.\n\nMore notes.\n\nQ:"
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert tokenizer.decode(prompt_ids[completion_context_tokens(tokenizer, prompt, prompt_ids):]) == "\n\nQ:"


def test_a_long_chat_is_compressed_and_holds_fewer_bytes(snapkv_server, start):
    content = f"A context no other test sends. {LONG}"
    metrics = snapkv_server.state.metrics
    cached_before = metrics.value("kvlab_cached_prompt_tokens_total")
    misses_before = metrics.value("kvlab_prefix_cache_misses_total")
    started = time.monotonic()
    compressed = chat(snapkv_server, content=content).json()["kvlab"]
    elapsed_s = time.monotonic() - started
    # the server's counters agree: a context compressed on arrival is a prefix-cache miss, none of it cached
    assert metrics.value("kvlab_cached_prompt_tokens_total") == cached_before
    assert metrics.value("kvlab_prefix_cache_misses_total") == misses_before + 1
    assert compressed["compressed"] is True and compressed["compression_reason"] == "over_threshold"
    assert (compressed["policy"], compressed["ratio"]) == ("snapkv", 0.5)
    assert compressed["context_tokens"] > 256 and compressed["document_id"] is None
    assert compressed["kept_tokens"] == pytest.approx(compressed["context_tokens"] * 0.5, abs=1)
    # the context was prefilled by this request: nothing counts as cached, and its time is prefill, not queueing
    assert compressed["cached_tokens"] == 0
    assert compressed["queue_s"] + compressed["prefill_s"] + compressed["decode_s"] <= elapsed_s
    with start(policy="full") as plain_server:
        full = chat(plain_server, content=content).json()["kvlab"]
    assert full["compressed"] is False and full["compression_reason"] == "policy_full"
    assert full["prefilled_tokens"] == compressed["prefilled_tokens"]  # the same prompt
    assert compressed["kv_bytes"] < 0.7 * full["kv_bytes"]


def test_a_compressed_chat_answers_as_the_same_text_posted_as_a_document(snapkv_server):
    context = f"Parity. {CONTEXT}"
    as_chat = chat(snapkv_server, content=f"{context}\n\n{QUESTION}").json()
    document = httpx.post(f"{snapkv_server.url}/v1/documents", json={"text": context}, timeout=60).json()
    on_document = chat(snapkv_server, content=QUESTION, document_id=document["id"]).json()
    assert as_chat["choices"][0]["message"]["content"] == on_document["choices"][0]["message"]["content"]
    assert as_chat["kvlab"]["context_tokens"] == document["context_tokens"]
    assert as_chat["kvlab"]["kv_bytes"] == on_document["kvlab"]["kv_bytes"]


def test_a_short_chat_is_not_compressed(snapkv_server):
    stats = chat(snapkv_server, content=f"Short context.\n\n{QUESTION}").json()["kvlab"]
    assert stats["compressed"] is False and stats["compression_reason"] == "under_threshold"
    assert stats["policy"] is None and stats["kept_tokens"] is None


def test_a_one_paragraph_prompt_has_nothing_to_compress(snapkv_server):
    stats = chat(snapkv_server, content=CONTEXT + QUESTION).json()["kvlab"]
    assert stats["compressed"] is False and stats["compression_reason"] == "no_context"


def test_the_next_turn_continues_the_compressed_context(snapkv_server):
    first = chat(snapkv_server).json()
    messages = [{"role": "user", "content": LONG},
                {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                {"role": "user", "content": "Where did it open?"}]
    second = chat(snapkv_server, messages=messages).json()["kvlab"]
    assert second["compressed"] is True
    assert second["context_tokens"] == first["kvlab"]["context_tokens"]  # the first turn's context, not redone
    assert second["cached_tokens"] >= first["kvlab"]["context_tokens"]


def test_a_request_overrides_the_servers_policy(snapkv_server):
    stats = chat(snapkv_server, content=f"Short context.\n\n{QUESTION}", policy="streaming_llm",
                 ratio=0.25).json()["kvlab"]
    assert stats["compressed"] is True and stats["compression_reason"] == "requested"
    assert (stats["policy"], stats["ratio"]) == ("streaming_llm", 0.25)
    quantized = chat(snapkv_server, kv_quant="int8").json()["kvlab"]
    assert (quantized["policy"], quantized["kv_quant"]) == ("snapkv", "int8")
    plain = chat(snapkv_server).json()["kvlab"]
    assert quantized["kv_bytes"] < plain["kv_bytes"]
    off = chat(snapkv_server, policy="full").json()["kvlab"]
    assert off["compressed"] is False and off["compression_reason"] == "policy_full"


@pytest.mark.parametrize(("kvlab", "status", "fragment"), [
    ({"policy": "snapkvv"}, 400, "Available:"),
    ({"policy": "snapkv", "policy_params": {"windw_tokens": 8}}, 400, "window_tokens"),
    ({"ratio": 1.5}, 422, "kvlab.ratio"),
    ({"ratio": 0.5, "budget_tokens": 8}, 422, "not both"),
    ({"kv_quant": "int3"}, 422, "kvlab.kv_quant"),
])
def test_a_bad_override_is_refused_before_queueing(snapkv_server, kvlab, status, fragment):
    response = chat(snapkv_server, **kvlab)
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"] and error["param"].startswith("kvlab")


def test_an_override_with_a_document_is_refused(snapkv_server):
    document = httpx.post(f"{snapkv_server.url}/v1/documents", json={"text": CONTEXT}, timeout=60).json()
    response = chat(snapkv_server, content=QUESTION, document_id=document["id"], policy="snapkv")
    assert response.status_code == 400 and "POST /v1/documents" in response.json()["error"]["message"]
    stats = chat(snapkv_server, content=QUESTION, document_id=document["id"]).json()["kvlab"]
    assert (stats["compression_reason"], stats["policy"], stats["compressed"]) == ("document", "snapkv", True)
    assert stats["context_tokens"] == document["context_tokens"]


def test_completions_and_streams_report_the_compression(snapkv_server):
    completion = httpx.post(f"{snapkv_server.url}/v1/completions", timeout=60,
                            json={"model": MODEL, "prompt": LONG, "max_tokens": 3, "temperature": 0}).json()
    assert completion["kvlab"]["compressed"] is True and completion["kvlab"]["policy"] == "snapkv"
    body = {"model": MODEL, "messages": [{"role": "user", "content": LONG}], "max_tokens": 3, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{snapkv_server.url}/v1/chat/completions", json=body, timeout=60) as response:
        cached_header = int(response.headers["x-kvlab-cached-tokens"])
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    final = json.loads(events[-2])  # the last chunk before [DONE]
    assert final["kvlab"]["compressed"] is True and final["kvlab"]["compression_reason"] == "over_threshold"
    assert final["kvlab"]["cached_tokens"] == cached_header  # the header, sent before the answer, agrees


def test_compress_above_off_compresses_only_requests_that_ask(start):
    with start(policy="snapkv", ratio=0.5, compress_above=None) as running:
        assert chat(running).json()["kvlab"]["compression_reason"] == "disabled"
        assert chat(running, ratio=0.5).json()["kvlab"]["compressed"] is True


def test_served_model_name(start):
    with start(served_model_name="acme/kv-small") as running:
        models = httpx.get(f"{running.url}/v1/models").json()["data"]
        assert [model["id"] for model in models] == ["acme/kv-small"]
        response = running.openai().chat.completions.create(model="acme/kv-small", max_tokens=2,
                                                            messages=[{"role": "user", "content": "hi"}])
        assert response.model == "acme/kv-small"
        refused = chat(running)  # the loaded model's own name is not served under another
        assert refused.status_code == 404 and "acme/kv-small" in refused.json()["error"]["message"]


def test_a_compressed_prompt_is_answered_when_the_prefix_cache_cannot_keep_it(start):
    with start(policy="snapkv", ratio=0.5, compress_above=256, session_cache_bytes=0) as running:
        first, second = chat(running).json(), chat(running).json()
        assert running.state.sessions.kv_bytes == 0
    assert first["kvlab"]["compressed"] is True and second["kvlab"]["cached_tokens"] == 0  # compressed again
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]
