"""WS /v1/ws: two-way streaming. Several generations per socket, cancel, and steering.

Client -> server (JSON text frames):
  {"type": "auth", "api_key": "..."}                    first, when keys are on (or use a header/query)
  {"type": "generate", "id": "r1", "model": "...",      start a generation; "messages" for chat,
   "messages": [...] | "prompt": "...",                 "prompt" for completion; "params" override the
   "params": {...}, "chunk_size": 1, "stream_delay_ms": 0,   socket's defaults for this request only;
   "cache_salt": "..."}                                 share cached prefixes only with this salt
  {"type": "cancel", "id": "r1"}                        stop that generation now
  {"type": "set_params", "params": {...}}               new defaults for the next generations (steer)
  {"type": "ping"}
Server -> client:
  {"type": "hello", "params": {...}}   {"type": "started", "id", "model"}
  {"type": "token", "id", "text", "tokens"}   (one event per chunk_size tokens)
  {"type": "done", "id", "finish_reason", "text", "usage", "timings"}
  {"type": "error", "id" (if about one request), "error": {"message", "type", "param", "code"}}
  {"type": "params", "params": {...}}   {"type": "pong"}
Closing the socket cancels every generation it started. A text frame that is not a JSON object
gets an error event; a binary frame closes the socket (1003), a frame over the size limit too
(1009, by the WebSocket layer), each with a reason. Wrong keys in the auth message are throttled
like every other key (`auth.KeyThrottle`): past the limit the socket closes with 4429.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from llm_pool import Finished, GenerationParams, GenerationRequest, Message
from llm_pool.errors import AuthenticationError, InvalidParamsError, ShoalError
from llm_pool.stream import Failed

from .auth import KeyThrottle, caller_of, peer_of
from .origin import close_reason
from .protocol import timings, usage_dict
from .streaming import Chunk, chunked

router = APIRouter()
MAX_ACTIVE = 16  # generations one socket may run at once
UNSUPPORTED_DATA = 1003
BINARY_REFUSED = "binary frames are not accepted: send JSON objects as text frames"


class BinaryFrameError(Exception):
    """The client sent a binary frame: this protocol is JSON text."""


def _error(exc: ShoalError, ident: str | None = None) -> dict:
    out = {"type": "error", "error": exc.to_dict()}
    if ident is not None:
        out["id"] = ident
    return out


class _Socket:
    def __init__(self, ws: WebSocket):
        self.ws = ws
        self.services = ws.app.state.services
        self.params = GenerationParams()
        self.tasks: dict[str, asyncio.Task] = {}
        self.send_lock = asyncio.Lock()
        self.caller = caller_of(ws)

    async def send(self, message: dict) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(message, ensure_ascii=False))

    async def receive_text(self) -> str:
        """The next text frame (WebSocketDisconnect when the client is gone; BinaryFrameError)."""
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
        if message.get("text") is None:
            raise BinaryFrameError
        return message["text"]

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):  # the client may be gone already
            await self.ws.close(code=code, reason=close_reason(reason))

    async def end(self, error: ShoalError, code: int) -> None:
        """Say why in an error event and in the close frame's reason, then close."""
        with contextlib.suppress(Exception):  # the client may be gone already
            await self.send(_error(error))
        await self.close(code, error.message)

    async def refuse_binary(self) -> None:
        await self.end(InvalidParamsError(BINARY_REFUSED, param="type"), UNSUPPORTED_DATA)

    async def authenticate(self) -> bool:
        identity = self.services.identity
        if not identity.keys_required or self.caller.how == "key":
            return True
        try:
            first = json.loads(await asyncio.wait_for(self.receive_text(), timeout=10))
        except BinaryFrameError:
            await self.refuse_binary()
            return False
        except WebSocketDisconnect:
            return False
        except (TimeoutError, ValueError, RecursionError):
            first = {}
        key = first.get("api_key") if isinstance(first, dict) and first.get("type") == "auth" else None
        key = key if isinstance(key, str) else None
        throttle: KeyThrottle = self.ws.app.state.key_throttle
        limited = throttle.check(peer_of(self.ws), key) if key is not None else None
        if limited is not None:
            await self.end(limited, 4429)
            return False
        if not identity.key_is_valid(key):
            if key is not None:
                throttle.failed(peer_of(self.ws), key)
            await self.end(AuthenticationError('An API key is required: send {"type": "auth", "api_key": "..."} '
                                               'first.'), 4401)
            return False
        self.caller = identity.caller(key=key, cookie=None, host=peer_of(self.ws))
        return True

    async def handle(self, raw: str) -> None:
        try:
            message = json.loads(raw)
            if not isinstance(message, dict):
                raise ValueError
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
            await self.send(_error(InvalidParamsError("each message must be a JSON object", param="type")))
            return
        kind, ident = message.get("type"), message.get("id")
        if kind == "ping":
            await self.send({"type": "pong"})
        elif kind == "set_params":
            try:
                self.params = self.params.updated(**_params_dict(message.get("params")))
            except ShoalError as exc:
                await self.send(_error(exc))
                return
            await self.send({"type": "params", "params": self.params.to_dict()})
        elif kind == "cancel":
            task = self.tasks.get(str(ident))
            if task is None:
                await self.send(_error(InvalidParamsError(f"no running generation with id {ident!r}",
                                                          param="id"), ident))
            else:
                task.cancel()
        elif kind == "generate":
            await self.start(message)
        else:
            await self.send(_error(InvalidParamsError(
                "type must be generate, cancel, set_params, auth or ping", param="type"), ident))

    async def start(self, message: dict) -> None:
        ident = str(message.get("id") or f"ws-{len(self.tasks) + 1}")
        try:
            if ident in self.tasks:
                raise InvalidParamsError(f"id {ident!r} is already running", param="id")
            if len(self.tasks) >= MAX_ACTIVE:
                raise InvalidParamsError(f"at most {MAX_ACTIVE} generations per socket", param="id")
            request = _request(message, self.params.updated(**_params_dict(message.get("params"))))
            chunk_size = _bounded_int(message.get("chunk_size", 1), "chunk_size", 1, 256)
            delay = _bounded_int(message.get("stream_delay_ms", 0), "stream_delay_ms", 0, 10_000)
            salt = message.get("cache_salt")
            if salt is not None and (not isinstance(salt, str) or len(salt) > 256):
                raise InvalidParamsError("cache_salt must be a string of at most 256 characters",
                                         param="cache_salt")
            handle = await self.services.submit(message.get("model"), request, self.caller.with_cache_salt(salt))
        except ShoalError as exc:
            await self.send(_error(exc, ident))
            return
        self.tasks[ident] = asyncio.create_task(self.stream(ident, handle, chunk_size, delay))

    async def stream(self, ident: str, handle, chunk_size: int, delay: int) -> None:
        try:
            await self.send({"type": "started", "id": ident, "model": handle.model})
            async for item in chunked(handle, chunk_size, delay):
                if isinstance(item, Chunk):
                    await self.send({"type": "token", "id": ident, "text": item.text,
                                     "tokens": len(item.token_ids)})
                elif isinstance(item, Finished):
                    await self.send(_done(ident, item))
                elif isinstance(item, Failed):
                    await self.send(_error(item.error, ident))
        except asyncio.CancelledError:
            handle.cancel()
            final = await asyncio.shield(_final_of(handle))
            with contextlib.suppress(Exception):
                await self.send(_done(ident, final))
        finally:
            self.tasks.pop(ident, None)

    async def cancel_all(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()


async def _final_of(handle) -> Finished:
    while not handle.done:
        await asyncio.sleep(0.01)
    return handle.final


def _done(ident: str, final) -> dict:
    if not isinstance(final, Finished):
        return _error(final.error, ident)
    return {"type": "done", "id": ident, "finish_reason": final.reason, "text": final.text,
            "usage": usage_dict(final), "timings": timings(final)}


def _params_dict(params) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidParamsError("params must be an object", param="params")
    return params


def _bounded_int(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidParamsError(f"{name} must be an integer from {low} to {high}", param=name)
    return value


def _request(message: dict, params: GenerationParams) -> GenerationRequest:
    if "messages" in message:
        items = message["messages"]
        if not isinstance(items, list) or not items:
            raise InvalidParamsError("messages must be a non-empty list", param="messages")
        out = []
        for item in items:
            if not isinstance(item, dict) or item.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(item.get("content"), str):
                raise InvalidParamsError("each message needs a role (system, user, assistant) and "
                                         "string content", param="messages")
            out.append(Message(item["role"], item["content"]))
        return GenerationRequest(params, messages=out)
    prompt = message.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise InvalidParamsError("send 'messages' (chat) or a non-empty 'prompt'", param="prompt")
    return GenerationRequest(params, prompt=prompt)


@router.websocket("/v1/ws")
async def websocket_endpoint(ws: WebSocket) -> None:
    await ws.accept()
    socket = _Socket(ws)
    if not await socket.authenticate():
        return
    await socket.send({"type": "hello", "params": socket.params.to_dict()})
    try:
        while True:
            await socket.handle(await socket.receive_text())
    except WebSocketDisconnect:
        pass
    except BinaryFrameError:
        await socket.refuse_binary()
    finally:
        await socket.cancel_all()
