"""Servers as an attacker meets them, all real, on loopback ports, sharing the session's loaded model:

- `public_server`: keys off and loopback not trusted, as on a Space or behind `--share` (the share
  tunnel connects from loopback, so there loopback means nothing): callers are anonymous strangers.
- `keyed_server_2`: user keys (alice, bob) and an admin key, loopback not trusted.
- `local_server`: keys off on loopback, as `python app.py` on a laptop: the caller is the owner.
"""

from __future__ import annotations

import pytest

from tests.conftest import make_settings, serve

ALICE, BOB, ADMIN = "sk-alice-0123456789", "sk-bob-0123456789", "sk-admin-0123456789"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def services_of(server):
    return server.server.config.app.state.services


@pytest.fixture(scope="module")
def public_server(pool, embedder, tmp_path_factory):
    from service import build_services
    server = serve(build_services(make_settings(tmp_path_factory.mktemp("public"), trust_loopback=False),
                                  pool=pool, embedder=embedder))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keyed_server_2(pool, embedder, tmp_path_factory):
    from service import build_services
    settings = make_settings(tmp_path_factory.mktemp("keyed2"), api_keys=[ALICE, BOB], admin_keys=[ADMIN],
                             trust_loopback=False, cors_origins=["https://app.example"])
    server = serve(build_services(settings, pool=pool, embedder=embedder))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local_server(pool, embedder, tmp_path_factory):
    from service import build_services
    server = serve(build_services(make_settings(tmp_path_factory.mktemp("local")), pool=pool, embedder=embedder))
    yield server
    server.stop()


from tests.hardening.conftest import tiny_catalog  # noqa: E402,F401  (a fixture the process tests use)


def gradio_call(url: str, fn_index: int, data: list, headers: dict | None = None, timeout: float = 60) -> dict:
    """Call one event handler of the UI the way the page does (queue/join, then the SSE stream),
    including handlers hidden from the API: what a hostile script can do too. Returns the
    `process_completed` message."""
    import json
    import uuid

    import httpx
    session = uuid.uuid4().hex
    joined = httpx.post(f"{url}/gradio_api/queue/join", headers=headers or {}, timeout=timeout, json={
        "data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None})
    joined.raise_for_status()
    with httpx.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session},
                      headers=headers or {}, timeout=timeout) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError("the event never completed")
