"""Issue 14: requests an attacker or a careless client could send, each reproducing a defect found on the landed
server. Bounded in time, aimed only at loopback servers on the tiny model."""

from __future__ import annotations

import random
import time

import httpx
import pytest

from kvlab.engine.text import StopMatcher, TextStream

MODEL = "tiny-llama"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# -- 1. stop strings ----------------------------------------------------------------------------------------------
def _reference_cut(text: str, stops: list[str]) -> int | None:
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(found) if found else None


def test_stop_matcher_agrees_with_find_on_random_texts():
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("ab") for _ in range(rng.randrange(1, 30)))
        stops = ["".join(rng.choice("ab") for _ in range(rng.randrange(1, 6))) for _ in range(rng.randrange(1, 4))]
        stream = TextStream(None, stops)
        position = 0
        while position < len(text) and not stream.stopped:
            size = rng.randrange(1, 4)
            stream._append(text[position:position + size])
            position += size
        cut = _reference_cut(text[:position], stops)
        assert stream.stopped == (cut is not None)
        if cut is not None:
            assert stream.text == text[:cut]
        else:
            held = max((k for s in stops for k in range(len(s) - 1, 0, -1) if stream.text.endswith(s[:k])),
                       default=0)
            assert stream._held_back() == held


def test_a_long_stop_string_costs_its_length_once_not_per_token(tiny_engine):
    """Defect: holding back a tail compared every prefix of the stop string at every token (quadratic): a
    1e6-character stop took 35 s for 2 tokens. Now each token reads only its new characters."""
    stop = "a" * 200_000 + "b"  # the worst case for the old check: every tail of a run of a's is a prefix
    stream = TextStream(tiny_engine.tokenizer, [stop])
    token = tiny_engine.tokenizer("aaaa", add_special_tokens=False)["input_ids"][-1]
    started = time.perf_counter()
    for _ in range(30):
        stream.push(token)
        stream.take()
    assert time.perf_counter() - started < 5  # was minutes
    assert not stream.stopped and stream.take() == ""  # all of it could still grow into the stop string


def test_stop_matcher_finds_overlapping_occurrences():
    matcher = StopMatcher("abab")
    assert matcher.feed("aba") is None and matcher.matched == 3
    assert matcher.feed("cabab") == 5


@pytest.mark.parametrize("stop", ["x" * 10_000, ["a", "b", "c", "d", "e"]])
def test_stop_strings_are_bounded(server, stop):
    started = time.perf_counter()
    response = httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "stop": stop}, timeout=30)
    error = error_of(response, 422)
    assert error["param"] == "stop" and ("256 characters" in error["message"] or "at most 4" in error["message"])
    assert time.perf_counter() - started < 5


# -- 2. prompt and document size, checked before tokenizing ---------------------------------------------------------
@pytest.fixture(scope="module")
def bounded(start):
    """A server storing documents of at most 64 tokens."""
    with start(max_document_tokens=64, request_timeout_s=20) as running:
        yield running


@pytest.fixture
def held(bounded):
    """Keep the worker busy until the test ends: anything that needs it would wait."""
    import threading

    event = threading.Event()
    bounded.wait_idle()
    bounded.state.worker.submit(lambda job: event.wait(20), timeout_s=30)
    while not bounded.state.worker.busy:
        time.sleep(0.005)
    yield
    event.set()
    bounded.wait_idle()


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "word " * 8000}]}, "messages"),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 8000}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [5] * 5000}, "prompt"),
    ("/v1/documents", {"text": "word " * 200}, "text"),
])
def test_huge_texts_are_refused_before_the_worker_tokenizes_them(bounded, held, path, body, param):
    """Defect: a 14 MB prompt held the worker 20-34 s before its 400. Now the length in characters is checked on
    arrival (the worker is busy here, so an answer at all shows the text never queued)."""
    started = time.perf_counter()
    response = httpx.post(f"{bounded.url}{path}", json=body, timeout=10)
    error = error_of(response, 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == param
    assert time.perf_counter() - started < 5


def test_max_document_tokens_is_enforced_after_tokenizing(bounded):
    response = httpx.post(f"{bounded.url}/v1/documents", json={"text": "word " * 100}, timeout=30)  # < 8 * 64 chars
    error = error_of(response, 400)
    assert error["code"] == "document_too_long" and "64 tokens" in error["message"]
    assert bounded.state.store.list() == []
