"""The ASGI app: ``create_app(settings, engine=None)`` loads the model once (unless given an Engine) and serves

- ``GET /v1/models``, ``GET /v1/models/{id}``
- ``POST /v1/chat/completions``, ``POST /v1/completions`` (``completions.py``)
- ``POST /v1/documents``, ``GET /v1/documents``, ``GET|DELETE /v1/documents/{id}`` (``documents.py``)
- ``GET /health`` and ``GET /metrics`` (Prometheus text)

Plain ASGI middlewares (no BaseHTTPMiddleware, which would hide client disconnects from streaming responses)
count requests by route and status, check the Host header and the API key (``guard.py``), and refuse bodies over
``settings.max_body_bytes``, or over what a text within the route's token limit can take, with 413.
"""

from __future__ import annotations

import contextlib
import time

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import PlainTextResponse

from kvlab.engine import Engine
from kvlab.server import completions, documents
from kvlab.server.errors import ApiError, install_error_handlers, send_error
from kvlab.server.guard import Guard
from kvlab.server.metrics import CONTENT_TYPE
from kvlab.server.schemas import ModelCard, ModelList, request_field_names
from kvlab.server.settings import MAX_CHARS_PER_TOKEN, Settings
from kvlab.server.state import ServerState, build_state


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or Settings()
    state = build_state(settings, engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.worker.start()
        try:
            yield
        finally:
            state.worker.stop()

    app = FastAPI(title="kvlab", summary="OpenAI-compatible server with compressed document caches",
                  lifespan=lifespan)
    app.state.kvlab = state
    install_error_handlers(app, request_field_names(), state.private_roots)
    app.include_router(completions.router)
    app.include_router(documents.router)
    app.add_api_route("/v1/models", list_models, methods=["GET"], response_model=ModelList)
    app.add_api_route("/v1/models/{model_id:path}", get_model, methods=["GET"], response_model=ModelCard)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"], response_class=PlainTextResponse)
    app.add_middleware(LimitBody, max_bytes=settings.max_body_bytes, route_limits=text_body_limits(state))
    app.add_middleware(Guard, settings=settings)  # before reading any body
    app.add_middleware(CountRequests, state=state)  # added last: outermost, so it counts 413s too
    return app


def _card(state: ServerState) -> ModelCard:
    return ModelCard(id=state.model_id, created=int(state.started_at), max_context_tokens=state.max_context_tokens)


def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(request.app.state.kvlab)])


def get_model(model_id: str, request: Request) -> ModelCard:
    state: ServerState = request.app.state.kvlab
    state.check_model(model_id)
    return _card(state)


def health(request: Request) -> dict:
    state: ServerState = request.app.state.kvlab
    return {"status": "ok", "model": state.model_id, "queue_waiting": state.worker.waiting,
            "running": state.worker.busy, "uptime_s": round(time.time() - state.started_at, 3)}


def metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse(request.app.state.kvlab.metrics.render(), media_type=CONTENT_TYPE)


# A JSON string spends at most 6 bytes on one character (its \uXXXX escape); the rest of a request (roles, sampling
# fields, a message list's punctuation) fits in the slack.
JSON_BYTES_PER_CHAR = 6
BODY_SLACK_BYTES = 1024 * 1024
CLOSE = {"Connection": "close"}


def text_body_limits(state: ServerState) -> dict[str, tuple[int, int]]:
    """Per route, ``(bytes, tokens)``: the largest body that could carry a text within the route's token limit
    (``MAX_CHARS_PER_TOKEN`` characters per token, as ``check_text_size`` allows). A 14 MB prompt to a model with an
    8K window is refused from its Content-Length, before a byte of it is read or parsed."""
    def limit(tokens: int) -> tuple[int, int]:
        return tokens * MAX_CHARS_PER_TOKEN * JSON_BYTES_PER_CHAR + BODY_SLACK_BYTES, tokens

    limits = {}
    if state.max_context_tokens:
        limits["/v1/chat/completions"] = limits["/v1/completions"] = limit(state.max_context_tokens)
    if state.max_document_tokens:
        limits["/v1/documents"] = limit(state.max_document_tokens)
    return limits


class LimitBody:
    """413 for a body over its route's limit (``route_limits``: path → (bytes, tokens)) or over ``max_bytes``: at
    once from Content-Length, else when the streamed body passes it."""

    def __init__(self, app, max_bytes: int, route_limits: dict[str, tuple[int, int]] | None = None) -> None:
        self.app, self.max_bytes, self.route_limits = app, max_bytes, route_limits or {}

    def _limit(self, path: str) -> tuple[int, str]:
        limit, tokens = self.route_limits.get(path, (self.max_bytes, 0))
        if tokens and limit < self.max_bytes:
            return limit, (f"the request body is larger than {limit} bytes, more than a text of {tokens} tokens (this "
                           f"route's limit) can take; send a shorter document or prompt")
        return self.max_bytes, (f"the request body is larger than the server's limit of {self.max_bytes} bytes; send "
                                f"a shorter document or prompt")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, message = self._limit(scope["path"])
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            # Connection: close: the server hangs up instead of reading (and discarding) the rest of the body
            return await send_error(send, ApiError(413, message, code="request_too_large", headers=CLOSE))
        received = 0

        async def limited_receive():
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > limit:
                    raise HTTPException(413, message, headers=CLOSE)
            return event

        return await self.app(scope, limited_receive, send)


class CountRequests:
    """``kvlab_requests_total{route, status}``; the route is the path template, so ids do not make new series. A
    client that went away before the whole answer was sent counts as status 499 (nginx's "client closed request"),
    whatever the app answered to the closed connection (a body cut short reads as 400, a cancelled job as 503)."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, answered, gone = 500, False, False

        async def watching_receive():
            nonlocal gone
            event = await receive()
            if event["type"] == "http.disconnect" and not answered:
                gone = True
            return event

        async def recording_send(event):
            nonlocal status, answered
            if event["type"] == "http.response.start":
                status = event["status"]
            elif event["type"] == "http.response.body" and not event.get("more_body", False):
                answered = True
            await send(event)

        try:
            await self.app(scope, watching_receive, recording_send)
        finally:
            status = 499 if gone else status
            route = scope.get("route")
            path = getattr(route, "path", None) or "other"
            self.state.metrics.inc("kvlab_requests_total", route=path, status=str(status))
