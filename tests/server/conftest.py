"""Real servers on loopback: uvicorn runs the app in a background thread on a free port; the tiny model is shared
(one Engine per session; apps never share per-call state, so no lock is needed)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import httpx
import pytest

from kvlab.engine import Engine
from kvlab.server import Settings, create_app
from kvlab.server.background import serve_in_background
from kvlab.server.metrics import parse

MODEL = "tiny-llama"


@dataclass
class Running:
    app: object
    url: str

    @property
    def state(self):
        return self.app.state.kvlab

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 30), **kwargs)

    def openai(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=30, **kwargs)

    def metrics(self) -> dict[str, float]:
        return parse(httpx.get(f"{self.url}/metrics").text)

    def wait_idle(self, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while self.state.worker.busy or self.state.worker.waiting:
            assert time.monotonic() < deadline, "the worker did not become idle"
            time.sleep(0.01)


@contextlib.contextmanager
def serve(app):
    with serve_in_background(app) as url:
        yield Running(app, url)


@pytest.fixture(scope="session")
def tiny_engine(tiny_llama):
    return Engine(tiny_llama)


@pytest.fixture(scope="session")
def start(tiny_engine, tmp_path_factory):
    """``with start(**settings) as running:`` a server on the tiny model (its own store unless one is given)."""

    @contextlib.contextmanager
    def starter(engine=None, **fields):
        fields.setdefault("store_root", tmp_path_factory.mktemp("store"))
        app = create_app(Settings(model=MODEL, **fields), engine or tiny_engine)
        with serve(app) as running:
            yield running

    return starter


@pytest.fixture(scope="module")
def server(start):
    with start() as running:
        yield running
