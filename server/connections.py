"""What one client may hold open, and how slowly a request may arrive.

uvicorn has no timeout for a request's head (h11 and httptools alike): a client sending a byte
every few seconds holds a connection, and a descriptor, for as long as it likes. Here:
- `ConnectionGuard` watches every HTTP connection once a second: a request's line and headers
  must arrive within `--header-timeout` of the connection opening (or of the previous response:
  an idle keep-alive connection is closed by uvicorn after 5 s); while the server reads a body, it
  must arrive at `--min-body-rate-kb` or faster, measured over windows of the same length.
  Connections past these get a 408 (when they sent part of a request) and are closed.
- It also counts open connections per client address: past `--max-connections-per-client` a new
  connection is answered 429 and closed. Peers that carry many clients are not counted: proxies
  named in `--forwarded-allow-ips`, and loopback with `--share` (the tunnel).
- `WebSocketLimitMiddleware` bounds the open WebSockets per client address
  (`--max-websockets-per-client`, close code 4429).
- `server_config` builds uvicorn's config with these in place (app.py and the tests use it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from llm_pool.errors import InvalidRequestError, RateLimitedError, ShoalError

from .origin import close_reason

WS_TOO_MANY = 4429
_SWEEP_EVERY = 30.0  # seconds between sweeps of closed connections out of the per-client table


@dataclass
class _Watch:
    protocol: asyncio.Protocol
    transport: asyncio.Transport
    peer: str | None
    since: float
    phase: str = "head"  # head: waiting for a request's head; body: reading a body; app: the app's turn
    received: int = 0  # bytes received on this connection
    mark: int = 0  # bytes received when the phase (or the body's window) began
    refused: bool = False
    answered: bool = False
    cycle: object = None  # uvicorn's request cycle seen last: a new one is a new request


def _phase(protocol) -> str:
    cycle = getattr(protocol, "cycle", None)
    if cycle is None or cycle.response_complete:
        return "head"
    flow = getattr(protocol, "flow", None)
    if cycle.more_body and not (flow and flow.read_paused) and not getattr(cycle, "waiting_for_100_continue", False):
        return "body"  # the server is reading and the client owes bytes
    return "app"


def raw_response(status: int, reason: str, error: ShoalError, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 answer, for connections that never reached the app."""
    body = json.dumps({"error": error.to_dict()}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n" + (f"retry-after: {retry_after}\r\n" if retry_after else "") + "\r\n")
    return head.encode() + body


class ConnectionGuard:
    """Per server: the watchdog of request heads and bodies, and the per-client connection count."""

    def __init__(self, *, header_timeout: float, min_body_rate: float, max_per_client: int,
                 exempt: Callable[[str], bool], clock=time.monotonic):
        self.header_timeout = header_timeout
        self.min_body_rate = min_body_rate  # bytes per second
        self.max_per_client = max_per_client
        self.exempt = exempt
        self._clock = clock
        self._tick_every = min(1.0, header_timeout / 4)
        self._watches: dict[int, _Watch] = {}
        self._open: dict[str, list[asyncio.Transport]] = {}
        self._ticking = False
        self._swept = clock()

    # ------------------------------------------------------------------ protocol callbacks
    def admit(self, protocol: asyncio.Protocol, transport: asyncio.Transport) -> _Watch:
        peername = transport.get_extra_info("peername")
        peer = peername[0] if isinstance(peername, tuple) and peername else None
        watch = _Watch(protocol, transport, peer, since=self._clock())
        if self.max_per_client and peer is not None and not self.exempt(peer):
            held = [t for t in self._open.get(peer, ()) if not t.is_closing()]
            if len(held) >= self.max_per_client:
                watch.refused = True
            else:
                held.append(transport)
            self._open[peer] = held
        self._watches[id(watch)] = watch
        if not self._ticking:
            self._ticking = True
            asyncio.get_running_loop().call_later(self._tick_every, self._tick)
        return watch

    def received(self, watch: _Watch, size: int) -> None:
        watch.received += size

    def refuse(self, watch: _Watch) -> None:
        """Answer an over-the-limit connection once it has sent its request, then close it."""
        if not watch.answered:
            watch.answered = True
            error = RateLimitedError(
                f"Too many open connections from your address: the limit is {self.max_per_client} "
                "(--max-connections-per-client). Close some, or retry in a moment.", retry_after=5)
            error.code = "too_many_connections"
            watch.transport.write(raw_response(429, "Too Many Requests", error, retry_after=5))
        watch.transport.close()

    def forget(self, watch: _Watch) -> None:
        self._watches.pop(id(watch), None)
        held = self._open.get(watch.peer or "")
        if held is not None and watch.transport in held:
            held.remove(watch.transport)
            if not held:
                del self._open[watch.peer]

    # ------------------------------------------------------------------ the watchdog
    def _tick(self) -> None:
        now = self._clock()
        for watch in list(self._watches.values()):
            self._check(watch, now)
        if now - self._swept > _SWEEP_EVERY:
            self._sweep(now)
        if self._watches or self._open:
            asyncio.get_running_loop().call_later(self._tick_every, self._tick)
        else:
            self._ticking = False

    def _check(self, watch: _Watch, now: float) -> None:
        transport = watch.transport
        if transport.is_closing():
            self._watches.pop(id(watch), None)
            return
        if watch.refused:
            if now - watch.since > min(1.0, self.header_timeout):
                transport.close()  # it never sent a request to answer
            return
        if transport.get_protocol() is not watch.protocol:
            self._watches.pop(id(watch), None)  # upgraded to a WebSocket: pings watch it from now on
            return
        phase, cycle = _phase(watch.protocol), getattr(watch.protocol, "cycle", None)
        if phase != watch.phase or cycle is not watch.cycle:  # a request may begin and end between two ticks
            watch.phase, watch.since, watch.mark, watch.cycle = phase, now, watch.received, cycle
        elif phase == "head" and now - watch.since > self.header_timeout:
            self._expire(watch, "its request's headers did not arrive within", partial=watch.received > watch.mark)
        elif phase == "body" and now - watch.since >= self.header_timeout:
            if self.min_body_rate and watch.received - watch.mark < self.min_body_rate * (now - watch.since):
                cycle = watch.protocol.cycle
                self._expire(watch, "its request body arrived slower than --min-body-rate-kb over",
                             partial=not cycle.response_started)
            else:
                watch.since, watch.mark = now, watch.received

    def _expire(self, watch: _Watch, what: str, partial: bool) -> None:
        if partial:  # a request was under way: say why it ends
            error = InvalidRequestError(f"Connection closed: {what} {self.header_timeout:g} s "
                                        "(--header-timeout).", code="request_timeout")
            watch.transport.write(raw_response(408, "Request Timeout", error))
        watch.transport.close()
        self._watches.pop(id(watch), None)

    def _sweep(self, now: float) -> None:
        self._swept = now
        for peer in list(self._open):
            held = [t for t in self._open[peer] if not t.is_closing()]
            if held:
                self._open[peer] = held
            else:
                del self._open[peer]


def guarded_protocol(base: type[asyncio.Protocol], guard: ConnectionGuard) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (`base`) with `guard` watching each of its connections."""

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport) -> None:
            self._watch = guard.admit(self, transport)
            if not self._watch.refused:
                super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            if self._watch.refused:
                guard.refuse(self._watch)
                return
            guard.received(self._watch, len(data))
            super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            guard.forget(self._watch)
            if not self._watch.refused:
                super().connection_lost(exc)

    GuardedProtocol.__name__ = f"Guarded{base.__name__}"
    return GuardedProtocol


def exempt_peers(settings) -> Callable[[str], bool]:
    """Peers that carry many clients (trusted proxies; loopback with --share, the tunnel): not
    counted per address."""
    entries = [e.strip() for e in settings.forwarded_allow_ips.split(",") if e.strip()]
    if "*" in entries:
        return lambda peer: True
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue  # a unix socket path, or a name uvicorn would not match either
    share = settings.share

    def exempt(peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        if share and address.is_loopback:
            return True
        return any(address in network for network in networks)

    return exempt


class WebSocketLimitMiddleware:
    """At most `max_per_client` open WebSockets per client address; more are accepted and closed at
    once with code 4429 and a reason naming the setting (browsers show both)."""

    def __init__(self, app: ASGIApp, max_per_client: int, exempt: Callable[[str], bool]):
        self.app = app
        self.max_per_client = max_per_client
        self.exempt = exempt
        self.open: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = (scope.get("client") or ("unknown",))[0]
        if scope["type"] != "websocket" or not self.max_per_client or self.exempt(client):
            await self.app(scope, receive, send)
            return
        if self.open.get(client, 0) >= self.max_per_client:
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": WS_TOO_MANY, "reason": close_reason(
                f"Too many open WebSockets from your address: the limit is {self.max_per_client} "
                "(--max-websockets-per-client).")})
            return
        self.open[client] = self.open.get(client, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open[client] -= 1
            if not self.open[client]:
                del self.open[client]


def server_config(app, settings, **overrides):
    """uvicorn's config for Shoal: proxies believed only where named, WebSocket frames bounded
    like request bodies, and the connection guard on every HTTP connection."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    guard = ConnectionGuard(header_timeout=settings.header_timeout, min_body_rate=settings.min_body_rate_kb * 1000,
                            max_per_client=settings.max_connections_per_client, exempt=exempt_peers(settings))
    # X-Forwarded-For is believed only from the proxies named in --forwarded-allow-ips (uvicorn
    # would believe any local peer: behind the share tunnel, anyone could claim to be 127.0.0.1).
    forwarded = settings.forwarded_allow_ips.strip()
    options = dict(host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=3,
                   proxy_headers=bool(forwarded), forwarded_allow_ips=forwarded or None,
                   ws_max_size=int(settings.max_request_mb * 1e6), http=guarded_protocol(AutoHTTPProtocol, guard))
    options.update(overrides)
    return uvicorn.Config(app, **options)
