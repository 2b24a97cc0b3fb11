"""Bounds on slow clients, through uvicorn's settings plus one timer uvicorn lacks.

uvicorn closes idle keep-alive connections after ``timeout_keep_alive`` and refuses a header block larger than
``h11_max_incomplete_event_size``, but has no timeout on a request that arrives slowly: a client trickling its
headers or body holds its connection (and its memory) for as long as it likes. ``ReadTimeoutH11`` adds one: from
a connection's first byte (or from accepting it), the whole request (headers and body) must arrive within
``read_timeout_s``, else the connection is closed. The timer stops once the request is complete, so a long
generation is unaffected; it starts again with the next request on the connection. A reverse proxy (nginx's
``client_header_timeout``/``client_body_timeout``) remains the stronger shield for a server exposed to the internet.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

COMPLETE = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)  # the client's side has nothing more to send


class ReadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol with a per-request read timeout (``read_timeout_s``, set by ``with_read_timeout``)."""

    read_timeout_s = 30.0
    _read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in COMPLETE:
            self._disarm()
        elif self._read_timer is None:
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._read_timer = self.loop.call_later(self.read_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _timed_out(self) -> None:
        self._read_timer = None
        if self.conn.their_state not in COMPLETE:
            self.logger.info("closing a connection whose request did not arrive within %g s", self.read_timeout_s)
            self.transport.close()


def with_read_timeout(read_timeout_s: float) -> type[ReadTimeoutH11]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``."""
    return type("ReadTimeoutH11", (ReadTimeoutH11,), {"read_timeout_s": float(read_timeout_s)})


def uvicorn_config(app, host: str, port: int, *, log_level: str = "info", read_timeout_s: float = 30.0,
                   keep_alive_s: int = 5, max_header_bytes: int = 16 * 1024, limit_concurrency: int | None = None):
    """uvicorn settings for kvlab: the read timeout above, idle keep-alive (seconds), the largest header block
    (bytes) and the most open connections (beyond it uvicorn answers 503)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=with_read_timeout(read_timeout_s),
                          timeout_keep_alive=keep_alive_s, h11_max_incomplete_event_size=max_header_bytes,
                          limit_concurrency=limit_concurrency)
