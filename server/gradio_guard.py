"""The Gradio UI as Shoal mounts it, with a guard in front.

A mounted Gradio app never runs `launch()`, so Gradio's own checks of the files an event names
were off: an event could name any server path (`/proc/self/environ`, the session secret) and
Gradio copied it into its cache, where `/gradio_api/file=` served it. `mount_ui` mounts the Blocks
with what `launch()` would set (`has_launched`: event files must be in Gradio's upload folder;
`blocked_paths`: the data dir and the model folders) and puts `GradioGuard` in front, which:

- answers 404 for each route `gradio_routes.ROUTES` closes, and for any route it does not name;
- on the event routes (queue/join, run/predict, call/v2) reads the JSON body and refuses (403) any
  file object whose path is not an upload of this client (see `gradio_uploads`), then marks the
  files it names as used;
- on `/gradio_api/upload` charges the client's upload budget as the bytes arrive (429), keeps
  the free disk space the data dir keeps (507), and records what was stored and whose it is;
- on `/gradio_api/file=` serves no URL and nothing under the data dir or the model folders, and
  another client's upload is not found;
- deletes expired uploads (and partial files of aborted ones) in the background.

Files Gradio makes for a page (chat exports) go after `OUTPUT_LIFETIME`, and all of them at
shutdown (Gradio's `delete_cache`).

The client is `Caller.rate_key`: a valid key's owner, else the client address.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
from fastapi import FastAPI
from gradio.utils import get_upload_folder
from gradio_client.utils import is_file_obj_with_meta, is_http_url_like
from starlette.requests import HTTPConnection
from starlette.routing import BaseRoute, Match, Mount, get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_pool.errors import (
    InsufficientStorageError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    QuotaExceededError,
    ShoalError,
)

from .auth import caller_of
from .gradio_routes import decide, mounted_routes
from .gradio_uploads import MB, UploadLedger, delete_upload, stray_partials
from .origin import refuse

log = logging.getLogger("shoal.http")
QUEUE_POLL_SECONDS = 0.02  # how often Gradio's queue looks for a waiting UI event
OUTPUT_LIFETIME = 3600  # seconds a file Gradio made for a page (an export) stays downloadable


def mount_ui(app: FastAPI, demo: gr.Blocks, settings, **options) -> GradioGuard:
    """Mount the Blocks at "/" with Gradio's launched-app checks on and the guard in front."""
    folder = Path(get_upload_folder()).resolve()
    protected = protected_paths(settings)
    for path in protected:
        if folder.is_relative_to(path):
            raise ValueError(f"Gradio's upload folder {folder} (GRADIO_TEMP_DIR) is inside {path}, which the UI "
                             "must never serve: set GRADIO_TEMP_DIR to a folder outside the data dir and the "
                             "model folders.")
    folder.mkdir(parents=True, exist_ok=True)
    demo.queue(default_concurrency_limit=None, api_open=False)
    # Gradio's queue polls for work every 1 ms (and for progress every 10 ms) on Linux, even idle:
    # 4.2% of a core here, taken from llama.cpp's threads on a small machine (1.2% at 20 ms, 0.7% at
    # 50 ms, measured idle). 20 ms costs a UI event at most 20 ms before it starts.
    demo._queue.sleep_when_free = max(demo._queue.sleep_when_free, QUEUE_POLL_SECONDS)
    demo._queue.progress_update_sleep_when_free = max(demo._queue.progress_update_sleep_when_free, 0.05)
    # Gradio's own cleanup of the files it made for this app (chat exports, uploads): each goes an
    # hour after it was made (uploads much sooner, see the guard), and all of them at shutdown.
    demo.delete_cache = demo.delete_cache or (600, OUTPUT_LIFETIME)
    gr.mount_gradio_app(app, demo, path="", allowed_paths=[], blocked_paths=[str(p) for p in protected],
                        max_file_size=int(settings.max_upload_mb * MB), run_history=False,
                        enable_monitoring=False, **options)
    demo.has_launched = True  # what launch() sets: Gradio then accepts only its upload folder's files as inputs
    mount = next(r for r in reversed(app.routes) if isinstance(r, Mount) and r.path == "")
    guard = GradioGuard(mount.app, demo=demo, ledger=UploadLedger.from_settings(settings, folder),
                        protected=protected, min_free_bytes=int(getattr(settings, "min_free_disk_mb", 0) * MB),
                        max_upload_mb=settings.max_upload_mb,
                        api_routes=[r for r in app.routes if r is not mount])
    mount.app = guard
    return guard


def protected_paths(settings) -> list[Path]:
    """Folders no Gradio route may read or serve: the data dir (sessions, files, the session
    secret, the registry of remote keys) and where model weights live."""
    paths = [settings.data_dir, settings.models_dir, *(settings.model_roots or [])]
    unique: list[Path] = []
    for path in paths:
        resolved = Path(path).resolve()
        if resolved not in unique:
            unique.append(resolved)
    return unique


def discard(path: str | Path) -> None:
    """For the UI handlers, once they have read an uploaded file: delete it from Gradio's folder."""
    delete_upload(str(path), Path(get_upload_folder()).resolve())


class GradioGuard:
    def __init__(self, app: ASGIApp, *, demo: gr.Blocks, ledger: UploadLedger, protected: list[Path],
                 min_free_bytes: int, max_upload_mb: float, api_routes: list[BaseRoute] = ()):
        self.app = app
        self.api_routes = list(api_routes)  # the API's own routes: a wrong method on one is a 405
        self.demo = demo
        self.ledger = ledger
        self.protected = protected
        self.min_free_bytes = min_free_bytes
        self.max_upload_mb = max_upload_mb
        self.routes = mounted_routes(app)
        self.sweep_every = min(30.0, max(0.5, ledger.ttl / 4))
        self._sweeper: asyncio.Task | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self._start_sweeper()
        path = get_route_path(scope)
        decision = decide(self.routes, scope["method"], path)
        if decision.closed:
            await refuse(scope, send, self._unserved(scope["method"], path))
            return
        client = caller_of(HTTPConnection(scope)).rate_key
        try:
            if decision.checked == "upload":
                await self._upload(scope, receive, send, client)
                return
            if decision.checked == "events":
                receive = await self._check_event(receive, client)
            elif decision.checked == "file":
                self._check_file(path.split("=", 1)[1], client)
        except ShoalError as exc:
            await refuse(scope, send, exc)
            return
        await self.app(scope, receive, send)

    def _unserved(self, method: str, path: str) -> ShoalError:
        """Why nothing answers: an API route asked with another method (405, with Allow), an API
        path that does not exist, or a Gradio route the UI does not use (404)."""
        allowed = [m for m in ("GET", "POST", "PUT", "PATCH", "DELETE") if any(
            r.matches({"type": "http", "path": path, "method": m, "root_path": "", "headers": []})[0] == Match.FULL
            for r in self.api_routes)]
        if allowed:
            error = MethodNotAllowedError(f"{method} {path}: this route answers {', '.join(allowed)}",
                                          code="method_not_allowed")
            error.headers = {"Allow": ", ".join(allowed)}
            return error
        if not path.startswith("/gradio_api") and path not in ("/", ""):
            return NotFoundError(f"{method} {path}: no such route (the API's routes are listed at /docs)",
                                 code="not_found")
        return NotFoundError(f"{path} is not served here: Shoal closes the Gradio routes its UI does not use.",
                             code="not_found")

    # ------------------------------------------------------------------ events
    async def _check_event(self, receive: Receive, client: str) -> Receive:
        body, last = await _read_body(receive)
        try:
            data = json.loads(body) if body else None
        except RecursionError:
            raise InvalidRequestError("The event's data is nested too deeply.", code="invalid_body") from None
        except ValueError:
            data = None  # not JSON: Gradio answers it
        paths = list(_file_paths(data))
        for path in paths:
            if not self.ledger.owns(client, path):
                raise PermissionDeniedError(
                    "A file input takes only a file this client uploaded to the web UI (POST /gradio_api/upload) "
                    f"in the last {self.ledger.ttl:g} s (--upload-ttl); {path!r} is not one.",
                    param="data", code="file_not_uploaded")
        for path in paths:
            self.ledger.claim(client, path)
        return _replay(body, last, receive)

    # ------------------------------------------------------------------ file=
    def _check_file(self, target: str, client: str) -> None:
        missing = NotFoundError(f"/gradio_api/file={target} is not served here.", code="not_found")
        if is_http_url_like(target) or "://" in target:
            raise missing  # Gradio would fetch it for the caller
        absolute = Path(os.path.abspath(target))
        real = absolute.resolve()
        if any(p.is_relative_to(root) for root in self.protected for p in (absolute, real)):
            raise missing
        for candidate in {str(absolute), str(real)}:
            if self.ledger.known(candidate) and not self.ledger.owns(client, candidate):
                raise missing

    # ------------------------------------------------------------------ upload
    async def _upload(self, scope: Scope, receive: Receive, send: Send, client: str) -> None:
        declared = _content_length(scope)
        self._check_disk(declared or 0)
        entry = self.ledger.begin(client, declared)
        refused: list[ShoalError] = []

        async def counted() -> Message:
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                try:
                    self.ledger.add_bytes(client, entry, len(message.get("body", b"")))
                except QuotaExceededError as exc:
                    refused.append(exc)
                    return {"type": "http.disconnect"}  # Gradio stops reading; its partial file is swept
            return message

        response = _Captured()
        try:
            await self.app(scope, counted, response.send)
        except Exception:
            if not refused:
                raise
        if refused:
            await refuse(scope, send, refused[0])
            return
        if response.status == 413:
            await refuse(scope, send, PayloadTooLargeError(
                f"A file is larger than the {self.max_upload_mb:g} MB limit (--max-upload-mb).", code="file_too_large"))
            return
        if response.status == 200:
            paths = [p for p in json.loads(response.body) if isinstance(p, str)]
            self.ledger.record(client, paths)
            try:
                self.ledger.add_files(client, entry, len(paths))
            except QuotaExceededError as exc:
                for path in self.ledger.forget(client, paths):
                    delete_upload(path, self.ledger.folder)
                await refuse(scope, send, exc)
                return
        await response.replay(send)

    def _check_disk(self, incoming: int) -> None:
        if not self.min_free_bytes:
            return
        free = shutil.disk_usage(self.ledger.folder).free
        if free - incoming < self.min_free_bytes:
            raise InsufficientStorageError(
                f"The server's disk is nearly full ({free / MB:.0f} MB free; it keeps {self.min_free_bytes / MB:g} MB, "
                "--min-free-disk-mb): the upload was not stored.", code="disk_full")

    # ------------------------------------------------------------------ sweeping
    def _start_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_every)
            try:
                gone = await asyncio.to_thread(self.sweep)
            except Exception:
                log.exception("Deleting expired uploads failed; trying again in %g s", self.sweep_every)
                continue
            self.demo.upload_file_set.difference_update(gone)

    def sweep(self) -> list[str]:
        """Delete expired uploads and abandoned partial ones; returns the deleted uploads' paths."""
        gone = self.ledger.expired()
        for path in gone:
            delete_upload(path, self.ledger.folder)
        for partial in stray_partials(self.ledger.folder, older_than=self.ledger.ttl):
            partial.unlink(missing_ok=True)
        return gone


def _file_paths(data) -> Iterator[str]:
    """The paths of every Gradio file object in a JSON value, as Gradio itself finds them."""
    stack = [data]
    while stack:
        value = stack.pop()
        if is_file_obj_with_meta(value):
            yield value["path"]
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


async def _read_body(receive: Receive) -> tuple[bytes, Message | None]:
    """The whole body (the body limit outside bounds it), and a disconnect if one came instead."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), message
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), None


def _replay(body: bytes, last: Message | None, receive: Receive) -> Receive:
    pending = [{"type": "http.request", "body": body, "more_body": False}] + ([last] if last else [])

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()
    return replayed


def _content_length(scope: Scope) -> int | None:
    value = dict(scope.get("headers") or []).get(b"content-length")
    return int(value) if value is not None and value.isdigit() else None


class _Captured:
    """An upload's answer, held back until the guard has read it (it is a short JSON list)."""

    def __init__(self):
        self.messages: list[Message] = []
        self.status = 0

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        self.messages.append(message)

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")

    async def replay(self, send: Send) -> None:
        for message in self.messages:
            await send(message)
