"""Pages on other sites cannot act as the owner, and names that resolve to this machine read nothing.

The findings, on a laptop (`python app.py`, loopback trusted): a cross-site form POST unloaded the
default model; and, the Host header never being checked, a page served under a name resolving to
127.0.0.1 (DNS rebinding, played in Chromium with a host-resolver rule) read the owner's chats.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import websockets

from tests.conftest import CHROMIUM, FLAGS
from tests.security.conftest import ALICE, bearer, gradio_call

EVIL = "https://evil.example"
SECRET = "owner-secret-chat-7f3a"


def sessions_of(server) -> list:
    return httpx.get(f"{server.url}/v1/sessions", timeout=30).json()["data"]


@pytest.fixture(scope="module")
def owner_session(local_server) -> str:
    """A chat the owner keeps: what a rebinding page would read."""
    answer = httpx.post(f"{local_server.url}/v1/sessions", json={"title": SECRET}, timeout=30)
    answer.raise_for_status()
    return answer.json()["id"]


def test_a_cross_site_form_post_cannot_act_as_the_owner(local_server):
    before = len(sessions_of(local_server))
    form = {"Origin": EVIL, "Sec-Fetch-Site": "cross-site", "Content-Type": "application/x-www-form-urlencoded"}
    created = httpx.post(f"{local_server.url}/v1/sessions", headers=form, content=b"title=x", timeout=30)
    assert created.status_code == 403
    error = created.json()["error"]
    assert error["code"] == "cross_site_request" and "--cors-origins" in error["message"]
    assert len(sessions_of(local_server)) == before
    # An admin route (a model that does not exist, so nothing changes if the check were missing).
    unload = httpx.post(f"{local_server.url}/v1/models/no-such-model/unload", headers={"Origin": EVIL}, timeout=30)
    assert unload.status_code == 403
    only_fetch_metadata = httpx.post(f"{local_server.url}/v1/sessions", headers={"Sec-Fetch-Site": "cross-site"},
                                     json={}, timeout=30)
    assert only_fetch_metadata.status_code == 403
    assert len(sessions_of(local_server)) == before
    # The owner's own page, and scripts (no Origin), still act.
    same_origin = httpx.post(f"{local_server.url}/v1/sessions", json={"title": "mine"}, timeout=30,
                             headers={"Origin": local_server.url, "Sec-Fetch-Site": "same-origin"})
    assert same_origin.status_code in (200, 201)
    assert httpx.post(f"{local_server.url}/v1/sessions", json={"title": "script"}, timeout=30).status_code in (200, 201)


def test_a_cross_site_form_in_chromium_cannot_reach_the_pool(browser, local_server):
    """The finding's form posted to /unload; here to /load of the model already loaded, which
    changes nothing were the check missing: the answer tells whether the owner's power was used."""
    page = browser.new_page()
    try:
        form = (f'<form id="f" method="post" action="{local_server.url}/v1/models/smollm2-135m/load">'
                '</form><script>f.submit()</script>')
        page.route("http://evil.test/**", lambda route: route.fulfill(body=form, content_type="text/html"))
        page.goto("http://evil.test/")
        page.wait_for_url(f"{local_server.url}/**")
        page.wait_for_load_state()
        assert "cross_site_request" in page.content()
        assert '"state"' not in page.content()
    finally:
        page.close()


def test_only_the_servers_own_names_are_answered(local_server, owner_session):
    port = local_server.url.rsplit(":", 1)[1]

    def sessions_for(host: str) -> httpx.Response:
        return httpx.get(f"{local_server.url}/v1/sessions", headers={"Host": host.format(port=port)}, timeout=30)

    for host in ("rebind.example", "rebind.example:{port}", "localhost.evil.example:{port}"):
        answer = sessions_for(host)
        assert answer.status_code == 421, host
        assert SECRET not in answer.text
        assert "--allowed-hosts" in answer.json()["error"]["message"]
    for host in ("127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "LOCALHOST", "10.1.2.3:80"):
        answer = sessions_for(host)
        assert answer.status_code == 200 and SECRET in answer.text, host
    probe = httpx.get(f"{local_server.url}/health", headers={"Host": "shoal-svc:7860"}, timeout=30)
    assert probe.status_code == 200, "health probes answer any Host"


def test_dns_rebinding_in_chromium_reads_none_of_the_owners_chats(browser, local_server, owner_session):
    """Chromium resolves rebind.test to 127.0.0.1, as a rebinding DNS server would after the page
    loaded: the page and the API are then one origin to the browser."""
    port = local_server.url.rsplit(":", 1)[1]
    rebound = f"http://rebind.test:{port}"
    rebinding = browser.browser_type.launch(executable_path=CHROMIUM, headless=True,
                                            args=[*FLAGS, "--host-resolver-rules=MAP rebind.test 127.0.0.1"])
    try:
        page = rebinding.new_page()
        landing = page.goto(f"{rebound}/v1/sessions")
        assert landing.status == 421 and SECRET not in page.content()
        read = page.evaluate("""async () => {
            const r = await fetch('/v1/sessions'); return {status: r.status, text: await r.text()};
        }""")
        assert read["status"] == 421 and SECRET not in read["text"]
        assert page.goto(f"{rebound}/").status == 421
    finally:
        rebinding.close()


def _load_button_event(url: str) -> int:
    config = httpx.get(f"{url}/config", timeout=30).json()
    button = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "load-model")
    return next(dep.get("id", i) for i, dep in enumerate(config["dependencies"])
                if any(t[0] == button for t in dep.get("targets", [])))


def test_a_gradio_event_from_another_site_is_refused(local_server):
    """The owner's Models tab, driven by another site's script: the queue refuses it at the door.
    (Loading the model that is already loaded: harmless were the check missing.)"""
    index = _load_button_event(local_server.url)
    joined = httpx.post(f"{local_server.url}/gradio_api/queue/join", headers={"Origin": EVIL}, timeout=30, json={
        "data": ["smollm2-135m"], "fn_index": index, "session_hash": "evil0000", "event_data": None,
        "trigger_id": None})
    assert joined.status_code == 403 and joined.json()["error"]["code"] == "cross_site_request"
    own_page = gradio_call(local_server.url, index, ["smollm2-135m"], headers={"Origin": local_server.url})
    assert own_page["success"]


def test_a_cors_allowed_origin_still_works(keyed_server_2):
    url = f"{keyed_server_2.url}/v1/sessions"
    allowed = httpx.post(url, headers={**bearer(ALICE), "Origin": "https://app.example",
                                       "Sec-Fetch-Site": "cross-site"}, json={"title": "from the app"}, timeout=30)
    assert allowed.status_code in (200, 201)
    assert allowed.headers.get("access-control-allow-origin") == "https://app.example"
    other = httpx.post(url, headers={**bearer(ALICE), "Origin": EVIL}, json={"title": "x"}, timeout=30)
    assert other.status_code == 403


def test_a_cross_site_websocket_is_refused(local_server):
    url = local_server.url.replace("http", "ws") + "/v1/ws"

    async def hello(origin: str | None) -> dict:
        async with websockets.connect(url, origin=origin) as ws:
            return json.loads(await asyncio.wait_for(ws.recv(), 10))

    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        in_thread(hello(EVIL))
    assert refused.value.response.status_code == 403
    assert b"cross_site_request" in refused.value.response.body
    assert in_thread(hello(None))["type"] == "hello"
    assert in_thread(hello(local_server.url))["type"] == "hello"


def in_thread(coroutine):
    """asyncio.run off this thread, where the module's Playwright keeps a loop running."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
