"""Background document uploads: ``POST /v1/documents`` with ``"background": true`` answers 202 at once with an
upload to poll at ``GET /v1/documents/uploads/{id}`` (also in the ``Location`` header).

The job is queued on the worker as a blocking upload is (429 when the queue is full), under the same request timeout
counted from the POST, and it is cancelled by the server's shutdown like any job; but nothing watches the
connection, so the client may close it at once. A task on the server's event loop reads the job's events and
records the outcome: ``queued`` until the worker starts it, ``running``, then ``done`` with the document or
``failed`` with the error body the blocking POST would have answered (504 ``timeout`` past the timeout, 503
``cancelled`` at shutdown).

Uploads are remembered in memory only: a restart forgets them (a finished document stays in the store and GET
/v1/documents lists it). The newest ``MAX_FINISHED_UPLOADS`` finished ones are kept; older ones are forgotten (404).
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from kvlab.server.errors import ApiError, error_body, redact
from kvlab.server.schemas import Document, DocumentUpload, UploadStatus
from kvlab.server.worker import Job, to_api_error

MAX_FINISHED_UPLOADS = 256
STATUS_PATH = "/v1/documents/uploads/{id}"


@dataclass
class Upload:
    id: str
    created_at: float  # seconds since the epoch
    status: UploadStatus = "queued"
    finished_at: float | None = None
    document: Document | None = None
    created: bool | None = None  # the document is new (the blocking POST's 201) rather than found (200)
    error: dict | None = None  # OpenAI's error object: message, type, param, code

    @property
    def status_url(self) -> str:
        return STATUS_PATH.format(id=self.id)

    def describe(self) -> DocumentUpload:
        return DocumentUpload(id=self.id, status=self.status,
                              status_url=self.status_url, created_at=self.created_at, finished_at=self.finished_at,
                              document=self.document, created=self.created, error=self.error)


class Uploads:
    """The uploads of one server, by id; thread-safe (the worker marks them running)."""

    def __init__(self, max_finished: int = MAX_FINISHED_UPLOADS) -> None:
        self.max_finished = max_finished
        self._uploads: OrderedDict[str, Upload] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()  # the followers, referenced until they end
        self._lock = threading.Lock()

    def new(self) -> Upload:
        upload = Upload(f"upload-{secrets.token_hex(12)}", time.time())
        with self._lock:
            self._uploads[upload.id] = upload
        return upload

    def get(self, upload_id: str) -> Upload | None:
        with self._lock:
            return self._uploads.get(upload_id)

    def forget(self, upload: Upload) -> None:
        with self._lock:
            self._uploads.pop(upload.id, None)

    def started(self, upload: Upload) -> None:
        with self._lock:
            upload.status = "running"

    def follow(self, upload: Upload, job: Job, private_roots: Sequence[str]) -> None:
        """Record ``job``'s outcome on ``upload`` from a task on the running event loop."""
        task = asyncio.get_running_loop().create_task(self._follow(upload, job, private_roots))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow(self, upload: Upload, job: Job, private_roots: Sequence[str]) -> None:
        try:
            while True:
                kind, payload = await job.next_event()  # past the deadline: cancels the job, raises the 504
                if kind == "done":
                    document, created = cast("tuple[Document, bool]", payload)
                    self._finish(upload, "done", document=document, created=created)
                    return
                if kind == "error":
                    raise to_api_error(cast(BaseException, payload), job)
        except ApiError as error:
            message = redact(error.message, private_roots)
            self._finish(upload, "failed", error=error_body(message, error.type, error.param, error.code)["error"])
        except asyncio.CancelledError:  # the event loop is shutting down
            job.cancel("shutdown")
            self._finish(upload, "failed", error=error_body("the upload was cancelled (shutdown)", "server_error",
                                                            code="cancelled")["error"])
            raise

    def _finish(self, upload: Upload, status: UploadStatus, **outcome) -> None:
        with self._lock:
            upload.status, upload.finished_at = status, time.time()
            for name, value in outcome.items():
                setattr(upload, name, value)
            finished = [key for key, item in self._uploads.items() if item.finished_at is not None]
            for key in finished[:max(0, len(finished) - self.max_finished)]:
                del self._uploads[key]
