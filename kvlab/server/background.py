"""Run an app on uvicorn in a background thread (tests, benchmarks, notebooks): ``with serve_in_background(app)
as url: ...``. Port 0 picks a free port; the URL has the real one."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator


@contextlib.contextmanager
def serve_in_background(app, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning",
                        start_timeout_s: float = 30.0, **limits) -> Iterator[str]:
    """``limits``: ``slowclients.uvicorn_config``'s keyword arguments (read timeout, keep-alive, ...)."""
    import uvicorn

    from kvlab.server.slowclients import uvicorn_config

    server = uvicorn.Server(uvicorn_config(app, host, port, log_level=log_level, **limits))
    thread = threading.Thread(target=server.run, name="kvlab-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(10)
