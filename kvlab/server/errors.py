"""OpenAI's error JSON, ``{"error": {"message", "type", "param", "code"}}``, for every failure the server reports.

kvlab's own errors are raised where they happen and translated here, once: a bad parameter is 400, an unknown model
or document 404, a cache file made for another model or damaged 409, a prompt beyond the model's window 400 with
code ``context_length_exceeded``, a body over the size limit 413, a full queue 429 with ``Retry-After``, a request
past its timeout 504, a store that cannot be written 503 (read-only) or 507 (full, or past the server's quota), a
document another process is loading or writing when it is to be deleted 409 ``document_in_use``. Anything else is
500 with a generic message and a request id; the traceback goes to the server's log, never into the body. Bodies
never show the server's paths: the store folder is replaced by ``<store>`` (``redact``), in streamed errors too.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvlab.errors import (
    CacheFileError,
    CacheMismatchError,
    ContextTooLongError,
    KvlabError,
    UnknownModelError,
    UnknownNameError,
    UnknownPolicyError,
)
from kvlab.store.store import EntryInUseError, StoreWriteError

log = logging.getLogger("kvlab.server")
PATH_END = r"[^\s,;:()'\"]*"  # a path ends at a space, punctuation or a quote


def redact(message: str, roots: Sequence[str]) -> str:
    """``message`` with every path under one of ``roots`` (folders on the server) replaced by ``<store>``."""
    for root in sorted({root for root in roots if root}, key=len, reverse=True):
        message = re.sub(re.escape(root) + PATH_END, "<store>", message)
    return message


class ApiError(Exception):
    """An error answered as-is: HTTP ``status`` and OpenAI's ``type``/``param``/``code``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(error.message, error.type, error.param, error.code), status_code=error.status,
                        headers=error.headers)


async def send_error(send, error: ApiError) -> None:
    """Answer ``error`` from a plain ASGI middleware (before any route runs)."""
    body = json.dumps(error_body(error.message, error.type, error.param, error.code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def api_error_for(error: BaseException) -> ApiError:
    """The HTTP answer for a kvlab error (and for the worker's busy/timeout/cancel errors, which are ApiErrors)."""
    if isinstance(error, ApiError):
        return error
    message = str(error)
    if isinstance(error, ContextTooLongError):
        return ApiError(400, message, param="messages", code="context_length_exceeded")
    if isinstance(error, UnknownModelError):
        return ApiError(404, message, param="model", code="model_not_found")
    if isinstance(error, UnknownPolicyError):
        return ApiError(400, message, param="policy", code="unknown_policy")
    if isinstance(error, UnknownNameError):
        return ApiError(404, message, code="not_found")
    if isinstance(error, StoreWriteError):
        if error.reason == "read_only":
            return ApiError(503, message, type="server_error", code="store_read_only")
        if error.reason == "full":
            return ApiError(507, message, type="server_error", code="store_full")
        return internal_error(error)
    if isinstance(error, EntryInUseError):
        return ApiError(409, message, code="document_in_use", headers={"Retry-After": "1"})
    if isinstance(error, CacheMismatchError):
        return ApiError(409, message, code="cache_mismatch")
    if isinstance(error, CacheFileError):
        return ApiError(409, message, code="cache_unusable")
    if isinstance(error, KvlabError):
        return ApiError(400, message, code="invalid_parameter")
    return internal_error(error)


def internal_error(error: BaseException) -> ApiError:
    request_id = secrets.token_hex(6)
    log.error("internal error (request %s)", request_id, exc_info=(type(error), error, error.__traceback__))
    return ApiError(500, f"internal server error (request {request_id}); the server log has the details",
                    type="server_error", code="internal_error")


def validation_error(error: RequestValidationError, known_fields: set[str]) -> ApiError:
    """Malformed JSON is 400; a body that parses but breaks the schema is 422, naming the first bad field."""
    problems = error.errors()
    first: Mapping[str, Any] = problems[0] if problems else {"loc": (), "msg": "invalid request body", "type": ""}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "parse error")
        return ApiError(400, f"the request body is not valid JSON ({detail}); send a JSON object",
                        code="invalid_json")
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") == "model_attributes_type":
        return ApiError(400, "the request body must be a JSON object (Content-Type: application/json)",
                        code="invalid_json")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden" and location:
        message = f"unrecognized request argument {location[-1]!r}" + did_you_mean(location[-1], known_fields)
    elif first.get("type") == "missing":
        message = f"missing required field {param!r}"
    else:
        message = f"{param}: {message}" if param else message
    more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
    return ApiError(422, message + more, param=param, code="invalid_request")


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'X'?"`` for the closest known name other than ``name`` itself, or ``""``. ``name`` may be
    known yet misplaced (``top_k`` is a field of the ``kvlab`` object, not of the request), and echoing it back
    would suggest the very name that was refused."""
    close = difflib.get_close_matches(name, [other for other in known if other != name], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def install_error_handlers(app: FastAPI, known_fields: set[str], private_roots: Sequence[str] = ()) -> None:
    """``private_roots``: server folders (the store) that must not appear in error bodies."""

    def scrubbed(error: ApiError) -> ApiError:
        error.message = redact(error.message, private_roots)
        return error

    async def on_api_error(request: Request, error: ApiError):
        return error_response(scrubbed(error))

    async def on_kvlab_error(request: Request, error: KvlabError):
        return error_response(scrubbed(api_error_for(error)))

    async def on_validation_error(request: Request, error: RequestValidationError):
        return error_response(validation_error(error, known_fields))

    async def on_http_error(request: Request, error: StarletteHTTPException):
        if error.status_code == 404:
            return error_response(ApiError(404, f"no route {request.method} {request.url.path}; see GET /docs",
                                           code="not_found"))
        if error.status_code == 405:
            return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                                           code="method_not_allowed", headers=dict(error.headers or {})))
        if error.status_code == 413:
            return error_response(ApiError(413, str(error.detail), code="request_too_large",
                                           headers=dict(error.headers or {})))
        detail = error.detail if isinstance(error.detail, str) else json.dumps(error.detail)
        return error_response(ApiError(error.status_code, detail, type="invalid_request_error"))

    async def on_unexpected(request: Request, error: Exception):
        return error_response(internal_error(error))

    # starlette types a handler as taking any Exception, not the class it is registered for
    app.add_exception_handler(ApiError, on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(KvlabError, on_kvlab_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_unexpected)
