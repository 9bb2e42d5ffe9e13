"""Who the caller is, decided once and trusted only when the server can check it: keys in headers
or a signed cookie, a server-signed browser id, loopback only where loopback means the owner."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import websockets

from tests.security.conftest import ADMIN, ALICE, BOB, bearer, gradio_call, services_of


@pytest.mark.parametrize("path", ["/healthX", "/health/readyz", "/loginX", "/login/../v1/models", "/health/"])
def test_open_paths_are_matched_exactly(keyed_server_2, path):
    """The finding: open paths were matched by prefix, so `/healthX` needed no key."""
    assert httpx.get(f"{keyed_server_2.url}{path}").status_code == 401


def test_the_open_paths_stay_open(keyed_server_2):
    for path in ("/health", "/health/ready", "/login"):
        assert httpx.get(f"{keyed_server_2.url}{path}").status_code in (200, 503), path


def test_a_key_in_the_url_is_refused_and_never_written_to_the_access_log(tmp_path, tiny_catalog):
    """The finding: `?api_key=` was accepted, so keys landed in access logs."""
    from tests.hardening.conftest import AppProcess
    key = "sk-url-secret-5551234"
    app = AppProcess(tmp_path / "data", "--catalog", str(tiny_catalog), "--api-keys", key).start()
    try:
        refused = httpx.get(f"{app.url}/v1/models", params={"api_key": key})
        assert refused.status_code == 401 and "URL" in refused.json()["error"]["message"]
        assert httpx.get(f"{app.url}/v1/models", params={"token": key}, headers=bearer(key)).status_code == 200
    finally:
        app.proc.terminate()
        app.wait(60)
    assert "GET /v1/models" in app.output  # the access log is on, and the key is not in it
    assert key not in app.output


def test_the_login_cookie_never_holds_the_key_and_cannot_be_forged(keyed_server_2):
    login = httpx.post(f"{keyed_server_2.url}/login", data={"api_key": ALICE})
    assert login.status_code == 303
    cookie = login.cookies["shoal_session"]
    assert ALICE not in cookie and ALICE not in login.headers["set-cookie"]
    assert "httponly" in login.headers["set-cookie"].lower()
    url = f"{keyed_server_2.url}/v1/sessions"
    assert httpx.get(url, cookies={"shoal_session": cookie}).status_code == 200
    owner, expires, signature = cookie.split(".")
    forged = [f"{owner}.{int(expires) + 1}.{signature}", f"{owner}.{expires}.{'0' * len(signature)}", ALICE,
              f"key-{'a' * 16}.{expires}.{signature}"]
    for value in forged:
        assert httpx.get(url, cookies={"shoal_session": value}).status_code == 401, value


def test_cors_preflights_are_answered_when_keys_are_on(keyed_server_2):
    """The finding: with keys on, a browser app's preflight got 401, so no browser could call."""
    preflight = httpx.options(f"{keyed_server_2.url}/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    refused = httpx.get(f"{keyed_server_2.url}/v1/models", headers={"Origin": "https://app.example"})
    assert refused.status_code == 401  # the real request still needs the key, and the browser can read why
    assert refused.headers["access-control-allow-origin"] == "https://app.example"


def test_every_websocket_but_v1_ws_needs_a_key_at_the_handshake(keyed_server_2):
    """The finding: sockets on other paths skipped the key check. An extra socket route on the
    real app answers with a key and is refused without one."""
    app = keyed_server_2.server.config.app

    async def echo(ws):
        await ws.accept()
        await ws.send_text("secret-echo")
        await ws.close()

    if not any(getattr(r, "path", "") == "/v1/test-echo" for r in app.router.routes):
        from starlette.routing import WebSocketRoute
        app.router.routes.insert(0, WebSocketRoute("/v1/test-echo", echo))  # before the UI's catch-all mount
    url = keyed_server_2.url.replace("http", "ws") + "/v1/test-echo"

    async def attempt(headers):
        async with websockets.connect(url, additional_headers=headers) as ws:
            return await ws.recv()

    with pytest.raises(websockets.InvalidStatus):
        asyncio.run(attempt({}))
    with pytest.raises(websockets.InvalidStatus):
        asyncio.run(attempt({"x-api-key": "wrong"}))
    assert asyncio.run(attempt(bearer(BOB))) == "secret-echo"


def test_with_keys_off_strangers_have_no_rest_sessions(public_server):
    """The finding: with keys off every REST caller was the same user `local`, so anyone on a
    public address could list, read or bulk-delete everyone's sessions."""
    url = public_server.url
    for method, path in (("GET", "/v1/sessions"), ("POST", "/v1/sessions"),
                         ("DELETE", "/v1/sessions?older_than_days=0"), ("GET", "/v1/sessions/abc"),
                         ("POST", "/v1/sessions/abc/messages"), ("GET", "/v1/sessions/abc/files"),
                         ("GET", "/v1/sessions/abc/messages/0/versions"), ("PATCH", "/v1/sessions/abc/messages/0"),
                         ("DELETE", "/v1/sessions/abc/messages/0"), ("POST", "/v1/sessions/abc/restore")):
        body = {"content": "hi"} if method == "POST" else {"version": 0} if method == "PATCH" else None
        response = httpx.request(method, f"{url}{path}", json=body)
        assert response.status_code == 401, (method, path, response.text)
        assert "--api-keys" in response.json()["error"]["message"]
    # ... while chatting without stored data still works for them
    chat = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert chat.status_code == 200


def test_two_key_holders_never_see_each_others_sessions(keyed_server_2):
    url = keyed_server_2.url
    made = httpx.post(f"{url}/v1/sessions", json={"title": "alice's plans"}, headers=bearer(ALICE)).json()
    assert httpx.get(f"{url}/v1/sessions/{made['id']}", headers=bearer(BOB)).status_code == 404
    assert all(s["id"] != made["id"] for s in httpx.get(f"{url}/v1/sessions", headers=bearer(BOB)).json()["data"])
    assert httpx.delete(f"{url}/v1/sessions", params={"older_than_days": 0}, headers=bearer(BOB)).status_code == 200
    assert httpx.get(f"{url}/v1/sessions/{made['id']}", headers=bearer(ALICE)).status_code == 200


def test_a_forged_browser_id_is_a_new_user_never_someone_else(public_server):
    """The finding: the UI trusted whatever browser id arrived (BrowserState's secret is sent to
    the browser, so anyone can make one). Calling the UI's start handler with another browser's
    raw id, or a signed id altered by one character, gives a fresh user with no chats."""
    services = services_of(public_server)
    identity = services.identity
    victim_token = identity.new_browser_token()
    victim = f"browser-{identity.browser_id(victim_token)}"
    services.chat.create(victim, title="victim's diary")
    start = _start_fn_index(httpx.get(f"{public_server.url}/config").json())

    def sessions_seen_with(token):
        message = gradio_call(public_server.url, start, [token])
        assert message["success"], message
        data = message["output"]["data"]
        titles = [c[0] for c in data[2].get("choices", [])]
        return data[0], titles

    token, titles = sessions_seen_with(victim_token)  # control: the real token is the victim
    assert token == victim_token and "victim's diary" in titles
    raw_id = victim_token.split(".")[0]
    altered = victim_token[:-1] + ("0" if victim_token[-1] != "0" else "1")
    for forged in (raw_id, altered, f"{raw_id}.{'f' * 32}"):
        token, titles = sessions_seen_with(forged)
        assert token != forged and identity.browser_id(token) is not None
        assert "victim's diary" not in titles


def _start_fn_index(config: dict) -> int:
    for index, dep in enumerate(config["dependencies"]):
        if any(t[1] == "load" for t in dep.get("targets", [])) and len(dep.get("outputs", [])) > 10:
            return dep.get("id", index)
    raise AssertionError("the UI's start handler was not found")


def test_rate_limits_count_by_valid_keys_only(pool, embedder, tmp_path_factory):
    """The finding: the UI's rate-limit identity was taken from any `x-api-key` header, so a fresh
    made-up key per call escaped the limit."""
    from gradio_client import Client

    from service import build_services
    from tests.conftest import make_settings, serve
    server = serve(build_services(make_settings(tmp_path_factory.mktemp("rl"), rate_limit_rpm=2,
                                                trust_loopback=False), pool=pool, embedder=embedder))
    try:
        outcomes = []
        for n in range(3):
            client = Client(server.url, verbose=False, headers={"x-api-key": f"made-up-{n}"})
            try:
                client.predict("smollm2-135m", "Once", 0, 2, api_name="/complete")
                outcomes.append("ok")
            except Exception as exc:  # gradio_client raises AppError with the server's message
                outcomes.append("limited" if "rate limit" in str(exc).lower() else f"other: {exc}")
        assert outcomes == ["ok", "ok", "limited"], outcomes
    finally:
        server.stop()


def test_keys_and_safe_defaults_come_from_the_environment_as_a_space_passes_them(tmp_path, tiny_catalog):
    """The finding: `SHOAL_API_KEYS=k1,k2` stopped the app at start-up. On a Space (SPACE_ID set),
    loopback is not the owner: without an admin key the pool cannot be changed, even from 127.0.0.1."""
    from tests.hardening.conftest import AppProcess
    app = AppProcess(tmp_path / "data", "--catalog", str(tiny_catalog))
    env = {"SHOAL_API_KEYS": "k1-abcdef, k2-abcdef", "SHOAL_ADMIN_KEYS": "adm-abcdef", "SPACE_ID": "someone/shoal",
           "SHOAL_HOST": "127.0.0.1"}
    _start_with_env(app, env)
    try:
        models = f"{app.url}/v1/models"
        assert httpx.get(models, headers=bearer("k2-abcdef")).status_code == 200
        assert httpx.get(models, headers=bearer("k1-abcdef")).status_code == 200
        assert httpx.get(models).status_code == 401
        pin = f"{app.url}/v1/models/tiny/pin"
        assert httpx.post(pin, headers=bearer("k1-abcdef")).status_code == 403
        assert httpx.post(pin, headers=bearer("adm-abcdef")).status_code == 200
    finally:
        app.stop()


def test_on_a_space_without_keys_loopback_is_a_stranger(tmp_path, tiny_catalog):
    from tests.hardening.conftest import AppProcess
    app = AppProcess(tmp_path / "data", "--catalog", str(tiny_catalog))
    _start_with_env(app, {"SPACE_ID": "someone/shoal", "SHOAL_HOST": "127.0.0.1"})
    try:
        assert httpx.post(f"{app.url}/v1/models/tiny/unload").status_code == 403
        assert httpx.get(f"{app.url}/v1/sessions").status_code == 401
        assert httpx.post(f"{app.url}/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}).status_code == 200
    finally:
        app.stop()


def _start_with_env(app, env: dict) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import MODEL_CACHE, ROOT
    app.proc = subprocess.Popen(
        [sys.executable, "app.py", "--port", str(app.port), "--data-dir", str(app.data_dir),
         "--model-cache-dir", str(MODEL_CACHE), *app.args],
        cwd=ROOT, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if app.proc.poll() is not None:
            raise AssertionError(f"app exited: {app.proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(f"{app.url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("app did not start")


def test_admin_key_holders_are_admins_and_users_are_not(keyed_server_2):
    url = f"{keyed_server_2.url}/v1/models/smollm2-135m"
    assert "location" in httpx.get(url, headers=bearer(ADMIN)).json()
    assert "location" not in httpx.get(url, headers=bearer(ALICE)).json()
    assert json.loads(httpx.get(url, headers=bearer(ALICE)).text)["state"] == "ready"
