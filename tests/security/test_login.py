"""Guessing keys is slow, and another site cannot sign a visitor in as someone else.

The findings: 400 wrong keys at /login from one address in 0.7 s, none refused, the right one then
accepted; a page on another site that posted an attacker's key to /login in the victim's browser
switched the victim's cookie to the attacker's identity.

Lockout by address refuses the right key too while it lasts: were it accepted, the attacker could
keep guessing and read success from the answer.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.security.conftest import ALICE, BOB, bearer

FAILURES, PER_PREFIX, WINDOW = 5, 6, 3.0


def client_at(address: str) -> httpx.Client:
    """A client on its own loopback address: another machine, as far as the server can tell."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30)


@pytest.fixture(scope="module")
def login_server(pool, embedder, tmp_path_factory):
    from service import build_services
    from tests.conftest import make_settings, serve
    settings = make_settings(tmp_path_factory.mktemp("login"), api_keys=[ALICE, BOB], trust_loopback=False,
                             max_login_failures=FAILURES, max_login_failures_per_prefix=PER_PREFIX,
                             login_window=WINDOW)
    server = serve(build_services(settings, pool=pool, embedder=embedder), with_ui=False)
    yield server
    server.stop()


def test_guessing_keys_at_login_is_refused_after_the_limit_even_the_right_key_until_the_window_passes(login_server):
    url = f"{login_server.url}/login"
    with client_at("127.0.0.9") as attacker:
        started = time.monotonic()
        answers = [attacker.post(url, data={"api_key": f"guess{n:04d}-x"}) for n in range(40)]
        assert [a.status_code for a in answers[:FAILURES]] == [401] * FAILURES
        refused = answers[FAILURES:]
        assert {a.status_code for a in refused} == {429}, "every guess past the limit is refused"
        assert 1 <= int(refused[0].headers["retry-after"]) <= WINDOW
        error = refused[0].json()["error"]
        assert "--max-login-failures" in error["message"] and error["code"] == "too_many_failed_keys"
        locked = attacker.post(url, data={"api_key": ALICE})
        assert locked.status_code == 429, "during the lockout the right key says nothing either"
        with client_at("127.0.0.10") as someone_else:
            assert someone_else.post(url, data={"api_key": ALICE}).status_code == 303
        time.sleep(max(0.0, started + WINDOW + 0.2 - time.monotonic()))
        assert attacker.post(url, data={"api_key": ALICE}).status_code == 303, "the window passed"


def test_a_browser_sees_the_lockout_on_the_sign_in_page(login_server):
    with client_at("127.0.0.11") as attacker:
        for n in range(FAILURES):
            attacker.post(f"{login_server.url}/login", data={"api_key": f"other{n:04d}-x"})
        page = attacker.post(f"{login_server.url}/login", data={"api_key": "other9999-x"},
                             headers={"Accept": "text/html"})
        assert page.status_code == 429 and "retry-after" in page.headers
        assert "<form" in page.text and "Too many wrong keys" in page.text


def test_guessing_keys_in_headers_is_refused_the_same_way(login_server):
    url = f"{login_server.url}/v1/models"
    with client_at("127.0.0.12") as attacker:
        codes = [attacker.get(url, headers=bearer(f"hdr{n:05d}-x")).status_code for n in range(FAILURES + 3)]
        assert codes == [401] * FAILURES + [429] * 3
        assert attacker.get(url, headers=bearer(BOB)).status_code == 429
    with client_at("127.0.0.13") as bob:
        assert bob.get(url, headers=bearer(BOB)).status_code == 200


def test_guesses_of_one_key_prefix_from_many_addresses_are_refused(login_server):
    """Spread over addresses, guesses at one key's prefix still hit a limit (the prefix's owner
    waits out the window too: a lock must not answer differently for the right key)."""
    url = f"{login_server.url}/login"
    prefix = ALICE[:8]
    for n in range(PER_PREFIX):
        with client_at(f"127.0.1.{n + 1}") as guesser:
            assert guesser.post(url, data={"api_key": f"{prefix}-guess-{n}"}).status_code == 401
    with client_at("127.0.1.100") as fresh:
        refused = fresh.post(url, data={"api_key": f"{prefix}-guess-last"})
        assert refused.status_code == 429
        assert "--max-login-failures-per-prefix" in refused.json()["error"]["message"]
        assert fresh.post(url, data={"api_key": BOB}).status_code == 303, "other prefixes are not affected"
    time.sleep(WINDOW + 0.2)
    with client_at("127.0.1.101") as alice:
        assert alice.post(url, data={"api_key": ALICE}).status_code == 303


def test_a_cross_site_post_to_login_is_refused(keyed_server_2):
    url = f"{keyed_server_2.url}/login"
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}):
        answer = httpx.post(url, data={"api_key": BOB}, headers=headers)
        assert answer.status_code == 403, headers
        assert "set-cookie" not in answer.headers
        assert answer.json()["error"]["code"] == "cross_site_request"
    own_form = httpx.post(url, data={"api_key": BOB}, headers={
        "Origin": keyed_server_2.url, "Sec-Fetch-Site": "same-origin"})
    assert own_form.status_code == 303
    assert "samesite=lax" in own_form.headers["set-cookie"].lower()


def test_another_site_cannot_switch_a_signed_in_browser_to_its_key(browser, keyed_server_2):
    """Played in Chromium: Alice signs in, then opens a page on another site whose form posts the
    attacker's key (Bob's) to /login. Her cookie must stay hers."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        page.goto(f"{keyed_server_2.url}/login")
        page.fill("input[name=api_key]", ALICE)
        page.click("button[type=submit]")
        page.wait_for_url(f"{keyed_server_2.url}/**")
        alice_cookie = _session_cookie(context)
        assert alice_cookie
        evil = (f'<form id="f" method="post" action="{keyed_server_2.url}/login">'
                f'<input name="api_key" value="{BOB}"></form><script>f.submit()</script>')
        page.route("http://evil.test/**", lambda route: route.fulfill(body=evil, content_type="text/html"))
        page.goto("http://evil.test/")
        page.wait_for_url(f"{keyed_server_2.url}/**")
        page.wait_for_load_state()
        assert _session_cookie(context) == alice_cookie, "the other site's post changed who she is"
    finally:
        context.close()


def _session_cookie(context) -> str | None:
    return next((c["value"] for c in context.cookies() if c["name"] == "shoal_session"), None)
