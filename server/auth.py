"""The caller of every request, decided once (by `service.identity`) and checked where it matters.

`IdentityMiddleware` puts a `Caller` on every HTTP request and WebSocket. When API keys are set,
it refuses what carries no valid key, except the open paths (exactly `/health`, `/health/ready`,
`/login`) and `/v1/ws` (the socket may send its key in its first
message). Keys come in `Authorization: Bearer <key>`, `x-api-key: <key>`, or the signed cookie the
login page sets (it names the key's owner and never holds the key). CORS preflights are answered
by the CORS middleware outside this one. Keys in the URL are not
accepted: URLs end up in access logs. Routes state who may call them with the dependencies
`user_caller` (a user with stored data) and `admin_caller` (changes to the model pool).
"""

from __future__ import annotations

import html
import json
from urllib.parse import parse_qs

from fastapi import Request
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from llm_pool.errors import AuthenticationError, PermissionDeniedError
from service.identity import Caller, Identity

COOKIE = "shoal_session"
OPEN_PATHS = frozenset({"/health", "/health/ready", "/login"})
SOCKET_PATHS = frozenset({"/v1/ws"})  # sockets that authenticate in their first message


def key_from(headers) -> str | None:
    """The key a request carries in its headers (`Authorization: Bearer` or `x-api-key`)."""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return headers.get("x-api-key") or None


def peer_of(conn: HTTPConnection) -> str | None:
    return conn.client.host if conn.client else None


def identify(conn: HTTPConnection, identity: Identity) -> Caller:
    return identity.caller(key=key_from(conn.headers), cookie=conn.cookies.get(COOKIE), host=peer_of(conn))


def caller_of(conn: HTTPConnection) -> Caller:
    state = conn.scope.setdefault("state", {})
    if "caller" not in state:
        state["caller"] = identify(conn, conn.app.state.services.identity)
    return state["caller"]


def user_caller(request: Request) -> Caller:
    """Dependency: a caller with stored sessions and files (401 for anonymous callers)."""
    caller = caller_of(request)
    if caller.user is None:
        raise AuthenticationError(request.app.state.services.identity.user_refusal(), code="api_key_required")
    return caller


def admin_caller(request: Request) -> Caller:
    """Dependency: a caller who may change the model pool (403 otherwise)."""
    caller = caller_of(request)
    if not caller.admin:
        raise PermissionDeniedError(request.app.state.services.identity.admin_refusal(), code="admin_required")
    return caller


class IdentityMiddleware:
    def __init__(self, app: ASGIApp, identity: Identity):
        self.app = app
        self.identity = identity

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        caller = identify(conn, self.identity)
        scope.setdefault("state", {})["caller"] = caller
        if not self.identity.keys_required or caller.how == "key":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if scope["type"] == "websocket":
            if path in SOCKET_PATHS:
                await self.app(scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": 4401, "reason": "an API key is required"})
            return
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        accepts_html = "text/html" in conn.headers.get("accept", "")
        if scope["method"] == "GET" and accepts_html and path in ("/", ""):
            await _redirect(send, "/login")
            return
        in_url = "api_key" in conn.query_params
        await _unauthorized(send, in_url)


async def _unauthorized(send: Send, key_in_url: bool) -> None:
    message = "An API key is required: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'."
    if key_in_url:
        message += " Keys in the URL are not accepted (URLs are written to logs)."
    body = json.dumps({"error": {"message": message, "type": "authentication_error", "param": None,
                                 "code": "invalid_api_key"}}).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
    await send({"type": "http.response.body", "body": body})


async def _redirect(send: Send, location: str) -> None:
    await send({"type": "http.response.start", "status": 303, "headers": [(b"location", location.encode())]})
    await send({"type": "http.response.body", "body": b""})


LOGIN_PAGE = """<!doctype html><html><head><meta name="viewport" content="width=device-width">
<title>Shoal - sign in</title><style>body{{font-family:system-ui;display:grid;place-items:center;
height:100vh;margin:0;background:#f0f9ff}}form{{background:#fff;padding:2rem;border-radius:12px;
box-shadow:0 2px 12px #0002;display:grid;gap:.8rem;min-width:18rem}}input,button{{font-size:1rem;
padding:.6rem}}button{{background:#0e7490;color:#fff;border:0;border-radius:6px}}.err{{color:#b91c1c}}
</style></head><body><form method="post" action="/login"><h2>Shoal</h2>
<label>API key <input type="password" name="api_key" autofocus required></label>
<div class="err">{error}</div><button type="submit">Sign in</button></form></body></html>"""


def login_page(error: str = "") -> str:
    return LOGIN_PAGE.format(error=html.escape(error))


def parse_login_form(body: bytes) -> str:
    return (parse_qs(body.decode(errors="replace")).get("api_key") or [""])[0]
