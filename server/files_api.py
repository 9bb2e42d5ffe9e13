"""REST routes for a session's files: upload (answers at once; parsing runs in the background),
list, inspect (status and progress), remove."""

from __future__ import annotations

from fastapi import APIRouter, File, Request, UploadFile

from llm_pool.errors import PayloadTooLargeError

from .context import services_of
from .sessions_api import user_of

router = APIRouter(tags=["files"])


@router.post("/v1/sessions/{session_id}/files", status_code=202,
             summary="Upload a pdf, docx, text or code file (multipart field 'file')")
async def upload(session_id: str, request: Request, file: UploadFile = File(description="The file")) -> dict:
    documents = services_of(request).documents
    limit = documents.max_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLargeError(f"the file is larger than the {limit / 1e6:.0f} MB limit", param="file")
    return documents.add(user_of(request), session_id, file.filename or "upload", data)


@router.get("/v1/sessions/{session_id}/files", summary="The session's files and their status")
async def list_files(session_id: str, request: Request) -> dict:
    return {"object": "list", "data": services_of(request).documents.list(user_of(request), session_id)}


@router.get("/v1/sessions/{session_id}/files/{file_id}", summary="One file: status, progress, reason")
async def get_file(session_id: str, file_id: str, request: Request) -> dict:
    return services_of(request).documents.get(user_of(request), session_id, file_id)


@router.delete("/v1/sessions/{session_id}/files/{file_id}", summary="Remove a file and its passages")
async def remove_file(session_id: str, file_id: str, request: Request) -> dict:
    record = services_of(request).documents.remove(user_of(request), session_id, file_id)
    return {**record, "deleted": True}
