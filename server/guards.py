"""ASGI guards in front of every route: refuse new work while draining for shutdown, and refuse
request bodies larger than the limit (413) before they are read into memory."""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send


async def _answer(send: Send, status: int, message: str, code: str, retry_after: int | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                 else "service_unavailable", "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
    if retry_after:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class DrainMiddleware:
    """While the server drains for a shutdown, new requests get 503 (in-flight ones go on)."""

    def __init__(self, app: ASGIApp, services):
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self.services.draining and scope["path"] != "/health":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1012, "reason": "server is restarting"})
                return
            await _answer(send, 503, "The server is shutting down; retry on another instance or in a moment.",
                          "shutting_down", retry_after=5)
            return
        await self.app(scope, receive, send)


UPLOAD_PATHS = re.compile(r"^(/gradio_api/upload|/v1/sessions/[^/]+/files)$")


class BodyLimitMiddleware:
    """Bodies over the limit get 413, whether they announce their length or not: `upload_bytes`
    for file uploads, `max_bytes` for everything else (JSON requests, the UI's events).

    Any answer given before the whole body arrived (this 413, or the app's own early answer, such
    as Gradio's 413 for a file over --max-upload-mb) carries `Connection: close`, so the server
    closes the connection once it is sent instead of reading, and dropping, the rest of the body:
    a 500 MB chunked upload is cut off at the limit, not read to its end."""

    def __init__(self, app: ASGIApp, max_bytes: int, upload_bytes: int):
        self.app = app
        self.json_bytes = max_bytes
        self.upload_bytes = upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = UPLOAD_PATHS.match(scope["path"]) is not None
        limit = self.upload_bytes if upload else self.json_bytes
        too_large = (f"the request body is larger than the {limit / 1e6:g} MB limit "
                     f"({'--max-upload-mb, plus 1 MB for the form' if upload else '--max-request-mb'})")
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _answer(send, 413, too_large, "body_too_large")
            return
        seen = 0
        has_body = b"transfer-encoding" in headers or (declared is not None and declared not in (b"", b"0"))
        state = {"app_started": False, "refused": False, "body_done": not has_body}

        async def limited() -> Message:
            nonlocal seen
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                state["body_done"] = not message.get("more_body", False)
                if seen > limit:
                    state["refused"] = True
                    if not state["app_started"]:
                        await _answer(send, 413, too_large, "body_too_large")
                    return {"type": "http.disconnect"}  # the app stops reading; what it says is dropped
            return message

        async def guarded_send(message: Message) -> None:
            if state["refused"]:
                return
            if message["type"] == "http.response.start":
                state["app_started"] = True
                if not state["body_done"]:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, limited, guarded_send)
        except Exception:
            if not state["refused"]:
                raise
