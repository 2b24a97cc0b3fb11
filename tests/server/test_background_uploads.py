"""Background uploads: ``"background": true`` answers 202 with an upload to poll; the upload goes on without the
client, fails with the blocking POST's error past the request timeout, and is cancelled by shutdown."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse

import httpx

TEXT = "The lighthouse keeper logged every ship that passed the cape in a green ledger. " * 5


def upload(running, text=TEXT, **fields) -> httpx.Response:
    return httpx.post(f"{running.url}/v1/documents", json={"text": text, "background": True, **fields}, timeout=10)


def poll(running, status_url: str, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        state = httpx.get(f"{running.url}{status_url}", timeout=10).json()
        if state["status"] in ("done", "failed"):
            return state
        assert time.monotonic() < deadline, f"the upload is still {state['status']}"
        time.sleep(0.02)


def test_a_background_upload_answers_202_and_is_polled_to_done(server, tiny_engine):
    accepted = upload(server, policy="snapkv", ratio=0.5)
    assert accepted.status_code == 202
    body = accepted.json()
    assert body["object"] == "document.upload" and body["status"] in ("queued", "running")
    assert accepted.headers["location"] == body["status_url"] == f"/v1/documents/uploads/{body['id']}"
    finished = poll(server, body["status_url"])
    assert finished["status"] == "done" and finished["created"] is True and finished["error"] is None
    document = finished["document"]
    assert document["context_tokens"] == int(tiny_engine.prompt(TEXT, "").prefix_ids.numel())
    assert document["policy"] == "snapkv"
    assert httpx.get(f"{server.url}/v1/documents/{document['id']}").status_code == 200
    again = poll(server, upload(server, policy="snapkv", ratio=0.5).json()["status_url"])
    assert again["created"] is False and again["document"]["id"] == document["id"]  # found in the store


def test_an_upload_goes_on_after_the_client_hangs_up(server, tiny_engine):
    text = "A ledger of tides, written by a client that did not wait. " * 6
    body = json.dumps({"text": text, "background": True}).encode()
    address = urlparse(server.url)
    with socket.create_connection((address.hostname, address.port)) as connection:
        connection.sendall(b"POST /v1/documents HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    context_tokens = int(tiny_engine.prompt(text, "").prefix_ids.numel())
    deadline = time.monotonic() + 30
    while not any(item["context_tokens"] == context_tokens
                  for item in httpx.get(f"{server.url}/v1/documents").json()["data"]):
        assert time.monotonic() < deadline, "the upload was dropped with its connection"
        time.sleep(0.05)


def test_an_upload_past_the_request_timeout_fails_with_the_timeout_error(start):
    with start(request_timeout_s=0.001) as running:
        finished = poll(running, upload(running).json()["status_url"])
    assert finished["status"] == "failed" and finished["document"] is None
    assert finished["error"]["code"] == "timeout" and "timeout" in finished["error"]["message"]


def test_shutdown_cancels_a_queued_upload(start):
    with start() as running:
        def hold(job):  # keeps the worker busy until the shutdown cancels it
            while True:
                job.check()
                time.sleep(0.01)

        running.state.worker.submit(hold, 60)
        accepted = upload(running).json()
        assert httpx.get(f"{running.url}{accepted['status_url']}").json()["status"] == "queued"
        state = running.state
    finished = state.uploads.get(accepted["id"]).describe()
    assert finished.status == "failed" and finished.error["code"] == "cancelled"


def test_an_unknown_upload_is_a_404(server):
    response = httpx.get(f"{server.url}/v1/documents/uploads/upload-000")
    assert response.status_code == 404 and response.json()["error"]["code"] == "upload_not_found"


def test_background_must_be_a_boolean(server):
    response = httpx.post(f"{server.url}/v1/documents", json={"text": TEXT, "background": "yes"}, timeout=10)
    assert response.status_code == 422 and response.json()["error"]["param"] == "background"
