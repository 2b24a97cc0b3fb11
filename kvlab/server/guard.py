"""Who may talk to the server: a Host-header allow-list (against DNS rebinding: a web page on another domain that
re-points its name at 127.0.0.1 sends its own Host) and an optional API key, checked as OpenAI clients send it
(``Authorization: Bearer KEY``). ``/health`` is always open; ``/metrics`` needs the key unless ``metrics_public``.
A plain ASGI middleware, like the others in ``app.py``."""

from __future__ import annotations

import hmac

from kvlab.server.errors import ApiError, send_error
from kvlab.server.settings import Settings

OPEN_PATHS = ("/health",)


def host_name(header: str) -> str:
    """``'127.0.0.1:8000'`` → ``'127.0.0.1'``; ``'[::1]:8000'`` → ``'::1'``; lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    def __init__(self, app, settings: Settings) -> None:
        self.app = app
        self.hosts = {host_name(host) for host in settings.allowed_hosts}
        self.key = settings.api_key.encode() if settings.api_key else None
        self.open = OPEN_PATHS + (("/metrics",) if settings.metrics_public else ())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        if "*" not in self.hosts and host not in self.hosts:
            return await send_error(send, ApiError(
                400, f"the Host header {host!r} is not one this server answers to; start it with --allowed-hosts "
                     f"naming the host clients use", code="invalid_host"))
        if self.key is not None and scope["path"] not in self.open:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                return await send_error(send, ApiError(
                    401, "missing or incorrect API key: send it as 'Authorization: Bearer KEY' (the openai client's "
                         "api_key)", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        return await self.app(scope, receive, send)
