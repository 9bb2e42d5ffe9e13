"""Requests meant for this server, from this server's own pages: two checks in front of every route.

- **Host.** The `Host` header must name this server: the loopback names (`localhost`, `127.0.0.1`,
  `[::1]`), any IP address, `--host` when it is a name, the machine's name when listening on every
  interface, the Space's name, `*.gradio.live` with `--share`, and `--allowed-hosts`. Any port.
  A page served under another name that resolves to this machine (DNS rebinding) gets 421 and
  reads nothing. IP addresses are always accepted: a page can only be same-origin with an address
  by being served from it, so an address cannot be rebound. `/health` and `/health/ready` answer
  any Host (container probes use service names; they reveal nothing).
- **Cross-site.** A request that can change something (every method but GET, HEAD and OPTIONS,
  and every WebSocket handshake) is refused with 403 when its `Origin` names another origin, or
  (without `Origin`) its `Sec-Fetch-Site` says `cross-site`/`same-site`, unless `--cors-origins`
  allows that origin. `Sec-Fetch-Site: same-origin` is the browser's own word and passes (a proxy
  may have rewritten `Host`). Requests with neither header (curl, SDKs, gradio_client) pass.

Nothing here knows who the caller is; `auth` decides that inside.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from llm_pool.errors import MisdirectedRequestError, PermissionDeniedError, ShoalError

from .errors import shaped

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PROBES = frozenset({"/health", "/health/ready"})
_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def split_host(value: str) -> tuple[str, str | None]:
    """'Example.com:7860' -> ('example.com', '7860'); '[::1]:80' -> ('::1', '80')."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        name, rest = value[1:end if end > 0 else None], value[end + 1:] if end > 0 else ""
        port = rest[1:] if rest.startswith(":") else None
    elif value.count(":") == 1:
        name, port = value.split(":")
    else:
        name, port = value, None
    return name.rstrip("."), port or None


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return True


class HostNames:
    """The names this server answers to: exact names, '*.suffix' patterns, '*' for any."""

    def __init__(self, names: Iterable[str]):
        cleaned = [split_host(n)[0] if not n.strip().startswith("*") else n.strip().lower() for n in names]
        self.any = "*" in cleaned
        self.suffixes = tuple(n[1:] for n in cleaned if n.startswith("*.") and len(n) > 2)
        self.exact = frozenset(n for n in cleaned if n and not n.startswith("*"))

    def allows(self, name: str) -> bool:
        return (self.any or name in self.exact or is_ip(name)
                or any(name.endswith(suffix) for suffix in self.suffixes))


def own_names(settings, machine_name: str | None = None) -> HostNames:
    """Every name `settings` says this server is reached by (`machine_name`: the host's name,
    accepted when listening on every interface)."""
    names = [*LOOPBACK_NAMES, *settings.allowed_hosts]
    if settings.host not in ("0.0.0.0", "::", ""):
        names.append(settings.host)
    elif machine_name:
        names.append(machine_name)
    if settings.share:
        names.append("*.gradio.live")
    return HostNames(names)


def same_origin(origin: str, host: str) -> bool:
    """Whether a browser's `Origin` names the host (and port) the request was sent to."""
    parts = urlsplit(origin)
    try:
        origin_port = str(parts.port) if parts.port else _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:  # not a port
        return False
    if not parts.scheme or not parts.hostname:
        return False  # 'null' (sandboxed frames, file:, some redirects) is nobody's origin
    name, port = split_host(host)
    default = _DEFAULT_PORTS.get(parts.scheme)
    return parts.hostname.rstrip(".") == name and (port or default) == origin_port


def cross_site(headers: Headers, cors_origins: list[str]) -> str | None:
    """The other site a browser request comes from (None: same origin, or not a browser)."""
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site == "same-origin":
        return None
    origin = headers.get("origin")
    if origin is not None:
        if origin in cors_origins or "*" in cors_origins or same_origin(origin, headers.get("host", "")):
            return None
        return origin
    return "another site" if fetch_site in ("cross-site", "same-site") else None


class SameSiteMiddleware:
    def __init__(self, app: ASGIApp, names: HostNames, cors_origins: list[str]):
        self.app = app
        self.names = names
        self.cors_origins = list(cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            refusal = self.refusal(scope)
            if refusal is not None:
                await refuse(scope, send, refusal)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> ShoalError | None:
        headers = Headers(scope=scope)
        host = headers.get("host") or ""
        name = split_host(host)[0]
        if host and scope["path"] not in PROBES and not self.names.allows(name):
            shown = name[:100]
            return MisdirectedRequestError(
                f"This server does not answer to the host name {shown!r}. If you reach Shoal by that name "
                f"(a reverse proxy, a name on your network), start it with --allowed-hosts {shown} (env "
                "SHOAL_ALLOWED_HOSTS).", code="host_not_allowed")
        if scope["type"] == "websocket" or scope["method"] not in SAFE_METHODS:
            other = cross_site(headers, self.cors_origins)
            if other is not None:
                return PermissionDeniedError(
                    f"Cross-site request refused: a page on {other[:200]} may not act on this server. To let "
                    "a web app on that origin call the API, start Shoal with --cors-origins <origin>.",
                    code="cross_site_request")
        return None


def close_reason(text: str) -> str:
    """A WebSocket close reason: at most 123 bytes of UTF-8."""
    return text.encode()[:123].decode(errors="ignore")


async def refuse(scope: Scope, send: Send, error: ShoalError) -> None:
    """Answer with the error, as an HTTP response (also to a WebSocket handshake where the server
    can: the socket never opens)."""
    status, payload, extra = shaped(error, scope.get("path", ""))
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in extra.items()]
    if scope["type"] == "websocket":
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008, "reason": close_reason(error.message)})
            return
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
        return
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
