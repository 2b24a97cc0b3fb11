"""What one server holds: its settings, the one engine (model), the document store, the prefix cache, the metrics
and the worker that runs model work."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvlab.engine import Engine
from kvlab.server.errors import ApiError
from kvlab.server.metrics import Metrics
from kvlab.server.sessions import PrefixCache, PromptBases
from kvlab.server.settings import MAX_CHARS_PER_TOKEN, Settings
from kvlab.server.uploads import Uploads
from kvlab.server.worker import Job, Worker
from kvlab.store.store import CacheStore


@dataclass
class ServerState:
    settings: Settings
    engine: Engine
    store: CacheStore
    sessions: PrefixCache
    metrics: Metrics
    worker: Worker
    started_at: float = field(default_factory=time.time)
    prompt_bases: PromptBases = field(default_factory=PromptBases)  # compressed prompt contexts in ``sessions``
    uploads: Uploads = field(default_factory=Uploads)  # background document uploads

    @property
    def model_id(self) -> str:
        """The id clients send and /v1/models lists: ``--served-model-name``, else the loaded model's name."""
        return self.settings.served_model_name or self.engine.loaded.name

    @property
    def max_context_tokens(self) -> int:
        return self.engine.loaded.max_context_tokens

    @property
    def private_roots(self) -> list[str]:
        """Server folders that error bodies must not show (the store, as given and resolved)."""
        return [str(self.store.root), str(self.store.root.resolve())]

    @property
    def fingerprint(self) -> str:
        return self.engine.loaded.fingerprint

    def check_model(self, model: str) -> None:
        """404 ``model_not_found`` unless ``model`` is the one this server serves."""
        if model != self.model_id:
            raise ApiError(404, f"the model {model!r} does not exist on this server; it serves {self.model_id!r} "
                                f"(GET /v1/models)", param="model", code="model_not_found")


    def submit(self, fn: Callable[[Job], object], kind: str) -> Job:
        """Queue ``fn`` on the worker with the request timeout; a full queue is a 429, counted in
        ``kvlab_rejected_requests_total{kind}`` (``kind``: "generation" or "document")."""
        try:
            return self.worker.submit(fn, self.settings.request_timeout_s, kind=kind)
        except ApiError as error:
            if error.status == 429:
                self.metrics.inc("kvlab_rejected_requests_total", kind=kind)
            raise

    @property
    def max_document_tokens(self) -> int:
        """The longest document a POST may store (tokens); 0: no limit."""
        limits = [limit for limit in (self.settings.max_document_tokens, self.max_context_tokens) if limit]
        return min(limits, default=0)

    def check_text_size(self, chars: int, token_limit: int, what: str, param: str) -> None:
        """400 ``context_length_exceeded`` before tokenizing a text of ``chars`` characters that cannot fit
        ``token_limit`` tokens at ``MAX_CHARS_PER_TOKEN`` characters per token (no check when the limit is 0)."""
        if token_limit and chars > token_limit * MAX_CHARS_PER_TOKEN:
            raise ApiError(400, f"the {what} is {chars} characters; the limit is {token_limit} tokens, and the server "
                                f"refuses texts over {MAX_CHARS_PER_TOKEN} characters per token of it "
                                f"({token_limit * MAX_CHARS_PER_TOKEN} characters) without tokenizing them; shorten "
                                f"it", param=param, code="context_length_exceeded")


def build_state(settings: Settings, engine: Engine | None = None) -> ServerState:
    """Load the model (unless ``engine`` is given) and wire the parts together; the worker is not started yet."""
    if engine is None:
        from kvlab.models import load_model

        engine = Engine(load_model(settings.model, device=settings.device, dtype=settings.dtype,
                                   weights=settings.weights, extension=settings.extension),
                        chunk_tokens=settings.chunk_tokens)
    metrics = Metrics()
    sessions = PrefixCache(settings.session_cache_bytes, settings.session_cache_entries)
    def cancelled(reason: str, kind: str) -> None:
        name = "kvlab_uploads_abandoned_total" if kind == "document" else "kvlab_generations_cancelled_total"
        metrics.inc(name, reason=reason)

    worker = Worker(engine.model, settings.max_queue, on_cancel=cancelled)
    state = ServerState(settings, engine, CacheStore(settings.store_root), sessions, metrics, worker)
    metrics.gauge("kvlab_kv_bytes_held", "KV bytes held by the prefix cache (documents and conversations)",
                  lambda: sessions.kv_bytes)
    metrics.gauge("kvlab_prefix_cache_entries", "cached prefixes in memory", lambda: len(sessions))
    metrics.gauge("kvlab_queue_waiting", "requests waiting for the model", lambda: worker.waiting)
    metrics.gauge("kvlab_queue_running", "requests running on the model (0 or 1)", lambda: int(worker.busy))
    _ = state.fingerprint  # computed once now, not in the first request
    return state
