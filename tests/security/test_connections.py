"""One client cannot hold the server's connections, and bad WebSocket frames end cleanly.

The findings: 1,500 WebSockets held open for 40 s by one client; 3,000 half-open HTTP requests held
75 s (a byte every 10 s: with the common 1024 descriptor limit the server stops answering); a
binary auth frame on /v1/ws closed the socket with a KeyError traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import websockets

from tests.conftest import MODEL_CACHE, ROOT, free_port
from tests.security.conftest import ALICE, bearer

HEADER_TIMEOUT = 1.0


def client_at(address: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30)


def raw_socket(port: int, address: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(address, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """What the server says before it closes the connection, and when it closed (inf: it did not)."""
    sock.settimeout(timeout)
    started, data = time.monotonic(), b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return data, float("inf")
    except ConnectionResetError:
        pass
    return data, time.monotonic() - started


class GuardedServer:
    """A server built as app.py builds it (uvicorn config from `server_config`), in this process."""

    def __init__(self, services):
        import uvicorn

        from server.app import create_app
        from server.connections import server_config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = server_config(create_app(services, own_services=False), services.settings, host="127.0.0.1",
                               port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def guarded(pool, embedder, tmp_path_factory):
    from service import build_services
    from tests.conftest import make_settings
    settings = make_settings(tmp_path_factory.mktemp("guarded"), trust_loopback=False, header_timeout=HEADER_TIMEOUT,
                             min_body_rate_kb=1.0, max_connections_per_client=8, max_websockets_per_client=3)
    server = GuardedServer(build_services(settings, pool=pool, embedder=embedder))
    yield server
    server.stop()


@pytest.fixture
def server_errors():
    """Tracebacks and errors the server logs while the test runs."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR or record.exc_info:
                records.append(record)

    handler = Keep()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "uvicorn", "shoal", "shoal.http", "")]
    for logger in loggers:
        logger.addHandler(handler)
    yield records
    for logger in loggers:
        logger.removeHandler(handler)


# --------------------------------------------------------------------------- slow and idle requests
def test_half_open_requests_from_one_client_do_not_stop_another(tmp_path, tiny_catalog):
    """A real `python app.py` started with a soft limit of 256 open files (it raises it); one
    client opens 300 connections and trickles their headers; another client's /health answers."""
    port = free_port()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--port", str(port), "--data-dir", str(tmp_path / "data"), "--model-cache-dir",
         str(MODEL_CACHE), "--catalog", str(tiny_catalog), "--no-trust-loopback", "--header-timeout", "2"],
        cwd=ROOT, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    try:
        _wait_ready(proc, port)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        open_files = next(line for line in limits.splitlines() if line.startswith("Max open files")).split()
        assert open_files[3] == open_files[4] != "256", "the soft limit was raised to the hard one"
        attack = [raw_socket(port, "127.0.0.2") for _ in range(300)]
        for sock in attack:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        said = {sock: b"" for sock in attack}
        open_ = set(attack)
        started = time.monotonic()
        latencies = []
        with client_at("127.0.0.3") as other:
            while open_ and time.monotonic() - started < 6:
                time.sleep(0.25)
                for sock in list(open_):  # read first: what the server said before closing
                    if _poll(sock, said):
                        open_.discard(sock)
                    elif not said[sock]:
                        with contextlib.suppress(OSError):
                            sock.sendall(b"X: y\r\n")  # a header line, never the blank line
                t = time.monotonic()
                assert other.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
                latencies.append(time.monotonic() - t)
        assert not open_, f"{len(open_)} connections of the attack still open after 6 s"
        assert max(latencies) < 2.0, latencies
        refused = [a for a in said.values() if a.startswith(b"HTTP/1.1 429")]
        timed_out = [a for a in said.values() if a.startswith(b"HTTP/1.1 408")]
        assert len(refused) + len(timed_out) == 300, "every connection of the attack was answered"
        assert len(timed_out) <= 64 and len(refused) >= 236
        assert b"--max-connections-per-client" in refused[0] and b"--header-timeout" in timed_out[0]
        for sock in attack:
            sock.close()
    finally:
        proc.kill()
        proc.wait(30)


def _poll(sock: socket.socket, said: dict) -> bool:
    """Read what has arrived; True once the server closed the connection."""
    sock.settimeout(0)
    try:
        while chunk := sock.recv(65536):
            said[sock] += chunk
    except BlockingIOError:
        return False
    except ConnectionResetError:
        pass
    return True


def _wait_ready(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"app exited: {proc.stdout.read()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError("app did not start")


def test_idle_and_trickling_connections_are_closed_within_the_timeout(guarded):
    idle = raw_socket(guarded.port, "127.0.0.4")
    said, closed_after = read_until_closed(idle, 5)
    assert said == b"" and HEADER_TIMEOUT - 0.1 <= closed_after < HEADER_TIMEOUT + 1.5, closed_after

    slow_head = raw_socket(guarded.port, "127.0.0.4")
    slow_head.sendall(b"GET /health HTTP/1.1\r\n")
    started = time.monotonic()
    while time.monotonic() - started < 5:
        try:
            slow_head.sendall(b"X")
        except OSError:
            break
        time.sleep(0.2)
    said, _ = read_until_closed(slow_head, 2)
    assert said.startswith(b"HTTP/1.1 408") and time.monotonic() - started < HEADER_TIMEOUT + 1.5

    slow_body = raw_socket(guarded.port, "127.0.0.4")
    slow_body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{")
    started = time.monotonic()
    while time.monotonic() - started < 6:
        try:
            slow_body.sendall(b" ")
        except OSError:
            break
        time.sleep(0.3)
    said, _ = read_until_closed(slow_body, 2)
    assert said.startswith(b"HTTP/1.1 408") and b"--min-body-rate-kb" in said
    assert time.monotonic() - started < 2 * HEADER_TIMEOUT + 1.5


def test_slow_but_steady_uploads_and_kept_alive_connections_are_fine(guarded):
    body = b'{"model": "smollm2-135m", "prompt": "Once", "max_tokens": 1}' + b" " * 40_000
    sock = raw_socket(guarded.port, "127.0.0.5")
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body))
    for start in range(0, len(body), 2000):  # 16 KB/s for 2.5 s: slower than a second, above the floor
        sock.sendall(body[start:start + 2000])
        time.sleep(0.125)
    sock.settimeout(60)
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    sock.close()
    with client_at("127.0.0.5") as client:
        assert client.get(f"{guarded.url}/health").status_code == 200
        time.sleep(HEADER_TIMEOUT / 2)
        assert client.get(f"{guarded.url}/health").status_code == 200  # the same kept-alive connection


def test_a_kept_alive_client_asking_often_is_never_timed_out(guarded):
    """Quick requests on one kept-alive connection for three header timeouts are all answered."""
    with client_at("127.0.0.6") as client:
        deadline = time.monotonic() + 3 * HEADER_TIMEOUT
        while time.monotonic() < deadline:
            response = client.get(f"{guarded.url}/health")
            assert response.status_code == 200, response.text
            time.sleep(0.1)


def test_requests_that_begin_and_end_between_two_looks_of_the_watchdog_are_not_a_stuck_head():
    """The watchdog looks at each connection every quarter timeout. A kept-alive client whose
    requests each begin and end between two looks was taken for one head that never finished:
    after the timeout a 408 was written on the idle connection, and the client read it as the
    answer to its next request (seen as a 408 for /health beside 300 trickling connections).
    Played with the guard's clock and uvicorn's request cycles as the watchdog sees them."""
    from types import SimpleNamespace

    from server.connections import ConnectionGuard

    class Transport:
        written, closed = b"", False

        def get_extra_info(self, name):
            return ("127.0.0.9", 5000)

        def is_closing(self):
            return self.closed

        def write(self, data):
            self.written += data

        def close(self):
            self.closed = True

        def get_protocol(self):
            return self.protocol

    async def play():
        now = [0.0]
        guard = ConnectionGuard(header_timeout=1.0, min_body_rate=0, max_per_client=0, exempt=lambda peer: False,
                                clock=lambda: now[0])
        guard._ticking = True  # the test calls the watchdog's look itself (its own timer never fires)
        protocol, transport = SimpleNamespace(cycle=None), Transport()
        transport.protocol = protocol
        watch = guard.admit(protocol, transport)
        for _ in range(20):  # 5 s: a request every quarter second, each answered before the next look
            now[0] += 0.25
            guard.received(watch, 60)
            protocol.cycle = SimpleNamespace(response_complete=True, more_body=False)
            guard._tick()
        assert not transport.closed and transport.written == b""
        now[0] += 1.5  # then idle for longer than the timeout: closed, with nothing written
        guard._tick()
        assert transport.closed and transport.written == b""

    asyncio.run(play())


def test_one_client_cannot_hold_more_than_its_connections(guarded):
    held = [raw_socket(guarded.port, "127.0.0.6") for _ in range(8)]
    with client_at("127.0.0.6") as one_more:
        refused = one_more.get(f"{guarded.url}/health")
    assert refused.status_code == 429 and "retry-after" in refused.headers
    assert "--max-connections-per-client" in refused.json()["error"]["message"]
    with client_at("127.0.0.7") as other:
        assert other.get(f"{guarded.url}/health").status_code == 200
    for sock in held:
        read_until_closed(sock, HEADER_TIMEOUT + 2)  # idle: closed by the header timeout
        sock.close()
    with client_at("127.0.0.6") as again:
        assert again.get(f"{guarded.url}/health").status_code == 200


# --------------------------------------------------------------------------- WebSockets
async def _closed(ws) -> tuple[int | None, str]:
    with contextlib.suppress(websockets.exceptions.ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    return ws.close_code, ws.close_reason


def test_one_client_cannot_hold_more_than_its_websockets(guarded):
    url = guarded.url.replace("http", "ws") + "/v1/ws"

    async def play() -> None:
        held = [await websockets.connect(url, local_addr=("127.0.0.8", 0)) for _ in range(3)]
        for ws in held:
            assert json.loads(await ws.recv())["type"] == "hello"
        async with websockets.connect(url, local_addr=("127.0.0.8", 0)) as fourth:
            code, reason = await _closed(fourth)
        assert code == 4429 and "--max-websockets-per-client" in reason
        async with websockets.connect(url, local_addr=("127.0.0.9", 0)) as other:
            assert json.loads(await other.recv())["type"] == "hello"
        await held.pop().close()
        async with websockets.connect(url, local_addr=("127.0.0.8", 0)) as again:
            assert json.loads(await again.recv())["type"] == "hello"
        for ws in held:
            await ws.close()

    asyncio.run(play())


def test_bad_websocket_frames_end_cleanly_with_a_reason(guarded, keyed_server_2, server_errors):
    async def binary_auth() -> tuple[int | None, str]:
        async with websockets.connect(keyed_server_2.url.replace("http", "ws") + "/v1/ws") as ws:
            await ws.send(b'{"type": "auth", "api_key": "' + ALICE.encode() + b'"}')
            return await _closed(ws)

    async def after_hello() -> None:
        url = guarded.url.replace("http", "ws") + "/v1/ws"
        async with websockets.connect(url) as ws:
            assert json.loads(await ws.recv())["type"] == "hello"
            for garbage in ("not json", "[" * 100_000, json.dumps([1, 2])):
                await ws.send(garbage)
                event = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert event["type"] == "error" and "JSON object" in event["error"]["message"]
            await ws.send(json.dumps({"type": "ping"}))
            assert json.loads(await ws.recv())["type"] == "pong", "the socket survives garbage text"
            await ws.send(b"\x00\x01binary")
            code, reason = await _closed(ws)
            assert code == 1003 and "binary" in reason
        async with websockets.connect(url, max_size=None) as ws:
            await ws.recv()
            await ws.send("x" * 5_000_000)  # over the 4 MB frame limit
            code, _ = await _closed(ws)
            assert code == 1009

    code, reason = asyncio.run(binary_auth())
    assert code == 1003 and "binary" in reason
    asyncio.run(after_hello())
    with httpx.Client() as client:
        assert client.get(f"{keyed_server_2.url}/v1/models", headers=bearer(ALICE)).status_code == 200
    time.sleep(0.2)
    assert not server_errors, [r.getMessage() for r in server_errors]
