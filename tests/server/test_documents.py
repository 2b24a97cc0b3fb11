"""Documents: create, list, read, delete; answering on a document prefills only the messages; a session's next
turn reuses the previous one; documents survive a restart; a failed write leaves nothing behind."""

from __future__ import annotations

import re

import httpx
import pytest

from kvlab.server.prompts import document_chat_token_ids
from kvlab.server.schemas import ChatMessage

MODEL = "tiny-llama"  # the server fixtures serve the tiny random model
TEXT = ("The archive opened in 1998 in Turin. Its first keeper was Ada Verne, who catalogued maps. " * 4
        + "The pass key is 4242. ")


def post(running, text=TEXT, **fields):
    return httpx.post(f"{running.url}/v1/documents", json={"text": text, **fields}, timeout=60)


def test_document_lifecycle(server, tiny_engine):
    created = post(server, policy="snapkv", ratio=0.5)
    assert created.status_code == 201
    document = created.json()
    assert re.fullmatch(r"[0-9a-f]{64}", document["id"]) and document["object"] == "document"
    assert document["context_tokens"] == int(tiny_engine.prompt(TEXT, "").prefix_ids.numel())
    assert document["kept_tokens"] == pytest.approx(document["context_tokens"] * 0.5, abs=1)
    assert document["kv_bytes_kept"] < 0.6 * document["kv_bytes_full"] and document["file_bytes"] > 0
    again = post(server, policy="snapkv", ratio=0.5)
    assert again.status_code == 200 and again.json()["id"] == document["id"]  # found in the store, not redone

    url = f"{server.url}/v1/documents"
    assert document["id"] in [item["id"] for item in httpx.get(url).json()["data"]]
    shown = httpx.get(f"{url}/{document['id']}").json()
    assert {key: shown[key] for key in ("context_tokens", "kept_tokens", "kv_bytes_kept", "policy")} == {
        key: document[key] for key in ("context_tokens", "kept_tokens", "kv_bytes_kept", "policy")}
    deleted = httpx.delete(f"{url}/{document['id']}")
    assert deleted.status_code == 200 and deleted.json() == {"id": document["id"], "object": "document",
                                                             "deleted": True}
    assert httpx.get(f"{url}/{document['id']}").status_code == 404
    assert document["id"] not in [item["id"] for item in httpx.get(url).json()["data"]]


def test_chat_on_a_document_prefills_only_the_messages(server, tiny_engine):
    from kvlab.store.documents import conversation_for, open_document

    document = post(server, policy="streaming_llm", ratio=0.5).json()
    messages = [{"role": "user", "content": "What is the pass key?"}]
    response = server.openai().chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                       extra_body={"kvlab": {"document_id": document["id"]}})
    question_tokens = len(document_chat_token_ids(tiny_engine.tokenizer, [ChatMessage(**messages[0])]))
    usage = response.usage
    assert usage.prompt_tokens == document["context_tokens"] + question_tokens
    assert usage.prompt_tokens_details.cached_tokens == document["context_tokens"]
    assert response.kvlab["prefilled_tokens"] == question_tokens
    # the same answer as kvlab's own multi-turn chat over the stored file
    path = server.state.store.get(document["id"])
    turn = conversation_for(tiny_engine, open_document(tiny_engine, str(path))).ask(messages[0]["content"],
                                                                                    max_new_tokens=8)
    assert response.choices[0].message.content.strip() == turn.answer


def test_next_turn_prefills_only_what_is_new(server, tiny_engine):
    document = post(server, text=TEXT + "Session test.", policy="knorm", ratio=0.25).json()
    client = server.openai()
    extra = {"extra_body": {"kvlab": {"document_id": document["id"], "ignore_eos": True}}}
    first = [{"role": "user", "content": "Where did the archive open?"}]
    answer = client.chat.completions.create(model=MODEL, messages=first, max_tokens=6, temperature=0, **extra)
    second = first + [{"role": "assistant", "content": answer.choices[0].message.content},
                      {"role": "user", "content": "And who was its keeper?"}]
    reply = client.chat.completions.create(model=MODEL, messages=second, max_tokens=6, temperature=0, **extra)
    tokenizer = tiny_engine.tokenizer
    first_ids = document_chat_token_ids(tokenizer, [ChatMessage(**m) for m in first])
    second_ids = document_chat_token_ids(tokenizer, [ChatMessage(**m) for m in second])
    assert second_ids[:len(first_ids)] == first_ids
    assert reply.usage.prompt_tokens == document["context_tokens"] + len(second_ids)
    assert reply.kvlab["prefilled_tokens"] <= len(second_ids) - len(first_ids)
    assert reply.usage.prompt_tokens_details.cached_tokens >= document["context_tokens"] + len(first_ids)


def test_conversation_without_a_document_reuses_its_prefix(server):
    client = server.openai()
    first = [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]
    answer = client.chat.completions.create(model=MODEL, messages=first, max_tokens=5, temperature=0,
                                            extra_body={"kvlab": {"ignore_eos": True}})
    second = first + [{"role": "assistant", "content": answer.choices[0].message.content},
                      {"role": "user", "content": "Go on."}]
    reply = client.chat.completions.create(model=MODEL, messages=second, max_tokens=5, temperature=0)
    assert reply.usage.prompt_tokens_details.cached_tokens >= answer.usage.prompt_tokens
    assert reply.kvlab["prefilled_tokens"] < reply.usage.prompt_tokens - answer.usage.prompt_tokens + 1


def test_documents_survive_a_restart(start, tmp_path):
    with start(store_root=tmp_path) as running:
        document = post(running).json()
    with start(store_root=tmp_path) as restarted:
        listed = httpx.get(f"{restarted.url}/v1/documents").json()["data"]
        assert [item["id"] for item in listed] == [document["id"]]
        response = restarted.openai().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Key?"}], max_tokens=2,
            extra_body={"kvlab": {"document_id": document["id"]}})
        assert response.usage.prompt_tokens_details.cached_tokens == document["context_tokens"]
        assert restarted.metrics()["kvlab_document_loads_total"] == 1


def test_a_failed_write_leaves_no_document(start, tmp_path, monkeypatch):
    import kvlab.store.documents

    def torn_write(path, *args, **kwargs):  # a crash halfway through writing the file
        path.write_bytes(b"half a file")
        raise RuntimeError("simulated crash while writing (secret detail)")

    monkeypatch.setattr(kvlab.store.documents, "save_cache", torn_write)
    with start(store_root=tmp_path) as running:
        response = post(running)
        assert response.status_code == 500, response.text
        error = response.json()["error"]
        assert error["type"] == "server_error" and "secret detail" not in response.text
        assert "Traceback" not in response.text and ".py" not in response.text
        assert httpx.get(f"{running.url}/v1/documents").json()["data"] == []
    assert list(tmp_path.rglob("*.kv")) == [] and list(tmp_path.rglob("*.tmp")) == []


def test_unreadable_files_are_not_listed(server):
    shard = server.state.store.root / "ab"
    shard.mkdir(parents=True, exist_ok=True)
    (shard / ("ab" + "0" * 62 + ".kv")).write_bytes(b"\x00" * 40)  # a torn file under a valid key
    (shard / ("ab" + "1" * 62 + ".kv.123-abcd.tmp")).write_bytes(b"partial")
    listed = [item["id"] for item in httpx.get(f"{server.url}/v1/documents").json()["data"]]
    assert not any(document_id.startswith("ab") for document_id in listed)
    broken = httpx.get(f"{server.url}/v1/documents/ab{'0' * 62}")
    assert broken.status_code == 409 and "recreate" in broken.json()["error"]["message"]
