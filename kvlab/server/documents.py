"""``/v1/documents``: post a text to prefill, compress and persist it; list, read and delete stored documents.

Posting a text already stored with the same policy answers 200 with the stored document (201 when it is new). The
store writes atomically, so a document is listed only once its file is complete, and it is still there after a
restart. Listings show this model's documents and leave out what needs the cache loaded (``kept_tokens``); reading
one document loads and verifies its file (and keeps it in memory for the questions that follow).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from kvlab.fileio import fsync_directory
from kvlab.server.library import create, describe, document_path, kept_tokens
from kvlab.server.schemas import DeletedDocument, Document, DocumentList, DocumentRequest
from kvlab.server.state import ServerState
from kvlab.server.worker import wait_result

router = APIRouter()


@router.post("/v1/documents", response_model=Document, status_code=201)
async def post_document(body: DocumentRequest, request: Request):
    state: ServerState = request.app.state.kvlab
    if body.model is not None:
        state.check_model(body.model)
    state.check_text_size(len(body.text), state.max_document_tokens, "document", "text")
    job = state.worker.submit(lambda job: create(state, body), state.settings.request_timeout_s)
    document, created = await wait_result(job, request.receive)
    return JSONResponse(document.model_dump(), status_code=201 if created else 200)


@router.get("/v1/documents", response_model=DocumentList)
def list_documents(request: Request):
    state: ServerState = request.app.state.kvlab
    documents = [describe(entry.key, entry.meta, entry.size_bytes) for entry in state.store.list()
                 if entry.meta is not None and entry.meta.model_fingerprint == state.fingerprint
                 and not entry.meta.query_aware]
    return DocumentList(data=documents)


@router.get("/v1/documents/{document_id}", response_model=Document)
def get_document(document_id: str, request: Request):
    from kvlab.store.format import read_meta

    state: ServerState = request.app.state.kvlab
    path = document_path(state, document_id)
    meta = read_meta(path)
    return describe(document_id, meta, path.stat().st_size,
                    kept_tokens=kept_tokens(state, document_id, meta.context_tokens))


@router.delete("/v1/documents/{document_id}", response_model=DeletedDocument)
def delete_document(document_id: str, request: Request):
    state: ServerState = request.app.state.kvlab
    path = document_path(state, document_id)
    path.unlink(missing_ok=True)
    fsync_directory(path.parent)
    state.sessions.drop_document(document_id)
    return DeletedDocument(id=document_id)
