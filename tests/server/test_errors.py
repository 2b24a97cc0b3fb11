"""Every failure over raw HTTP: OpenAI's error shape with the right status, and the overload behaviour (429 with
Retry-After, timeouts, a disconnecting client cancels its generation)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

MODEL = "tiny-llama"  # the server fixtures serve the tiny random model
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
LONG_RUN = {**CHAT, "max_tokens": 4000, "kvlab": {"ignore_eos": True}}  # far longer than any test waits


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.fixture(scope="module")
def strict(start):
    """A server with a one-request queue, a 2 s timeout and a 64 KiB body limit."""
    with start(max_queue=1, request_timeout_s=2.0, max_body_bytes=64 * 1024) as running:
        yield running


@pytest.fixture
def gate(strict):
    """Hold the worker with a job that waits for ``gate.set()`` (set on teardown in any case)."""
    event = threading.Event()
    strict.wait_idle()
    strict.state.worker.submit(lambda job: event.wait(10), timeout_s=30)
    while not strict.state.worker.busy:
        time.sleep(0.005)
    yield event
    event.set()
    strict.wait_idle()


@pytest.mark.parametrize("content, headers", [
    (b"{not json", {"content-type": "application/json"}),
    (b"[1, 2]", {"content-type": "application/json"}),
    (b"model=x", {"content-type": "application/x-www-form-urlencoded"}),
])
def test_malformed_body_is_400(server, content, headers):
    response = httpx.post(f"{server.url}/v1/chat/completions", content=content, headers=headers)
    assert error_of(response, 400)["type"] == "invalid_request_error"


@pytest.mark.parametrize("change, param, fragment", [
    ({"messages": []}, "messages", "at least 1"),
    ({"temperature": 5}, "temperature", "less than or equal to 2"),
    ({"temprature": 0.5}, "temprature", "did you mean 'temperature'"),
    ({"n": 3}, None, "n=3 is not supported"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", "user"),
    ({"stream": "yes"}, "stream", "boolean"),  # no coercion of strings into flags
    ({"max_tokens": True}, "max_tokens", "integer"),  # nor of booleans into numbers
    ({"temperature": "0.5"}, "temperature", "number"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content", "surrogate"),
])
def test_schema_violation_is_422_naming_the_field(server, change, param, fragment):
    # json.dumps escapes a lone surrogate as \ud800, which is valid JSON (httpx's json= cannot encode it)
    response = httpx.post(f"{server.url}/v1/chat/completions", content=json.dumps({**CHAT, **change}),
                          headers={"content-type": "application/json"})
    error = error_of(response, 422)
    assert error["param"] == param and fragment in error["message"]


def test_missing_field_is_422(server):
    error = error_of(httpx.post(f"{server.url}/v1/completions", json={"model": MODEL}), 422)
    assert error["param"] == "prompt" and "missing" in error["message"]


def test_unknown_model_is_404(server):
    error = error_of(httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "model": "gpt-4o"}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model" and MODEL in error["message"]
    assert error_of(httpx.get(f"{server.url}/v1/models/gpt-4o"), 404)["code"] == "model_not_found"


@pytest.mark.parametrize("document_id", ["nope", "0" * 64])
def test_unknown_document_is_404(server, document_id):
    body = {**CHAT, "kvlab": {"document_id": document_id}}
    error = error_of(httpx.post(f"{server.url}/v1/chat/completions", json=body), 404)
    assert error["code"] == "document_not_found" and error["param"] == "kvlab.document_id"
    assert error_of(httpx.get(f"{server.url}/v1/documents/{document_id}"), 404)["code"] == "document_not_found"
    assert error_of(httpx.delete(f"{server.url}/v1/documents/{document_id}"), 404)["code"] == "document_not_found"


def test_unknown_route_is_404_in_the_same_shape(server):
    error_of(httpx.get(f"{server.url}/v2/nothing"), 404)


@pytest.mark.parametrize("change", [
    {"messages": [{"role": "user", "content": "x" * 5000}]},  # the prompt alone is past the 4096-token window
    {"max_tokens": 5000},  # the prompt fits, the answer would not
])
def test_beyond_the_window_is_400_naming_the_limit(server, change):
    error = error_of(httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, **change}), 400)
    assert error["code"] == "context_length_exceeded" and "4096" in error["message"]


def test_document_beyond_the_window_is_400(server):
    response = httpx.post(f"{server.url}/v1/documents", json={"text": "x" * 5000})
    assert error_of(response, 400)["code"] == "context_length_exceeded"


@pytest.mark.parametrize("chunked", [False, True])
def test_body_over_the_limit_is_413(strict, chunked):
    body = b'{"text": "' + b"x" * 100_000 + b'"}'
    content = iter([body[i:i + 8192] for i in range(0, len(body), 8192)]) if chunked else body
    response = httpx.post(f"{strict.url}/v1/documents", content=content,
                          headers={"content-type": "application/json"})
    error = error_of(response, 413)
    assert error["code"] == "request_too_large" and str(64 * 1024) in error["message"]


def test_full_queue_is_429_with_retry_after(strict, gate):
    results = {}
    waiting = threading.Thread(target=lambda: results.update(
        first=httpx.post(f"{strict.url}/v1/chat/completions", json=CHAT, timeout=30)))
    waiting.start()
    deadline = time.monotonic() + 5
    while strict.state.worker.waiting < 1:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    refused = httpx.post(f"{strict.url}/v1/chat/completions", json=CHAT)
    error = error_of(refused, 429)
    assert error["type"] == "rate_limit_error" and int(refused.headers["retry-after"]) >= 1
    gate.set()
    waiting.join(10)
    assert results["first"].status_code == 200
    assert strict.metrics()['kvlab_rejected_requests_total{kind="generation"}'] >= 1


def test_request_waiting_past_its_timeout_is_504(strict, gate):
    started = time.monotonic()
    error = error_of(httpx.post(f"{strict.url}/v1/chat/completions", json=CHAT, timeout=30), 504)
    assert error["code"] == "timeout" and "2 s" in error["message"]
    assert 1.5 < time.monotonic() - started < 8


def test_generation_past_its_timeout_stops(strict):
    strict.wait_idle()
    before = strict.metrics()
    error_of(httpx.post(f"{strict.url}/v1/chat/completions", json=LONG_RUN, timeout=30), 504)
    strict.wait_idle()
    after = strict.metrics()
    assert after['kvlab_generations_cancelled_total{reason="timeout"}'] == before.get(
        'kvlab_generations_cancelled_total{reason="timeout"}', 0) + 1
    assert after["kvlab_generated_tokens_total"] - before["kvlab_generated_tokens_total"] < LONG_RUN["max_tokens"]


def test_internal_error_is_500_without_a_traceback(server, monkeypatch):
    import kvlab.server.generation

    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("secret detail in /srv/kvlab/internal.py")

    monkeypatch.setattr(kvlab.server.generation, "ModelRunner", Broken)
    response = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
    error = error_of(response, 500)
    assert error["type"] == "server_error" and "request" in error["message"]
    assert "secret" not in response.text and "Traceback" not in response.text and ".py" not in response.text
    monkeypatch.undo()
    assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 200  # still serving


def _cancelled(running) -> float:
    return running.metrics().get('kvlab_generations_cancelled_total{reason="disconnect"}', 0)


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_generation(server, stream):
    server.wait_idle()
    before_cancelled, before_tokens = _cancelled(server), server.metrics()["kvlab_generated_tokens_total"]
    with server.client(timeout=httpx.Timeout(30, read=0.5)) as client:
        if stream:
            with client.stream("POST", "/v1/chat/completions", json={**LONG_RUN, "stream": True}) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if '"content"' in line:
                        break  # hang up after the first chunk
        else:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up after 0.5 s and closes the connection
                client.post("/v1/chat/completions", json=LONG_RUN)
    deadline = time.monotonic() + 10
    while _cancelled(server) < before_cancelled + 1:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.02)
    server.wait_idle()
    assert server.metrics()["kvlab_generated_tokens_total"] - before_tokens < LONG_RUN["max_tokens"]
