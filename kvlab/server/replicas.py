"""``kvlab serve --replicas N``: N copies of the server's app behind one OpenAI-compatible endpoint, on Ray Serve.

Three parts, all built here; ray is imported inside functions only, so ``import kvlab.server`` never imports it:

- ``Replica`` (N of them, each with its own model, worker and prefix cache) runs the very app ``create_app`` builds
  and answers each forwarded request by calling that app as ASGI, so the API key, body limits, the 429 queue,
  timeouts and error shapes apply per replica unchanged. It streams the answer back: a head (status, headers and
  ``x-kvlab-replica``, the replica that answered) and then the body's chunks.
- ``Frontend`` (one, the HTTP ingress) forwards method, path, query, headers and body to a replica and relays the
  answer. Cache affinity: a request's key is its document (``kvlab.document_id``, or the id in
  ``/v1/documents/{id}``) or, without one, a hash of the conversation's opening (its messages up to the first user
  message; a completion's prompt start). The frontend remembers which replica last answered each key, and which
  one stored each posted document, and names it in the request; ``affinity.AffinityRouter`` sends it there while
  that replica runs and has room (else to the less loaded of two others). Back-pressure (``max_queued_requests``)
  is a 429 in the server's error shape; a replica that died before a byte reached the client is retried once on
  another, and otherwise answers a clean 503 (an SSE error event when a stream had begun).
- ``Coordinator`` (a small named actor) is what replicas share besides the document store: each replica's last
  metrics text, merged into ``/metrics`` (``metrics.merge``) with a ``kvlab_replicas`` gauge, and the status of
  background uploads, so ``GET /v1/documents/uploads/{id}`` finds an upload whichever replica took it.

The document store is shared through the filesystem (its per-entry locks work between processes and nodes), and a
document request checks the store before it uses an in-memory copy (``library.document_path``), so a document
deleted through one replica is a 404 on every replica, never answered from a stale cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kvlab.errors import KvlabError
from kvlab.server.errors import ApiError, error_body, internal_error
from kvlab.server.schemas import Document
from kvlab.server.settings import Settings
from kvlab.server.uploads import MAX_FINISHED_UPLOADS, Upload, Uploads

log = logging.getLogger("kvlab.server")

RAY_MISSING = "kvlab serve --replicas needs Ray: pip install 'kvlab[ray]'"
APP_NAME = "kvlab"
REPLICA_HEADER = "x-kvlab-replica"
MAX_AFFINITY_KEYS = 4096  # documents and conversations whose replica the frontend remembers (least recent forgotten)
METRICS_PUSH_S = 2.0  # a replica reports its metrics this often, with Serve's health check (and after each request)
LIVE_AFTER_REPORT_S = 10.0  # a replica not heard from for this long is gone: its gauges and running uploads end
ROUTER = "kvlab.server.affinity.AffinityRouter"  # imported by Serve in the frontend's process (it imports ray)
RETRY_ATTEMPTS = 2  # a request whose replica died before anything was sent runs once more
_DOCUMENT_ROUTE = re.compile(r"/v1/documents/([0-9a-f]{64})")


def require_ray() -> None:
    """Raise the one-line KvlabError naming the extra when Ray Serve is not installed."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise KvlabError(RAY_MISSING) from None


@dataclass(frozen=True)
class Forwarded:
    """One HTTP request as the frontend received it (its body read in full)."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None
    prefer: str = ""  # the replica (its Serve id) that holds this request's document or conversation, if any


def affinity_key(method: str, path: str, body: bytes) -> str:
    """The key a request is routed by: its document id, a hash of its conversation's opening, or ""
    (no preference: documents listed or posted, uploads, models, health, metrics)."""
    match = _DOCUMENT_ROUTE.fullmatch(path)
    if match:
        return match.group(1)
    if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
        return ""
    try:
        request = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(request, dict):
        return ""
    options = request.get("kvlab")
    if isinstance(options, dict) and isinstance(options.get("document_id"), str):
        return options["document_id"]
    if path == "/v1/completions":
        opening: Any = request.get("prompt")
        opening = opening[:2000] if isinstance(opening, str) else opening
    else:
        messages = request.get("messages")
        messages = messages if isinstance(messages, list) else []
        users = [index for index, message in enumerate(messages)
                 if isinstance(message, dict) and message.get("role") == "user"]
        opening = messages[:users[0] + 1] if users else messages
    text = json.dumps(opening, sort_keys=True, default=str)
    return "prefix-" + hashlib.sha256(text.encode()).hexdigest()[:24]


class Coordinator:
    """The state replicas share (a Ray actor, one per app): their last metrics and the background uploads.

    Uploads are the records ``DocumentUpload`` describes, plus the replica running them; one whose replica has not
    reported for ``LIVE_AFTER_REPORT_S`` while queued or running reads as failed (its work died with it)."""

    def __init__(self) -> None:
        self.metrics: dict[str, str] = {}  # replica -> its last exposition
        self.seen: dict[str, float] = {}  # replica -> monotonic time of its last report
        self.uploads: OrderedDict[str, dict] = OrderedDict()

    def report(self, replica: str, text: str | None = None) -> None:
        self.seen[replica] = time.monotonic()
        if text is not None:
            self.metrics[replica] = text

    def live(self, replica: str) -> bool:
        return time.monotonic() - self.seen.get(replica, -1e9) < LIVE_AFTER_REPORT_S

    def expositions(self) -> list[tuple[str, bool]]:
        return [(text, self.live(replica)) for replica, text in self.metrics.items()]

    def put_upload(self, replica: str, record: dict) -> None:
        self.report(replica)
        known = self.uploads.get(record["id"])
        if known is not None and known["finished_at"] is not None:
            return  # a late "running" never undoes "done"
        self.uploads[record["id"]] = {**record, "replica": replica}
        finished = [key for key, item in self.uploads.items() if item["finished_at"] is not None]
        for key in finished[:max(0, len(finished) - MAX_FINISHED_UPLOADS)]:
            del self.uploads[key]

    def drop_upload(self, upload_id: str) -> None:
        self.uploads.pop(upload_id, None)

    def get_upload(self, upload_id: str) -> dict | None:
        record = self.uploads.get(upload_id)
        if record is None or record["finished_at"] is not None or self.live(record["replica"]):
            return record
        error = error_body("the replica running this upload stopped before it finished; post the document again",
                           "server_error", code="replica_unavailable")["error"]
        return {**record, "status": "failed", "finished_at": time.time(), "error": error}


class SharedUploads(Uploads):
    """A replica's uploads, published to the coordinator at every change; an upload another replica took is read
    from there. ``flush`` waits until the coordinator has every change so far: the 202 is sent after it, so a poll
    that lands on another replica right away finds the upload."""

    def __init__(self, coordinator, replica: str) -> None:
        super().__init__()
        self.coordinator, self.replica = coordinator, replica
        self._pending: list = []  # ObjectRefs of publications not yet awaited

    def _publish(self, upload: Upload) -> None:
        with self._lock:
            record = upload.describe().model_dump()
        self._pending.append(self.coordinator.put_upload.remote(self.replica, record))

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        await asyncio.gather(*pending)

    def new(self) -> Upload:
        upload = super().new()
        self._publish(upload)
        return upload

    def started(self, upload: Upload) -> None:
        super().started(upload)
        self._publish(upload)

    def _finish(self, upload: Upload, status, **outcome) -> None:
        super()._finish(upload, status, **outcome)
        self._publish(upload)

    def forget(self, upload: Upload) -> None:
        super().forget(upload)
        self.coordinator.drop_upload.remote(upload.id)

    def get(self, upload_id: str) -> Upload | None:
        """Runs in the route's thread pool, so waiting for the coordinator blocks no event loop."""
        import ray

        upload = super().get(upload_id)
        if upload is not None:
            return upload
        record = ray.get(self.coordinator.get_upload.remote(upload_id), timeout=30)
        if record is None:
            return None
        document = Document(**record["document"]) if record["document"] else None
        return Upload(record["id"], record["created_at"], record["status"], record["finished_at"], document,
                      record["created"], record["error"])


async def call_app(app, request: Forwarded) -> AsyncIterator[dict | bytes]:
    """Run ``request`` through the ASGI ``app``: yields ``{"status", "headers"}`` and then the body's chunks. When
    the caller stops early (its client went away), the app hears a disconnect, as under uvicorn, and cancels its job."""
    events: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_given = False
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
             "scheme": "http", "path": request.path, "raw_path": request.path.encode(), "root_path": "",
             "query_string": request.query_string, "headers": request.headers, "client": request.client,
             "server": None}

    async def receive() -> dict:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(scope, receive, events.put)
        except Exception as error:  # the app answered it already (its error handlers send a 500 first)
            await events.put({"type": "kvlab.failed", "error": error})
        finally:
            await events.put(None)

    task = asyncio.get_running_loop().create_task(run())
    started = False
    try:
        while (event := await events.get()) is not None:
            if event["type"] == "http.response.start":
                started = True
                yield {"status": event["status"],
                       "headers": [(name.decode("latin-1"), value.decode("latin-1"))
                                   for name, value in event.get("headers", [])]}
            elif event["type"] == "http.response.body" and event.get("body"):
                yield bytes(event["body"])
            elif event["type"] == "kvlab.failed" and not started:
                raise event["error"]
    finally:
        gone.set()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(task, 30)


class Replica:
    """One model and its app (a Serve deployment with N replicas); see the module docstring."""

    def __init__(self, settings: Settings, coordinator, threads: int) -> None:
        import torch
        from ray import serve

        from kvlab.server.app import create_app

        torch.set_num_threads(max(1, threads))
        self.name = serve.get_replica_context().replica_id.unique_id
        self.coordinator = coordinator
        self.app = create_app(settings)
        self.state = self.app.state.kvlab
        self.uploads = SharedUploads(coordinator, self.name)
        self.state.uploads = self.uploads
        self.state.worker.start()  # what the app's lifespan would do under uvicorn; __del__ stops it
        self._report()

    def __del__(self) -> None:
        self.state.worker.stop()

    def check_health(self) -> None:
        """Serve's health check (every ``METRICS_PUSH_S``) doubles as the heartbeat: the replica reports its metrics,
        so the coordinator knows it is alive even when no request comes."""
        self._report()

    async def forward(self, request: Forwarded) -> AsyncIterator[dict | bytes]:
        if request.method == "GET" and request.path == "/metrics":
            async for part in self._metrics(request):
                yield part
            return
        async for part in call_app(self.app, request):
            if isinstance(part, dict):
                part = {**part, "headers": [*part["headers"], (REPLICA_HEADER, self.name)]}
                await self.uploads.flush()  # a 202's upload is known to every replica before the client hears of it
            yield part
        self._report()

    async def _metrics(self, request: Forwarded) -> AsyncIterator[dict | bytes]:
        """The app answers (so the API key is checked as ever); a 200's body becomes the merged exposition."""
        from prometheus_client.metrics_core import GaugeMetricFamily

        from kvlab.server.metrics import merge

        parts = [part async for part in call_app(self.app, request)]
        head = parts[0] if parts and isinstance(parts[0], dict) else None
        if head is None or head["status"] != 200:
            for part in parts:
                yield part
            return
        await self.coordinator.report.remote(self.name, self.state.metrics.render())
        expositions = await self.coordinator.expositions.remote()
        replicas = GaugeMetricFamily("kvlab_replicas", "replicas that reported their metrics in the last "
                                     f"{LIVE_AFTER_REPORT_S:g} s", value=sum(live for _, live in expositions))
        body = merge(expositions, [replicas]).encode()
        headers = [(name, value) for name, value in head["headers"] if name.lower() != "content-length"]
        yield {"status": 200, "headers": [*headers, ("content-length", str(len(body))), (REPLICA_HEADER, self.name)]}
        yield body

    def _report(self) -> None:
        self.coordinator.report.remote(self.name, self.state.metrics.render())


class Frontend:
    """The HTTP ingress (one Serve replica): relays every request to a ``Replica``; see the module docstring."""

    def __init__(self, replicas) -> None:
        self.replicas = replicas
        self.holders: OrderedDict[str, str] = OrderedDict()  # affinity key -> the replica that last answered it

    async def __call__(self, request):
        body = await request.body()
        client = (request.client.host, request.client.port) if request.client else None
        path = request.scope["path"]
        key = affinity_key(request.method, path, body)
        forwarded = Forwarded(request.method, path, request.scope.get("query_string", b""),
                              list(request.scope["headers"]), body, client, self.holders.get(key, ""))
        response = await relay(self.replicas, forwarded)
        self._learn(forwarded, key, response)
        return response

    def _learn(self, request: Forwarded, key: str, response) -> None:
        """Remember who answered: the conversation's or document's replica, and the replica that stored a posted
        document (its id is in the answer, which a plain response holds in full)."""
        replica = response.headers.get(REPLICA_HEADER)
        if not replica or response.status_code >= 400:
            return
        if request.method == "DELETE" and key:
            self.holders.pop(key, None)
            return
        keys = [key] if key else []
        if request.method == "POST" and request.path == "/v1/documents" and response.status_code in (200, 201):
            with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
                keys.append(str(json.loads(response.body)["id"]))
        for learned in keys:
            self.holders[learned] = replica
            self.holders.move_to_end(learned)
        while len(self.holders) > MAX_AFFINITY_KEYS:
            self.holders.popitem(last=False)


def _dead_replica_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError

    return RayActorError, ActorDiedError, ActorUnavailableError, DeploymentUnavailableError


def unavailable_error() -> ApiError:
    return ApiError(503, "the replica answering this request stopped; retry it (the other replicas are serving)",
                    type="server_error", code="replica_unavailable", headers={"Retry-After": "1"})


def backpressure_error() -> ApiError:
    return ApiError(429, "the server is busy: every replica's queue is full; retry in 1 s", type="rate_limit_error",
                    code="server_busy", headers={"Retry-After": "1"})


async def relay(handle, request: Forwarded):
    """The Starlette response for ``request``: a plain answer is read in full before it is sent (so a replica that
    dies meanwhile is retried, nothing having reached the client); an SSE stream is sent from its first event on."""
    from ray.serve.exceptions import BackPressureError
    from starlette.responses import Response, StreamingResponse

    from kvlab.server.errors import error_response

    dead = _dead_replica_errors()
    for attempt in range(RETRY_ATTEMPTS):
        stream = handle.options(stream=True).forward.remote(request)
        try:
            head, parts, streaming = await _opening(stream)
        except asyncio.CancelledError:  # the client went away while its answer was being made
            stream.cancel()
            raise
        except BackPressureError:
            return error_response(backpressure_error())
        except dead as error:
            log.warning("replica lost during %s %s (attempt %d): %s", request.method, request.path, attempt + 1,
                        type(error).__name__)
            request = dataclasses.replace(request, prefer="")  # the preferred replica may be the one that died
            continue
        except Exception as error:
            return error_response(internal_error(error))
        raw_headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in head["headers"]]
        response: Response
        if streaming:
            response = StreamingResponse(_rest(stream, parts, dead), status_code=head["status"])
        else:
            response = Response(b"".join(parts), status_code=head["status"])
        response.raw_headers = raw_headers
        return response
    return error_response(unavailable_error())


async def _opening(stream) -> tuple[dict, list[bytes], bool]:
    """The head and what can be held back: all of a plain answer, the first event of an SSE stream."""
    head = await stream.__anext__()
    streaming = any(name.lower() == "content-type" and value.startswith("text/event-stream")
                    for name, value in head["headers"])
    parts: list[bytes] = []
    try:
        parts.append(await stream.__anext__())
        if not streaming:
            parts.extend([part async for part in stream])
    except StopAsyncIteration:
        pass
    return head, parts, streaming


async def _rest(stream, parts: list[bytes], dead: tuple[type[BaseException], ...]) -> AsyncIterator[bytes]:
    """An SSE stream's events; a replica lost midway ends it with an error event, as the app ends its own errors."""
    finished = False
    try:
        for part in parts:
            yield part
        try:
            async for part in stream:
                yield part
        except dead:
            error = unavailable_error()
            event = error_body(error.message, error.type, error.param, error.code)
            yield f"data: {json.dumps(event)}\n\n".encode()
        finished = True
    finally:
        if not finished:
            stream.cancel()  # the client went away: the replica's app hears a disconnect and stops generating


def build(settings: Settings, replicas: int, cpus_per_replica: float, gpus_per_replica: float = 0.0,
          log_level: str = "warning"):
    """The Serve application: a coordinator actor, ``replicas`` Replicas and the Frontend. Back-pressure: each
    replica takes its app's queue and the running request plus a few light requests (health, metrics, listings),
    and its app answers 429 past its own queue; past that, the frontend holds up to ``max_queue`` more requests per
    replica, then answers 429 too."""
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    # restarted if it dies (with empty state: metrics start again from each replica's next report)
    coordinator = ray.remote(num_cpus=0, max_restarts=-1)(Coordinator).options(
        name=f"{APP_NAME}-coordinator", namespace="kvlab", get_if_exists=True).remote()
    # ray's pydantic compatibility layer hides the field's type (str or class) from mypy
    router = RequestRouterConfig(request_router_class=ROUTER)  # type: ignore[arg-type]
    actor_options: dict[str, Any] = {"num_cpus": cpus_per_replica}
    if gpus_per_replica:
        actor_options["num_gpus"] = gpus_per_replica
    logging_config = {"log_level": log_level.upper()}  # "info" logs every request, as uvicorn's access log does
    replica = serve.deployment(name="Replica", logging_config=logging_config, num_replicas=replicas,
                               ray_actor_options=actor_options,
                               max_ongoing_requests=settings.max_queue + 4,
                               max_queued_requests=max(1, settings.max_queue) * replicas,
                               health_check_period_s=METRICS_PUSH_S, graceful_shutdown_timeout_s=10,
                               request_router_config=router)(Replica)
    frontend = serve.deployment(name="Frontend", logging_config=logging_config, num_replicas=1,
                                ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)(Frontend)
    return frontend.bind(replica.bind(settings, coordinator, max(1, int(cpus_per_replica))))


def resources_per_replica(replicas: int, device: str | None) -> tuple[float, float]:
    """``(cpus, gpus)`` each replica asks Ray for: the cluster's CPUs split evenly (at least one each), and one GPU
    each (a share when there are fewer GPUs than replicas) unless the device is the CPU or the cluster has none."""
    import ray

    total = ray.cluster_resources()
    cpus = max(1.0, float(total.get("CPU", 1)) // replicas)
    gpus = float(total.get("GPU", 0))
    use_gpus = gpus > 0 and (device is None or device.startswith("cuda"))
    return cpus, (min(1.0, gpus / replicas) if use_gpus else 0.0)


def start(settings: Settings, replicas: int, host: str, port: int, *, address: str | None = None,
          keep_alive_s: int = 5, num_cpus: int | None = None, log_level: str = "warning") -> str:
    """Start (or join, with ``address``) a Ray cluster, run the app on Serve's HTTP proxy at host:port and return
    its URL once every replica has loaded the model. ``num_cpus``: the local cluster's CPUs (default: all).

    The store folder is made absolute here: replicas run in other processes (other working folders, other nodes'
    environments), and all of them must open the same store."""
    import ray
    from ray import serve

    from kvlab.store.store import CacheStore

    require_ray()
    settings = dataclasses.replace(settings, store_root=CacheStore(settings.store_root).root.resolve())
    if address is None:
        ray.init(include_dashboard=False, logging_level=logging.WARNING, num_cpus=num_cpus)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    cpus, gpus = resources_per_replica(replicas, settings.device)
    serve.start(http_options={"host": host, "port": port, "keep_alive_timeout_s": keep_alive_s})
    serve.run(build(settings, replicas, cpus, gpus, log_level), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop(joined: bool = False) -> None:
    """Remove the app: on a cluster that was ``joined``, only this app (other Serve apps there keep running);
    otherwise Serve and the local cluster end with it."""
    import ray
    from ray import serve

    with contextlib.suppress(Exception):
        if joined:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
    ray.shutdown()
