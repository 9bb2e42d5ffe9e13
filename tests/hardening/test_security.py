"""Security: no route serves files outside what it should (Gradio's file routes included), keys
guard every transport, nothing is pickled, and the data directory is private."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import ROOT


def traversal_paths(data_dir) -> list[str]:
    return [
        "/gradio_api/file=/etc/passwd",
        "/gradio_api/file=../../../../etc/passwd",
        f"/gradio_api/file={ROOT}/app.py",
        "/gradio_api/file=app.py",
        f"/gradio_api/file={data_dir}/session-secret",
        f"/gradio_api/file={data_dir}/sessions/cache.db",
        "/gradio_api/file=%2e%2e/%2e%2e/etc/passwd",
        "/file=/etc/passwd",
        "/static/../app.py",
        "/assets/..%2F..%2Fapp.py",
        "/gradio_api/static/..%2F..%2F..%2Fetc%2Fpasswd",
        "/v1/sessions/..%2F..%2Fdata/files",
        "/favicon.ico/..%2F..%2Fapp.py",
    ]


def test_no_file_route_serves_what_it_should_not(live_server, services):
    secret = services.session_secret
    for path in traversal_paths(services.settings.data_dir):
        response = httpx.get(f"{live_server.url}{path}", timeout=30)
        assert response.status_code in (400, 403, 404, 405), (path, response.status_code)
        assert "root:x:0:0" not in response.text and secret not in response.text
        assert "def main" not in response.text


@pytest.mark.parametrize("method, path", [("GET", "/gradio_api/file=/etc/passwd"),
                                          ("POST", "/gradio_api/queue/join"), ("GET", "/gradio_api/config"),
                                          ("GET", "/config"), ("POST", "/gradio_api/upload")])
def test_keys_guard_gradio_routes_too(keyed_server, method, path):
    assert httpx.request(method, f"{keyed_server.url}{path}", json={}).status_code == 401


def test_nothing_in_the_data_directory_is_pickled(live_server, services):
    sid = httpx.post(f"{live_server.url}/v1/sessions", json={"params": {"max_new_tokens": 4}}).json()["id"]
    httpx.post(f"{live_server.url}/v1/sessions/{sid}/files", files={"file": ("a.txt", b"hello there\n")})
    httpx.post(f"{live_server.url}/v1/sessions/{sid}/messages", json={"content": "hi"}, timeout=60)
    pickled = []
    for path in services.settings.data_dir.rglob("*"):
        if path.is_file() and path.suffix not in (".db", ".db-wal", ".db-shm") and "-wal" not in path.name:
            head = path.read_bytes()[:2]
            if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
                pickled.append(path)
    assert not pickled
    assert services.settings.data_dir.stat().st_mode & 0o777 == 0o700
