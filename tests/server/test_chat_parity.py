"""`kvlab chat` (a Conversation over a stored document) and an HTTP chat on the same document follow one runtime:
the same tokens, the same answers and the same re-compression turn, on the real SmolLM2-135M."""

from __future__ import annotations

import httpx
import pytest

from kvlab.bench.haystack import build_haystack
from kvlab.engine import Engine
from kvlab.policies import make_policy
from kvlab.store.documents import compress_document, conversation_for, open_document
from kvlab.store.store import CacheStore

pytestmark = pytest.mark.real

QUESTIONS = ["What is the pass key? Answer with the number only.", "Repeat the pass key, digit by digit."]


@pytest.mark.parametrize("kv_quant", [None, "int4"])
def test_cli_chat_and_http_chat_agree(smollm2, start, tmp_path, kv_quant):
    engine = Engine(smollm2)
    count = lambda text: len(smollm2.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    text = build_haystack(count, 260, seed=3).text
    store = CacheStore(tmp_path / "store")
    policy = make_policy("snapkv")
    quantization = None
    if kv_quant is not None:
        from kvlab.cache.quant import QuantizationParams

        quantization = QuantizationParams(kv_quant)
    document = compress_document(engine, text, policy, ratio=0.5, quantization=quantization, store=store)

    conversation = conversation_for(engine, open_document(engine, str(document.path), store))
    cli_turns = [conversation.ask(question, max_new_tokens=40) for question in QUESTIONS]
    assert any(turn.recompressed for turn in cli_turns), "the second turn should outgrow the budget's headroom"

    with start(engine=engine, store_root=tmp_path / "store", policy="snapkv", ratio=0.5,
               kv_quant=kv_quant) as running:
        messages, http_turns = [], []
        for question in QUESTIONS:
            messages.append({"role": "user", "content": question})
            reply = httpx.post(f"{running.url}/v1/chat/completions", timeout=120, json={
                "model": "smollm2-135m", "messages": messages, "max_tokens": 40, "temperature": 0,
                "kvlab": {"document_id": document.key}}).json()
            http_turns.append(reply)
            messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
    assert [turn["choices"][0]["message"]["content"] for turn in http_turns] == [t.answer for t in cli_turns]
    assert [turn["kvlab"]["recompressed"] for turn in http_turns] == [t.recompressed for t in cli_turns]
    if kv_quant is not None:
        assert http_turns[-1]["kvlab"]["compression"] > 2  # half the tokens, int4 (a short document: the fp32
        # residual window is a large share)
