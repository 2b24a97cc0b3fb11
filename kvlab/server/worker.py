"""One model, one worker thread: requests run one at a time, in arrival order, behind a bounded queue.

``Worker.submit(fn)`` queues a ``Job``; the worker thread calls ``fn(job)``. ``fn`` reports progress with
``job.emit(kind, payload)`` (delivered to the request's coroutine through an asyncio queue) and calls ``job.check()``
between prefill chunks and decode steps: that raises ``Cancelled`` once the client has gone (``job.cancel``) or the
request's deadline has passed, so an abandoned generation stops within one step. A full queue raises
``ServerBusy`` (429 with ``Retry-After``) without queueing anything; waiting jobs whose clients have gone are
dropped first, so they never hold a slot a live client could use.

Uploads do not hold up chats: a document job calls ``job.pause()`` between prefill chunks, and there the worker runs
the generation jobs already waiting (chunked-prefill interleaving, done between forward passes on the one thread).
A chat waits for at most one chunk of an upload; the upload's own deadline includes the chats it let through.

There is no per-model lock: the kvlab attention function is registered once and reads its state from each forward
pass's own arguments, so two apps serving the same in-memory model (tests do this) cannot disturb each other.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import cast

from kvlab.server.errors import ApiError, api_error_for

log = logging.getLogger("kvlab.server")


class Cancelled(Exception):
    """The job was cancelled; ``reason`` is ``"disconnect"``, ``"timeout"`` or ``"shutdown"``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def busy_error(retry_after_s: int, max_queue: int) -> ApiError:
    return ApiError(429, f"the server is busy: {max_queue} requests are already waiting for the model; retry in "
                         f"{retry_after_s} s", type="rate_limit_error", code="server_busy",
                    headers={"Retry-After": str(retry_after_s)})


def timeout_error(timeout_s: float) -> ApiError:
    return ApiError(504, f"the request did not finish within the server's {timeout_s:g} s timeout; ask for fewer "
                         f"tokens or retry when the server is less busy", type="timeout_error", code="timeout")


class Job:
    """One request's work. ``deadline`` is on the ``time.monotonic`` clock."""

    def __init__(self, fn: Callable[[Job], object], timeout_s: float,
                 loop: asyncio.AbstractEventLoop | None, kind: str = "generation") -> None:
        self.fn = fn
        self.kind = kind  # "generation" or "document" (an upload): metrics count their cancellations apart
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel_reason: str | None = None
        self.finished = False
        self._loop = loop
        self._cancelled = threading.Event()
        self._yield_to: Callable[[], None] | None = None  # set by the worker for uploads: runs waiting chats

    def emit(self, kind: str, payload: object = None) -> None:
        """Deliver ``(kind, payload)`` to the request's coroutine (callable from any thread)."""
        if self._loop is None:  # submitted outside an event loop: nobody awaits the events
            return
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def cancel(self, reason: str) -> None:
        if not self.finished and not self._cancelled.is_set():
            self.cancel_reason = reason
            self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raise Cancelled if the job was cancelled or is past its deadline (called between model steps)."""
        if not self._cancelled.is_set() and time.monotonic() > self.deadline:
            self.cancel("timeout")
        if self._cancelled.is_set():
            raise Cancelled(self.cancel_reason or "cancelled")

    def pause(self) -> None:
        """A point between prefill chunks where the worker may first run the chats waiting behind this job (uploads
        only), so a long upload delays a chat by at most one chunk; checks for cancellation before and after."""
        self.check()
        if self._yield_to is not None:
            self._yield_to()
            self.check()

    async def next_event(self) -> tuple[str, object]:
        """The next event; past the deadline the job is cancelled and a 504 ApiError raised."""
        remaining = self.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(self.events.get(), timeout=max(remaining, 0.0))
        except TimeoutError:
            self.cancel("timeout")
            raise timeout_error(self.timeout_s) from None


class Worker:
    """Runs submitted jobs one at a time on a daemon thread; at most ``max_queue`` wait behind the running one."""

    def __init__(self, model, max_queue: int,
                 on_cancel: Callable[[str, str], None] = lambda reason, kind: None) -> None:
        self.max_queue = max_queue
        self._on_cancel = on_cancel
        self._waiting: collections.deque[Job] = collections.deque()
        self._condition = threading.Condition()
        self._running: Job | None = None
        self._stopping = False
        self._job_seconds = 1.0  # moving average of job run time, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="kvlab-worker", daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive() and not self._stopping:
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._condition:
            self._stopping = True
            for job in self._waiting:
                job.cancel("shutdown")
            if self._running is not None:
                self._running.cancel("shutdown")
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def submit(self, fn: Callable[[Job], object], timeout_s: float, kind: str = "generation") -> Job:
        """Queue ``fn``; raises the 429 ApiError when ``max_queue`` jobs are already waiting. Called from a
        coroutine, its events go to that coroutine's loop; from a plain thread they are dropped. ``kind`` is
        passed to ``on_cancel`` with the reason when the job is cancelled."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        job = Job(fn, timeout_s, loop, kind)
        with self._condition:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
            self._drop_abandoned()
            if len(self._waiting) >= self.max_queue and (self._running is not None or self._waiting):
                raise busy_error(self.retry_after_s(), self.max_queue)
            self._waiting.append(job)
            self._condition.notify()
        return job

    def _drop_abandoned(self) -> None:
        """Forget waiting jobs that were cancelled (client gone, deadline passed); called with the lock held."""
        for job in self._waiting:
            if not job.cancelled and time.monotonic() > job.deadline:
                job.cancel("timeout")
        abandoned = [job for job in self._waiting if job.cancelled]
        if not abandoned:
            return
        self._waiting = collections.deque(job for job in self._waiting if not job.cancelled)
        for job in abandoned:
            reason = job.cancel_reason or "cancelled"
            job.finished = True
            self._on_cancel(reason, job.kind)
            job.emit("error", Cancelled(reason))

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return self._running is not None

    def retry_after_s(self) -> int:
        """Seconds until a queue slot is likely free: the mean job time times the jobs ahead, at least 1."""
        return max(1, math.ceil(self._job_seconds * (len(self._waiting) + 1)))

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._waiting and not self._stopping:
                    self._condition.wait()
                if not self._waiting:
                    return
                job = self._waiting.popleft()
                self._running = job
            try:
                self._run(job)
            finally:
                with self._condition:
                    self._running = None

    def _run_waiting_generations(self) -> None:
        """Run the generation jobs waiting now, in arrival order, inside the running upload's ``pause()``. Only those
        already waiting: chats that arrive meanwhile wait for the next pause, so the upload still progresses."""
        with self._condition:
            self._drop_abandoned()
            count = sum(job.kind == "generation" for job in self._waiting)
        for _ in range(count):
            with self._condition:
                if self._stopping:
                    return
                job = next((job for job in self._waiting if job.kind == "generation"), None)
                if job is None:
                    return
                self._waiting.remove(job)
            self._run(job)

    def _run(self, job: Job) -> None:
        started = time.monotonic()
        if job.kind == "document":
            job._yield_to = self._run_waiting_generations
        try:
            job.check()  # cancelled or timed out while it waited
            result = job.fn(job)
            job.finished = True
            job.emit("done", result)
        except Cancelled as cancelled:
            self._on_cancel(cancelled.reason, job.kind)
            job.emit("error", cancelled)
        except BaseException as error:  # reported to the request; the worker keeps serving
            job.emit("error", error)
        finally:
            job.finished = True
            self._job_seconds = 0.8 * self._job_seconds + 0.2 * (time.monotonic() - started)


# -- the request side -------------------------------------------------------------------------------------------
def to_api_error(error: BaseException, job: Job) -> ApiError:
    if isinstance(error, Cancelled):
        if error.reason == "timeout":
            return timeout_error(job.timeout_s)
        return ApiError(503, f"the request was cancelled ({error.reason})", type="server_error", code="cancelled")
    return api_error_for(error)


class Listener:
    """Reads a job's events for one request (``receive``: its ASGI receive callable), cancelling the job if the
    client disconnects or the reader stops."""

    def __init__(self, job: Job, receive: Callable) -> None:
        self.job = job
        self._watcher = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.job.cancel("disconnect")
                return
            await asyncio.sleep(0.05)  # a server that answers receive() at once must not make this spin

    async def next(self) -> tuple[str, object]:
        kind, payload = await self.job.next_event()
        if kind == "error":
            raise to_api_error(cast(BaseException, payload), self.job)  # an "error" event carries the exception
        return kind, payload

    def close(self) -> None:
        self._watcher.cancel()
        self.job.cancel("disconnect")  # no-op once the job has finished


async def wait_result(job: Job, receive: Callable):
    """The job's result; ``receive`` is the request's ASGI receive, watched for the client going away."""
    listener = Listener(job, receive)
    try:
        while True:
            kind, payload = await listener.next()
            if kind == "done":
                return payload
    finally:
        listener.close()
