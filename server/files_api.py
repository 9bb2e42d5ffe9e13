"""REST routes for a session's files: upload (answers at once; parsing runs in the background),
list, inspect (status and progress), remove. Owner: the session's user (see sessions_api)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Request, UploadFile
from fastapi.concurrency import run_in_threadpool

from llm_pool.errors import PayloadTooLargeError
from service.identity import Caller

from .auth import user_caller
from .context import services_of

router = APIRouter(tags=["files"])
User = Depends(user_caller)


@router.post("/v1/sessions/{session_id}/files", status_code=202,
             summary="Upload a pdf, docx, text or code file (multipart field 'file')")
async def upload(session_id: str, request: Request, caller: Caller = User,
                 file: UploadFile = File(description="The file")) -> dict:
    documents = services_of(request).documents
    limit = documents.max_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLargeError(f"the file is larger than the {limit / 1e6:.0f} MB limit", param="file")
    return await run_in_threadpool(documents.add, caller.user, session_id, file.filename or "upload", data)


@router.get("/v1/sessions/{session_id}/files", summary="The session's files and their status")
def list_files(session_id: str, request: Request, caller: Caller = User) -> dict:
    return {"object": "list", "data": services_of(request).documents.list(caller.user, session_id)}


@router.get("/v1/sessions/{session_id}/files/{file_id}", summary="One file: status, progress, reason")
def get_file(session_id: str, file_id: str, request: Request, caller: Caller = User) -> dict:
    return services_of(request).documents.get(caller.user, session_id, file_id)


@router.delete("/v1/sessions/{session_id}/files/{file_id}", summary="Remove a file and its passages")
def remove_file(session_id: str, file_id: str, request: Request, caller: Caller = User) -> dict:
    record = services_of(request).documents.remove(caller.user, session_id, file_id)
    return {**record, "deleted": True}
