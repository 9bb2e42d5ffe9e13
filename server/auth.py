"""Optional API keys for every transport, and who the caller is.

When keys are configured, every HTTP route except `/health*` (and the login page) needs one, as
`Authorization: Bearer <key>`, `x-api-key: <key>`, an `api_key` query parameter, or the cookie the
login page sets for browsers. A WebSocket may also send the key in its first message (the socket
handler checks that). Without keys, nothing is checked and callers are told apart by IP.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
from urllib.parse import parse_qs

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

COOKIE = "shoal_key"
OPEN_PATHS = ("/health", "/login")


def key_from(conn: HTTPConnection) -> str | None:
    auth = conn.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return (conn.headers.get("x-api-key") or conn.query_params.get("api_key")
            or conn.cookies.get(COOKIE) or None)


def key_is_valid(key: str | None, keys: list[str]) -> bool:
    if not key:
        return False
    return any(hmac.compare_digest(key.encode(), k.encode()) for k in keys)


def key_owner(key: str) -> str:
    """A stable, non-secret id for the holder of a key."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def client_of(conn: HTTPConnection) -> str:
    """Who to rate-limit: the API key's owner, else the peer's IP address."""
    key = conn.scope.get("state", {}).get("api_key")
    if key:
        return key_owner(key)
    return "ip-" + (conn.client.host if conn.client else "unknown")


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: list[str]):
        self.app = app
        self.keys = list(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.keys:
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        key = key_from(conn)
        if key_is_valid(key, self.keys):
            scope.setdefault("state", {})["api_key"] = key
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path.startswith(OPEN_PATHS) or scope["type"] == "websocket":
            await self.app(scope, receive, send)  # open, or the socket asks in its first message
            return
        accepts_html = "text/html" in conn.headers.get("accept", "")
        if scope["method"] == "GET" and accepts_html and path in ("/", ""):
            await _redirect(send, "/login")
            return
        await _unauthorized(send)


async def _unauthorized(send: Send) -> None:
    body = json.dumps({"error": {"message": "An API key is required: send 'Authorization: Bearer <key>' "
                                            "or 'x-api-key: <key>'.", "type": "authentication_error",
                                 "param": None, "code": "invalid_api_key"}}).encode()
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
