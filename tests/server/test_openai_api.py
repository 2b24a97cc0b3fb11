"""The OpenAI surface through the official client: models, chat and completions, streaming, usage, stop, seed."""

from __future__ import annotations

import httpx
import pytest

MODEL = "tiny-llama"  # the server fixtures serve the tiny random model
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
FIXED = {"extra_body": {"kvlab": {"ignore_eos": True}}}  # the random model's answers run to max_tokens


def prompt_ids(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_models_lists_the_loaded_model(server):
    models = server.openai().models.list().data
    assert [model.id for model in models] == [MODEL]
    assert models[0].max_context_tokens == 4096
    assert server.openai().models.retrieve(MODEL).id == MODEL


def test_chat_usage_counts_prompt_and_completion_tokens(server, tiny_engine):
    response = server.openai().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6,
                                                       temperature=0, **FIXED)
    choice = response.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    usage = response.usage
    assert usage.prompt_tokens == len(prompt_ids(tiny_engine.tokenizer, MESSAGES))
    assert usage.completion_tokens == 6
    assert usage.total_tokens == usage.prompt_tokens + 6
    assert response.id.startswith("chatcmpl-") and response.model == MODEL


def test_streaming_sends_the_same_text_in_chunks_then_usage(server):
    client = server.openai()
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, **FIXED)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}, **FIXED))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    finishing = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert [chunk.choices[0].finish_reason for chunk in finishing] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_is_server_sent_events_ending_in_done(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "stream": True, "kvlab": {"ignore_eos": True}}
    with server.client() as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [block for block in response.text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events)
    assert events[-1] == "data: [DONE]" and response.text.endswith("data: [DONE]\n\n")
    assert int(response.headers["x-kvlab-prompt-tokens"]) > 0


def test_completions_plain_and_streamed(server, tiny_engine):
    client = server.openai()
    response = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0,
                                         **FIXED)
    assert response.object == "text_completion" and response.choices[0].finish_reason == "length"
    assert response.usage.prompt_tokens == len(tiny_engine.tokenizer("Once upon a time")["input_ids"])
    assert response.usage.completion_tokens == 5
    streamed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0,
                                         stream=True, **FIXED)
    assert "".join(chunk.choices[0].text for chunk in streamed) == response.choices[0].text


def _clean_pair(text: str) -> tuple[int, str]:
    """A two-character piece of ``text`` (not at its start, first occurrence, no replacement characters)."""
    for index in range(1, len(text) - 2):
        piece = text[index:index + 2]
        if "\ufffd" not in piece and text.find(piece) == index:
            return index, piece
    pytest.skip("the generated text has no usable stop string")


def test_stop_string_ends_the_answer_before_it(server):
    client = server.openai()
    text = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0,
                                          **FIXED).choices[0].message.content
    index, stop = _clean_pair(text)
    cut = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0, stop=[stop],
                                         **FIXED)
    assert cut.choices[0].message.content == text[:index]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0,
                                              stop=stop, stream=True, **FIXED)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == text[:index]


def test_seed_makes_sampling_reproducible(server):
    client = server.openai()

    def sample(seed):
        return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0,
                                              top_p=0.95, seed=seed, **FIXED).choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_health_and_metrics(server):
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("kvlab_requests_total", "kvlab_prompt_tokens_total", "kvlab_completion_tokens_total",
                 "kvlab_prefill_seconds_total", "kvlab_decode_seconds_total", "kvlab_prefix_cache_hits_total",
                 "kvlab_kv_bytes_held"):
        assert f"# TYPE {name} " in text
    assert server.metrics()['kvlab_requests_total{route="/health",status="200"}'] >= 1
