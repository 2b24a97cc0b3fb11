"""``/v1/chat/completions`` and ``/v1/completions``, non-streaming and streaming (server-sent events ending in
``data: [DONE]``, as OpenAI sends them).

A request is queued on the worker (429 when the queue is full). A non-streaming request waits for the result; a
streaming one waits until its prompt is prefilled, so errors found before the first token (unknown document, prompt
too long) still get their HTTP status, then streams the deltas. Both watch the connection: a client that goes away
cancels its generation at the next decode step. ``usage.prompt_tokens_details.cached_tokens`` counts the prompt
tokens that were not prefilled (the document's cache, earlier turns); the ``kvlab`` object repeats it with timings,
and the ``x-kvlab-prompt-tokens`` / ``x-kvlab-cached-tokens`` headers carry it before the first streamed token.

A request without a document has its prompt's context compressed with the server's policy once the prompt is longer
than ``--compress-above`` tokens, or with the policy its ``kvlab`` object names (``prompt_compression.py``); the
``kvlab`` object of the answer (the last chunk of a stream) says what was done and why.
"""

from __future__ import annotations

import json
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import cast

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from kvlab.engine import compression
from kvlab.engine.sampling import SamplingConfig
from kvlab.server.errors import ApiError, error_body, redact
from kvlab.server.generation import Options, Result, generate
from kvlab.server.library import document_path
from kvlab.server.prompt_compression import Answered, Plan, answer, plan
from kvlab.server.prompts import (
    Prompt,
    chat_context_tokens,
    chat_token_ids,
    completion_context_tokens,
    completion_token_ids,
    document_chat_token_ids,
)
from kvlab.server.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    KvlabStats,
    PromptTokensDetails,
    Usage,
)
from kvlab.server.state import ServerState
from kvlab.server.worker import Listener, wait_result

router = APIRouter()


def sampling_for(body) -> SamplingConfig:
    seed = body.seed if body.seed is not None else random.SystemRandom().randrange(2**63)
    return SamplingConfig(temperature=body.temperature, top_p=body.top_p, top_k=body.kvlab.top_k, seed=seed)


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state: ServerState = request.app.state.kvlab
    state.check_model(body.model)
    tokenizer, document_id = state.engine.tokenizer, body.kvlab.document_id
    state.check_text_size(sum(len(message.text) for message in body.messages), state.max_context_tokens,
                          "conversation", "messages")
    if document_id is not None:  # 404 now rather than after queueing, also when only memory still holds it
        document_path(state, document_id, "kvlab.document_id")

    def prompt() -> Prompt:
        if document_id is not None:
            return Prompt(document_chat_token_ids(tokenizer, body.messages), document_id)
        return Prompt(chat_token_ids(tokenizer, body.messages))

    return await _respond(state, request, body, prompt, "chat.completion",
                          plan(state.settings, body.kvlab, document_id is not None),
                          lambda ids: chat_context_tokens(tokenizer, body.messages, ids))


@router.post("/v1/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request):
    state: ServerState = request.app.state.kvlab
    state.check_model(body.model)
    if body.kvlab.document_id is not None:
        raise ApiError(400, "kvlab.document_id works with /v1/chat/completions only", param="kvlab.document_id")
    # the prompt validator has already unwrapped a one-string list to the string
    prompt = cast("str | list[int]", body.prompt)
    if isinstance(prompt, str):
        state.check_text_size(len(prompt), state.max_context_tokens, "prompt", "prompt")
    elif state.max_context_tokens and len(prompt) > state.max_context_tokens:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens; this model's maximum context length is "
                            f"{state.max_context_tokens} tokens", param="prompt", code="context_length_exceeded")
    return await _respond(state, request, body, lambda: Prompt(completion_token_ids(state.engine.tokenizer,
                                                                                      prompt)),
                          "text_completion", plan(state.settings, body.kvlab, False),
                          lambda ids: completion_context_tokens(state.engine.tokenizer, prompt, ids))


async def _respond(state: ServerState, request: Request, body, prompt: Callable[[], Prompt], kind: str,
                   compression_plan: Plan, context_tokens: Callable[[list[int]], int]):
    """``context_tokens(ids)``: how many of the prompt's ids come before its question (``prompts.py``)."""
    submitted = time.monotonic()
    options = Options(body.max_new_tokens, sampling_for(body), body.stop_strings, body.kvlab.ignore_eos,
                      route="/v1/chat/completions" if kind == "chat.completion" else "/v1/completions",
                      logprobs=getattr(body, "logprobs", None), echo=getattr(body, "echo", False))
    job = state.submit(lambda job: answer(state, job, prompt(), context_tokens, compression_plan, options,
                                          submitted, run=generate), kind="generation")
    shape = Shape(kind, f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{secrets.token_hex(12)}",
                  int(time.time()), state.model_id, f"fp_{state.fingerprint[:12]}")
    if not body.stream:
        result: Result = await wait_result(job, request.receive)
        return JSONResponse(shape.final(result), headers=_headers(result.prompt_tokens, result.cached_tokens))
    listener = Listener(job, request.receive)
    try:
        while True:
            event, payload = await listener.next()
            if event == "start":
                break
    except BaseException:
        listener.close()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    start = cast(dict, payload)  # the "start" event carries the prompt's token counts
    return StreamingResponse(_stream(listener, shape, include_usage, state.private_roots),
                             media_type="text/event-stream",
                             headers={**_headers(start["prompt_tokens"], start["cached_tokens"]),
                                      "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream(listener: Listener, shape: Shape, include_usage: bool,
                  private_roots: list[str]) -> AsyncIterator[str]:
    """The SSE events of one streamed answer; an error after the first event is sent as an error event, its message
    scrubbed of ``private_roots`` as the error handlers scrub bodies."""
    try:
        if shape.chat:  # OpenAI opens a chat stream with the role; a completion stream starts with text
            yield _sse(shape.chunk(first=True, include_usage=include_usage))
        while True:
            try:
                event, payload = await listener.next()
            except ApiError as error:
                yield _sse(error_body(redact(error.message, private_roots), error.type, error.param, error.code))
                return
            if event == "delta":
                yield _sse(shape.chunk(text=cast(str, payload), include_usage=include_usage))
            elif event == "done":
                result = cast(Result, payload)
                yield _sse(shape.chunk(result=result, include_usage=include_usage))
                if include_usage:
                    yield _sse({**shape.envelope(chunk=True), "choices": [], "usage": _usage(result)})
                yield "data: [DONE]\n\n"
                return
    finally:
        listener.close()


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _headers(prompt_tokens: int, cached_tokens: int) -> dict[str, str]:
    return {"x-kvlab-prompt-tokens": str(prompt_tokens), "x-kvlab-cached-tokens": str(cached_tokens)}


def _usage(result: Result) -> dict:
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                 total_tokens=result.prompt_tokens + result.completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=result.cached_tokens)).model_dump()


def _stats(result: Result) -> dict:
    return KvlabStats(document_id=result.document_id, prefilled_tokens=result.prefilled_tokens,
                      cached_tokens=result.cached_tokens, kv_bytes=result.kv_bytes, kv_bytes_kept=result.kv_bytes,
                      kv_bytes_full_fp16=result.kv_bytes_full_fp16,
                      compression=round(compression(result.kv_bytes_full_fp16, result.kv_bytes), 3),
                      recompressed=result.recompressed, prefill_s=round(result.prefill_s, 6),
                      decode_s=round(result.decode_s, 6),
                      queue_s=round(result.queue_s, 6),
                      **(result.outcome.fields() if isinstance(result, Answered) else {})).model_dump()


class Shape:
    """Builds the OpenAI objects of one response (``chat.completion`` or ``text_completion``) and its chunks."""

    def __init__(self, kind: str, id: str, created: int, model: str, system_fingerprint: str) -> None:
        self.kind, self.id, self.created, self.model, self.fingerprint = kind, id, created, model, system_fingerprint

    @property
    def chat(self) -> bool:
        return self.kind == "chat.completion"

    def envelope(self, chunk: bool = False) -> dict:
        kind = "chat.completion.chunk" if chunk and self.chat else self.kind
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def final(self, result: Result) -> dict:
        usage, stats = Usage.model_validate(_usage(result)), KvlabStats.model_validate(_stats(result))
        if self.chat:
            chat_choice = ChatChoice(message=AssistantMessage(content=result.text), finish_reason=result.finish_reason)
            return ChatCompletion(**self.envelope(), choices=[chat_choice], usage=usage, kvlab=stats).model_dump()
        choice = CompletionChoice.model_validate({"text": result.text, "logprobs": result.logprobs,
                                                  "finish_reason": result.finish_reason})
        return Completion(**self.envelope(), choices=[choice], usage=usage, kvlab=stats).model_dump()

    def chunk(self, *, text: str = "", first: bool = False, result: Result | None = None,
              include_usage: bool = False) -> dict:
        finish = result.finish_reason if result is not None else None
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        data = {**self.envelope(chunk=True), "choices": [choice]}
        if include_usage:
            data["usage"] = None
        if result is not None:
            data["kvlab"] = _stats(result)
        return data
