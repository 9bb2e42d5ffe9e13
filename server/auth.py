"""The caller of every request, decided once (by `service.identity`) and checked where it matters.

`IdentityMiddleware` puts a `Caller` on every HTTP request and WebSocket. When API keys are set,
it refuses what carries no valid key, except the open paths (exactly `/health`, `/health/ready`,
`/login`) and `/v1/ws` (the socket may send its key in its first
message). Keys come in `Authorization: Bearer <key>`, `x-api-key: <key>`, or the signed cookie the
login page sets (it names the key's owner and never holds the key). CORS preflights are answered
by the CORS middleware outside this one. Keys in the URL are not
accepted: URLs end up in access logs. Routes state who may call them with the dependencies
`user_caller` (a user with stored data) and `admin_caller` (changes to the model pool).

Guessing keys is slow: `KeyThrottle` counts wrong keys (the sign-in page, key headers where keys
are required, admin routes where admin keys are set, the WebSocket's auth message) per address
and per key prefix; past the limit every key from that address (or with that prefix) is refused
with 429 and `Retry-After` until the window passes, the right key too, so the answer says
nothing about a key's validity.
"""

from __future__ import annotations

import html
import itertools
import json
import math
import threading
import time
from collections import deque
from urllib.parse import parse_qs

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from llm_pool.errors import AuthenticationError, PermissionDeniedError, RateLimitedError
from service.identity import Caller, Identity

from .errors import error_body
from .origin import refuse

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
    """Dependency: a caller who may change the model pool (403 otherwise). Where only admin keys
    are set, wrong keys sent here are throttled (with user keys, the middleware does it)."""
    caller = caller_of(request)
    identity = request.app.state.services.identity
    key = key_from(request.headers)
    if key is not None and identity.admin_keys_on and not identity.keys_required:
        throttle: KeyThrottle = request.app.state.key_throttle
        limited = throttle.check(peer_of(request), key)
        if limited is not None:
            raise limited
        if not identity.key_is_valid(key):
            throttle.failed(peer_of(request), key)
    if not caller.admin:
        raise PermissionDeniedError(identity.admin_refusal(), code="admin_required")
    return caller


class KeyThrottle:
    """Wrong keys per address and per key prefix (its first 8 characters) over a sliding window.
    Refused attempts are not counted: a lock ends one window after the failures that set it."""

    PREFIX = 8

    def __init__(self, per_address: int, per_prefix: int, window: float, clock=time.monotonic,
                 max_entries: int = 20_000):
        self.per_address, self.per_prefix, self.window = per_address, per_prefix, window
        self._clock = clock
        self._max_entries = max_entries
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings) -> KeyThrottle:
        return cls(settings.max_login_failures, settings.max_login_failures_per_prefix, settings.login_window)

    def check(self, address: str | None, key: str) -> RateLimitedError | None:
        """The refusal for a key sent now from this address, or None when it may be checked."""
        now = self._clock()
        with self._lock:
            by_address = self._wait(f"ip:{address}", self.per_address, now)
            by_prefix = self._wait(f"prefix:{key[:self.PREFIX]}", self.per_prefix, now)
        if by_address:
            error = RateLimitedError(
                f"Too many wrong keys from your address ({self.per_address} in {self.window:g} s, the limit "
                f"--max-login-failures): every key from it is refused for {math.ceil(by_address)} s more.", by_address)
        elif by_prefix:
            error = RateLimitedError(
                f"Too many wrong keys starting like this one ({self.per_prefix} in {self.window:g} s, the limit "
                f"--max-login-failures-per-prefix): keys with this prefix are refused for "
                f"{math.ceil(by_prefix)} s more.", by_prefix)
        else:
            return None
        error.code = "too_many_failed_keys"
        return error

    def failed(self, address: str | None, key: str) -> None:
        now = self._clock()
        with self._lock:
            if len(self._failures) >= self._max_entries:
                self._forget_oldest()
            for name, limit in ((f"ip:{address}", self.per_address), (f"prefix:{key[:self.PREFIX]}", self.per_prefix)):
                if limit:
                    self._failures.setdefault(name, deque(maxlen=limit)).append(now)

    def _wait(self, name: str, limit: int, now: float) -> float:
        times = self._failures.get(name)
        if not limit or times is None:
            return 0.0
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) < limit:
            return 0.0
        return max(0.001, times[-limit] + self.window - now)

    def _forget_oldest(self) -> None:
        """Full (many addresses or prefixes at once): forget the tenth first seen, in one go."""
        for name in list(itertools.islice(self._failures, max(1, self._max_entries // 10))):
            del self._failures[name]


class IdentityMiddleware:
    def __init__(self, app: ASGIApp, identity: Identity, throttle: KeyThrottle):
        self.app = app
        self.identity = identity
        self.throttle = throttle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        key = key_from(conn.headers)
        if key is not None and self.identity.keys_required:
            limited = self.throttle.check(peer_of(conn), key)
            if limited is not None:
                await refuse(scope, send, limited)
                return
            if not self.identity.key_is_valid(key):
                self.throttle.failed(peer_of(conn), key)
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
        await _unauthorized(send, in_url, path)


async def _unauthorized(send: Send, key_in_url: bool, path: str = "") -> None:
    message = "An API key is required: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'."
    if key_in_url:
        message += " Keys in the URL are not accepted (URLs are written to logs)."
    body = json.dumps(error_body(message, "authentication_error", None, "invalid_api_key", path, 401)).encode()
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


async def login(request: Request) -> Response:
    """POST /login: a valid key from the sign-in form becomes the signed cookie. Wrong keys are
    throttled; cross-site posts never get here (`origin.SameSiteMiddleware`)."""
    identity: Identity = request.app.state.services.identity
    throttle: KeyThrottle = request.app.state.key_throttle
    key = parse_login_form(await request.body())
    limited = throttle.check(peer_of(request), key)
    if limited is not None:
        return _login_refusal(request, limited)
    if not identity.key_is_valid(key):
        throttle.failed(peer_of(request), key)
        return HTMLResponse(login_page("That key is not valid."), status_code=401)
    response = RedirectResponse("/", status_code=303)
    # SameSite=Lax: the cookie is not sent on other sites' posts; Strict would also drop it when a
    # link on another site opens Shoal, landing signed-in users on this page.
    response.set_cookie(COOKIE, identity.login_cookie(key), httponly=True, samesite="lax",
                        secure=request.url.scheme == "https", max_age=30 * 24 * 3600)
    return response


def _login_refusal(request: Request, error: RateLimitedError) -> Response:
    headers = {"Retry-After": str(max(1, round(error.retry_after)))}
    if "text/html" in request.headers.get("accept", ""):
        return HTMLResponse(login_page(error.message), status_code=429, headers=headers)
    return JSONResponse({"error": error.to_dict()}, status_code=429, headers=headers)
