"""``/v1/documents``: post a text to prefill, compress and persist it; list, read and delete stored documents.

Posting a text already stored with the same policy answers 200 with the stored document (201 when it is new). The
store writes atomically, so a document is listed only once its file is complete, and it is still there after a
restart. Listings show this model's documents; reading one reads its file's header only (never the cache), and
deleting one is allowed for the documents this server created (``library.delete``).

A blocking POST answers when the document is stored, within the server's request timeout (``--timeout``, 300 s by
default; then 504), and is cancelled if the client disconnects first: a client must wait longer than the prefill
takes (set its own timeout above it). With ``"background": true`` the POST answers 202 at once with an upload to poll
(``uploads.py``), and the prefill goes on whether or not the client stays.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from kvlab.server import library
from kvlab.server.errors import ApiError
from kvlab.server.library import create, describe, document_meta, kept_tokens
from kvlab.server.schemas import DeletedDocument, Document, DocumentList, DocumentRequest, DocumentUpload
from kvlab.server.state import ServerState
from kvlab.server.uploads import MAX_FINISHED_UPLOADS
from kvlab.server.worker import wait_result

router = APIRouter()


@router.post("/v1/documents", response_model=Document, status_code=201)
async def post_document(body: DocumentRequest, request: Request):
    state: ServerState = request.app.state.kvlab
    if body.model is not None:
        state.check_model(body.model)
    state.check_text_size(len(body.text), state.max_document_tokens, "document", "text")
    if body.background:
        return _upload_in_background(state, body)
    job = state.submit(lambda job: create(state, body, job.check, job.pause), kind="document")
    document, created = await wait_result(job, request.receive)
    return JSONResponse(document.model_dump(), status_code=201 if created else 200)


def _upload_in_background(state: ServerState, body: DocumentRequest) -> JSONResponse:
    """202 with the upload to poll; the job runs whether or not the client stays (``uploads.py``)."""
    upload = state.uploads.new()

    def run(job):
        state.uploads.started(upload)
        return create(state, body, job.check, job.pause)

    try:
        job = state.submit(run, kind="document")
    except BaseException:
        state.uploads.forget(upload)
        raise
    state.uploads.follow(upload, job, state.private_roots)
    return JSONResponse(upload.describe().model_dump(), status_code=202, headers={"Location": upload.status_url})


@router.get("/v1/documents/uploads/{upload_id}", response_model=DocumentUpload)
def get_upload(upload_id: str, request: Request):
    upload = request.app.state.kvlab.uploads.get(upload_id)
    if upload is None:
        raise ApiError(404, f"no upload with id {upload_id!r}; POST /v1/documents with \"background\": true starts "
                            f"one (finished uploads are kept for the newest {MAX_FINISHED_UPLOADS}, and not across a "
                            f"restart: GET /v1/documents lists the stored documents)", param="upload_id",
                       code="upload_not_found")
    return upload.describe()


@router.get("/v1/documents", response_model=DocumentList)
def list_documents(request: Request):
    state: ServerState = request.app.state.kvlab
    documents = [describe(entry.key, entry.meta, entry.size_bytes) for entry in state.store.list()
                 if entry.meta is not None and entry.meta.model_fingerprint == state.fingerprint
                 and not entry.meta.query_aware]
    return DocumentList(data=documents)


@router.get("/v1/documents/{document_id}", response_model=Document)
def get_document(document_id: str, request: Request):
    state: ServerState = request.app.state.kvlab
    meta, file_bytes = document_meta(state, document_id)
    return describe(document_id, meta, file_bytes, kept_tokens=kept_tokens(state, document_id, meta))


@router.delete("/v1/documents/{document_id}", response_model=DeletedDocument)
def delete_document(document_id: str, request: Request):
    library.delete(request.app.state.kvlab, document_id)
    return DeletedDocument(id=document_id)
