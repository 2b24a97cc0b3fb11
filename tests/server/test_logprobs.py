"""``/v1/completions`` with ``logprobs`` and ``echo``: the numbers equal the model's own log-softmax, computed here
directly with transformers; the shape is what lm-evaluation-harness's ``local-completions`` reads; misuse is a 400."""

from __future__ import annotations

import httpx
import pytest
import torch

import kvlab.server.generation

MODEL = "tiny-llama"
PROMPT = "The quick brown fox jumps over the lazy dog, héllo wörld."


def complete(server, **fields) -> httpx.Response:
    body = {"model": MODEL, "prompt": PROMPT, "temperature": 0, **fields}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)


def reference_log_probs(tiny_llama, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab): row i is the log-distribution predicting token i + 1, straight from transformers."""
    with torch.inference_mode():
        logits = tiny_llama.model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_echo_scores_every_prompt_token_as_the_model_does(server, tiny_llama):
    response = complete(server, echo=True, logprobs=3, max_tokens=0)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    logprobs = choice["logprobs"]
    ids = tiny_llama.tokenizer(PROMPT)["input_ids"]
    expected = reference_log_probs(tiny_llama, ids)
    assert len(logprobs["tokens"]) == len(ids) and logprobs["token_logprobs"][0] is None
    assert logprobs["top_logprobs"][0] is None
    for position in range(1, len(ids)):
        row = expected[position - 1]
        assert logprobs["token_logprobs"][position] == pytest.approx(float(row[ids[position]]), abs=1e-4)
        top = logprobs["top_logprobs"][position]
        assert 3 <= len(top) <= 4  # the 3 most likely, plus the prompt's token when it is not among them
        assert max(top.values()) == pytest.approx(float(row.max()), abs=1e-4)
    # the tokens join to the prompt (the multi-byte "é" and "ö" included) and the offsets index that text
    assert "".join(logprobs["tokens"]) == PROMPT == choice["text"]
    assert all(PROMPT[offset:].startswith(token)
               for offset, token in zip(logprobs["text_offset"], logprobs["tokens"], strict=True))
    assert "" in logprobs["tokens"]  # the first byte of a two-byte character: the next token carries it
    assert response.json()["usage"]["completion_tokens"] == 0 and choice["finish_reason"] == "length"


def test_lm_eval_request_shape_echo_plus_one_generated_token(server, tiny_llama):
    """What ``local-completions`` sends for a loglikelihood request: token ids in a batch of one, echo, logprobs=1,
    max_tokens=1. It sums ``token_logprobs[ctxlen:-1]``, so the generated token must come last."""
    ids = tiny_llama.tokenizer(PROMPT)["input_ids"]
    response = complete(server, prompt=[ids], echo=True, logprobs=1, max_tokens=1, seed=1234,
                        kvlab={"ignore_eos": True})
    assert response.status_code == 200, response.text
    logprobs = response.json()["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(ids) + 1
    expected = reference_log_probs(tiny_llama, ids)
    greedy = int(expected[-1].argmax())
    assert logprobs["token_logprobs"][-1] == pytest.approx(float(expected[-1, greedy]), abs=1e-4)
    # is_greedy as lm-eval computes it: each token's logprob equals the best of its top_logprobs
    greedy_flags = [token == max(top.values()) for token, top in
                    zip(logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:], strict=True)]
    assert greedy_flags[-1] and not all(greedy_flags)  # the random model does not predict the prompt itself


def test_logprobs_of_generated_tokens_without_echo(server, tiny_llama):
    response = complete(server, logprobs=0, max_tokens=4, kvlab={"ignore_eos": True})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == 4 and None not in logprobs["token_logprobs"]
    assert logprobs["text_offset"][0] == len(PROMPT) and all(len(top) == 1 for top in logprobs["top_logprobs"])
    generated = tiny_llama.tokenizer(PROMPT)["input_ids"]
    for logprob in logprobs["token_logprobs"]:  # greedy: each is its distribution's maximum
        row = reference_log_probs(tiny_llama, generated)[-1]
        assert logprob == pytest.approx(float(row.max()), abs=1e-4)
        generated.append(int(row.argmax()))
    assert choice["text"] == tiny_llama.tokenizer.decode(generated[-4:])


def test_scoring_does_not_take_logits_from_the_prefix_cache(server):
    """A plain completion caches the prompt's prefix; scoring it afterwards still runs every position."""
    assert complete(server, max_tokens=1).status_code == 200
    first = complete(server, echo=True, logprobs=2, max_tokens=0).json()["choices"][0]["logprobs"]
    again = complete(server, echo=True, logprobs=2, max_tokens=0).json()["choices"][0]["logprobs"]
    assert first == again and None not in first["token_logprobs"][1:]


def test_echo_without_logprobs_prepends_the_prompt(server):
    choice = complete(server, echo=True, max_tokens=2, kvlab={"ignore_eos": True}).json()["choices"][0]
    assert choice["text"].startswith(PROMPT) and len(choice["text"]) > len(PROMPT)
    assert choice["logprobs"] is None


@pytest.mark.parametrize(("fields", "words"), [
    ({"logprobs": 21}, "20"),
    ({"logprobs": -1}, "0"),
    ({"logprobs": True}, "integer"),  # strict: a boolean is not a count
    ({"echo": "yes"}, "boolean"),
    ({"max_tokens": 0}, "echo=true"),
    ({"echo": True, "stream": True}, "stream=false"),
    ({"logprobs": 1, "stream": True}, "stream=false"),
    ({"prompt": [[1, 2], [3, 4]]}, "one prompt"),
])
def test_misuse_is_refused_with_the_fix(server, fields, words):
    response = complete(server, **fields)
    assert 400 <= response.status_code < 500 and response.status_code != 404, response.text
    assert words in response.json()["error"]["message"]


def test_chat_still_refuses_logprobs(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code >= 400 and "logprobs" in response.json()["error"]["message"]


def test_a_prompt_too_long_to_score_at_once_is_refused(server, monkeypatch):
    monkeypatch.setattr(kvlab.server.generation, "MAX_ECHO_LOGIT_BYTES", 10 * 259 * 4)  # 10 tokens of the tiny vocab
    response = complete(server, echo=True, logprobs=1, max_tokens=0)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "at most 10 prompt tokens" in error["message"]
