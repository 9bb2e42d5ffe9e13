"""Keep-alive (Ollama's meaning): an idle model is unloaded when its time runs out, shown in
/v1/models as `keep_alive` and `expires_at`; since it changes the pool for everyone, only an
admin may set it. Real server, real embedding model (the cheapest to reload)."""

from __future__ import annotations

import time

import httpx
import pytest

from llm_pool import spec_from_dict
from llm_pool.errors import InvalidParamsError
from tests.security.conftest import ADMIN, ALICE, bearer

EMBED = "all-minilm-l6-v2"


def status(server, key: str) -> dict:
    models = httpx.get(f"{server.url}/v1/models", headers=bearer(key), timeout=30).json()["data"]
    return next(m for m in models if m["id"] == EMBED)


def embed(server, key: str, **extra) -> httpx.Response:
    return httpx.post(f"{server.url}/api/embed", headers=bearer(key), timeout=120,
                      json={"model": EMBED, "input": "keep me warm", **extra})


def test_an_idle_model_is_unloaded_when_its_keep_alive_runs_out(keyed_server_2):
    try:
        assert embed(keyed_server_2, ADMIN, keep_alive="3s").status_code == 200
        shown = status(keyed_server_2, ADMIN)
        assert shown["keep_alive"] == 3.0 and shown["state"] == "ready"
        assert shown["expires_at"] is not None and time.time() - 1 <= shown["expires_at"] <= time.time() + 4
        deadline = time.monotonic() + 15
        while status(keyed_server_2, ADMIN)["state"] != "unloaded" and time.monotonic() < deadline:
            time.sleep(0.3)
        assert status(keyed_server_2, ADMIN)["state"] == "unloaded"

        assert embed(keyed_server_2, ADMIN, keep_alive=-1).status_code == 200  # forever: loads again and stays
        time.sleep(2)
        shown = status(keyed_server_2, ADMIN)
        assert shown["state"] == "ready" and shown["keep_alive"] is None and shown["expires_at"] is None

        loaded = httpx.post(f"{keyed_server_2.url}/v1/models/{EMBED}/load", params={"keep_alive": "10m"},
                            headers=bearer(ADMIN), timeout=120)
        assert loaded.status_code == 200 and loaded.json()["keep_alive"] == 600.0
        assert status(keyed_server_2, ADMIN)["expires_at"] > time.time() + 590
    finally:
        httpx.post(f"{keyed_server_2.url}/v1/models/{EMBED}/load", params={"keep_alive": "-1"},
                   headers=bearer(ADMIN), timeout=120)


@pytest.mark.parametrize("route, body", [
    ("/api/embed", {"model": EMBED, "input": "x", "keep_alive": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "keep_alive": 0}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1, "keep_alive": "0s"}),
])
def test_a_user_cannot_change_how_long_a_model_stays_loaded(keyed_server_2, route, body):
    before = status(keyed_server_2, ADMIN)["keep_alive"]
    refused = httpx.post(f"{keyed_server_2.url}{route}", headers=bearer(ALICE), json=body, timeout=60)
    assert refused.status_code == 403 and refused.json()["error"]["param"] == "keep_alive"
    assert status(keyed_server_2, ADMIN)["keep_alive"] == before
    user_load = httpx.post(f"{keyed_server_2.url}/v1/models/{EMBED}/load", params={"keep_alive": "0"},
                           headers=bearer(ALICE), timeout=60)
    assert user_load.status_code == 403


@pytest.mark.parametrize("value, seconds", [("5m", 300.0), (90, 90.0), ("1h30m", 5400.0), (-1, None)])
def test_the_catalog_reads_idle_unload_as_ollama_reads_keep_alive(value, seconds):
    spec = spec_from_dict({"name": "m", "version": "v1", "source": "gguf", "location": "/x.gguf",
                           "idle_unload": value})
    assert spec.idle_unload == seconds
    with pytest.raises(InvalidParamsError) as refused:
        spec_from_dict({"name": "m", "version": "v1", "source": "gguf", "location": "/x.gguf",
                        "idle_unload": "soon"})
    assert refused.value.param == "idle_unload"
