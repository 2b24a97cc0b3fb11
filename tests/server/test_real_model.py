"""End to end on the real SmolLM2-135M with the official openai client: a chat, the same chat streamed, and a
question on a posted document."""

from __future__ import annotations

import httpx
import pytest

from kvlab.engine import Engine

pytestmark = pytest.mark.real


def test_openai_client_session_on_smollm2(smollm2, start):
    with start(engine=Engine(smollm2)) as running:
        client = running.openai()
        assert [model.id for model in client.models.list().data] == ["smollm2-135m"]
        messages = [{"role": "user", "content": "What is the capital of France? Answer with one word."}]
        answer = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=8,
                                                temperature=0)
        assert "Paris" in answer.choices[0].message.content
        streamed = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=8,
                                                  temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == answer.choices[0].message.content

        text = "Notes from the meeting. The pass key is 73914. Keep it safe and do not share it."
        document = httpx.post(f"{running.url}/v1/documents", json={"text": text}, timeout=60).json()
        reply = client.chat.completions.create(
            model="smollm2-135m", max_tokens=12, temperature=0,
            messages=[{"role": "user", "content": "What is the pass key? Answer with the number only."}],
            extra_body={"kvlab": {"document_id": document["id"]}})
        assert "73914" in reply.choices[0].message.content
        assert reply.usage.prompt_tokens_details.cached_tokens == document["context_tokens"]
