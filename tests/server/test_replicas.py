"""`kvlab serve --replicas`: a local Ray cluster (2 CPUs) runs 2 replicas of the tiny model behind the frontend on a
free port, once for the module. Answers must equal the single-process server's, documents stick to the replica
that holds them, uploads and metrics are shared, overload is 429, and a killed replica costs at most a clean 503.

The replica-killing test is last: it leaves a replica restarting."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from kvlab.server import Settings
from kvlab.server.metrics import parse
from kvlab.server.replicas import REPLICA_HEADER

MODEL = "tiny-llama"
DOCUMENT = ("The lighthouse keeper of Aldmoor wrote down the pass key 41877 in a blue notebook. " * 12).strip()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The URL of 2 replicas (queue bound 2 each) sharing one store."""
    from kvlab.server import replicas

    settings = Settings(model=MODEL, store_root=tmp_path_factory.mktemp("shared-store"), max_queue=2)
    url = replicas.start(settings, 2, "127.0.0.1", free_port(), num_cpus=2)
    try:
        yield url
    finally:
        replicas.stop()


def chat_body(content: str, max_tokens: int = 8, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


def streamed_text(url: str, body: dict) -> str:
    text = ""
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line.removeprefix("data: "))
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["delta"].get("content") or ""
    return text


def test_chat_and_stream_equal_the_single_process_server(cluster, server):
    body = chat_body("Name three colours of the sea.", max_tokens=12)
    expected = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
    response = httpx.post(f"{cluster}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers[REPLICA_HEADER]
    assert response.json()["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
    assert streamed_text(cluster, body) == expected["choices"][0]["message"]["content"]
    assert httpx.get(f"{cluster}/v1/models").json()["data"][0]["id"] == MODEL
    assert httpx.get(f"{cluster}/health").json()["status"] == "ok"


def test_a_document_is_answered_by_the_replica_holding_it(cluster):
    posted = httpx.post(f"{cluster}/v1/documents", json={"text": DOCUMENT}, timeout=60)
    assert posted.status_code in (200, 201), posted.text
    document_id, holder = posted.json()["id"], posted.headers[REPLICA_HEADER]
    for question in ("What is the pass key?", "Where was it written?", "Who wrote it?"):
        body = chat_body(question, kvlab={"document_id": document_id})
        response = httpx.post(f"{cluster}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.headers[REPLICA_HEADER] == holder
        assert response.json()["kvlab"]["document_id"] == document_id
    described = httpx.get(f"{cluster}/v1/documents/{document_id}")
    assert described.status_code == 200 and described.json()["context_tokens"] > 0
    assert document_id in [item["id"] for item in httpx.get(f"{cluster}/v1/documents").json()["data"]]


def test_a_deleted_document_is_gone_from_every_replica(cluster):
    document_id = httpx.post(f"{cluster}/v1/documents", json={"text": DOCUMENT + " Deleted."}, timeout=60).json()["id"]
    assert httpx.post(f"{cluster}/v1/chat/completions", timeout=60,
                      json=chat_body("Key?", kvlab={"document_id": document_id})).status_code == 200
    assert httpx.delete(f"{cluster}/v1/documents/{document_id}").status_code == 200
    for attempt in range(6):  # different conversations: whichever replica answers, the store says it is gone
        response = httpx.post(f"{cluster}/v1/chat/completions", timeout=60,
                              json=chat_body(f"Key {attempt}?", kvlab={"document_id": document_id}))
        assert response.status_code == 404 and response.json()["error"]["code"] == "document_not_found"


def test_a_background_upload_is_found_through_every_replica(cluster):
    posted = httpx.post(f"{cluster}/v1/documents", json={"text": DOCUMENT + " Background.", "background": True},
                        timeout=60)
    assert posted.status_code == 202, posted.text
    status_url = posted.headers["location"]
    seen, deadline = set(), time.monotonic() + 60
    while True:
        response = httpx.get(f"{cluster}{status_url}")
        assert response.status_code == 200, response.text
        seen.add(response.headers[REPLICA_HEADER])
        if response.json()["status"] == "done" and len(seen) == 2:
            break
        assert time.monotonic() < deadline, (response.json(), seen)
        time.sleep(0.05)
    assert response.json()["document"]["context_tokens"] > 0


def test_metrics_sum_both_replicas(cluster):
    def completed() -> float:
        values = parse(httpx.get(f"{cluster}/metrics").text)
        assert values["kvlab_replicas"] == 2
        return values.get('kvlab_requests_total{route="/v1/chat/completions",status="200"}', 0.0)

    before = completed()
    answered_by = set()
    for index in range(16):  # 16 conversations, spread at random over both replicas
        response = httpx.post(f"{cluster}/v1/chat/completions", json=chat_body(f"Count to {index}."), timeout=60)
        assert response.status_code == 200
        answered_by.add(response.headers[REPLICA_HEADER])
    assert len(answered_by) == 2
    deadline = time.monotonic() + 10
    while completed() != before + 16:  # each replica reports after every request, without waiting
        assert time.monotonic() < deadline, (before, completed())
        time.sleep(0.1)


def test_overload_is_429_never_5xx(cluster):
    statuses: list[int] = []

    def one(index: int) -> None:
        body = chat_body(f"Overload {index}.", max_tokens=200, kvlab={"ignore_eos": True})
        response = httpx.post(f"{cluster}/v1/chat/completions", json=body, timeout=120)
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert response.headers["retry-after"] and response.json()["error"]["type"] == "rate_limit_error"

    threads = [threading.Thread(target=one, args=(index,)) for index in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}, statuses


def test_a_killed_replica_costs_at_most_a_clean_503(cluster):
    """A stream is running on the victim and a plain request waits behind it (the same conversation: affinity sends
    both there) when the victim is killed: the stream ends with an SSE error event, the waiting request (nothing of
    it sent yet) is retried on the other replica or answers a clean 503, and the service keeps answering."""
    import ray

    question = "Tell a long story about a lighthouse."
    victim = httpx.post(f"{cluster}/v1/chat/completions", json=chat_body(question), timeout=60).headers[REPLICA_HEADER]
    before = parse(httpx.get(f"{cluster}/metrics").text)
    long_body = chat_body(question, max_tokens=3000, kvlab={"ignore_eos": True})
    streaming, events, outcome = threading.Event(), [], {}

    def stream() -> None:
        with httpx.stream("POST", f"{cluster}/v1/chat/completions", json={**long_body, "stream": True},
                          timeout=120) as response:
            outcome["stream_replica"] = response.headers[REPLICA_HEADER]
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    streaming.set()

    def plain() -> None:
        outcome["plain"] = httpx.post(f"{cluster}/v1/chat/completions", json=long_body, timeout=120)

    threads = [threading.Thread(target=stream), threading.Thread(target=plain)]
    threads[0].start()
    assert streaming.wait(60)
    threads[1].start()
    time.sleep(0.5)
    assert outcome["stream_replica"] == victim
    names = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
             if victim in actor["name"] and "Replica" in actor["name"]]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=False)
    for thread in threads:
        thread.join(120)
    assert json.loads(events[-1])["error"]["code"] == "replica_unavailable", events[-3:]
    response = outcome["plain"]
    assert response.status_code in (200, 503), response.text
    if response.status_code == 503:
        assert response.json()["error"]["code"] == "replica_unavailable"
    else:
        assert response.headers[REPLICA_HEADER] != victim
    for index in range(4):  # the other replica keeps answering while the victim restarts
        after = httpx.post(f"{cluster}/v1/chat/completions", json=chat_body(f"Still there {index}?"), timeout=60)
        assert after.status_code == 200, after.text
    total, deadline = 'kvlab_requests_total{route="/v1/chat/completions",status="200"}', time.monotonic() + 10
    while parse(httpx.get(f"{cluster}/metrics").text)[total] < before[total] + 4:  # the dead replica's counts stay
        assert time.monotonic() < deadline
        time.sleep(0.1)
