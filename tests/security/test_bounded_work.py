"""One request cannot change the pool or freeze a model for everyone, played against real servers.

The findings: a stranger's chat naming `smollm2-135m@instruct-transformers` (not the version
served) loaded it (+1 GB, 66 s of CPU); a 3 KB json_schema whose pattern was `^(a?){300}a{300}$`
kept llama-server busy for 220 CPU seconds while another user's stream got 1 token in 240 s; 128
tools with tool_choice required paused another stream for 144 s; a schema nested 400 deep got a 500.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import CHAT_MODEL
from tests.security.conftest import ADMIN, ALICE, bearer

SPARE = f"{CHAT_MODEL}@instruct-bf16"  # a version of the chat model no other test relies on


def chat(server, model: str = CHAT_MODEL, headers: dict | None = None, **extra) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", headers=headers or {}, timeout=300, json={
        "model": model, "messages": [{"role": "user", "content": "Name a fish."}], "max_tokens": 4,
        "temperature": 0, **extra})


@pytest.fixture
def spare_unloaded(pool):
    """The spare version, not loaded (an earlier run may have left it loaded)."""
    if pool.status(SPARE)["state"] != "unloaded":
        pool.unload(SPARE)
    assert pool.status(SPARE)["state"] == "unloaded"
    yield SPARE
    if pool.status(SPARE)["state"] != "unloaded":
        pool.unload(SPARE)


def test_a_stranger_naming_a_version_gets_a_409_until_an_admin_loads_it(public_server, keyed_server_2, pool,
                                                                       spare_unloaded):
    served = pool.status(CHAT_MODEL)["version"]
    for response in (chat(public_server, spare_unloaded),
                     httpx.post(f"{public_server.url}/v1/completions", timeout=60,
                                json={"model": spare_unloaded, "prompt": "Once", "max_tokens": 2}),
                     httpx.post(f"{public_server.url}/tokenize", timeout=60,
                                json={"model": spare_unloaded, "prompt": "Once"}),
                     chat(keyed_server_2, spare_unloaded, headers=bearer(ALICE))):  # a user key: the same
        assert response.status_code == 409, response.text
        error = response.json()["error"]
        assert error["code"] == "version_not_loaded" and f"'{served}'" in error["message"]
    # through a stored session too: the session may name it, its turn is refused
    sid = httpx.post(f"{keyed_server_2.url}/v1/sessions", headers=bearer(ALICE), timeout=30,
                     json={"model": spare_unloaded}).json()["id"]
    turn = httpx.post(f"{keyed_server_2.url}/v1/sessions/{sid}/messages", headers=bearer(ALICE), timeout=60,
                      json={"content": "Name a fish.", "params": {"max_new_tokens": 2}})
    assert turn.status_code == 409 and turn.json()["error"]["code"] == "version_not_loaded"
    time.sleep(0.5)
    assert pool.status(spare_unloaded)["state"] == "unloaded"  # nothing started loading
    # naming the version served is fine
    assert chat(public_server, f"{CHAT_MODEL}@{served}").status_code == 200
    # an admin may load it; once loaded, anyone is routed to it
    assert chat(keyed_server_2, spare_unloaded, headers=bearer(ADMIN)).status_code == 200
    assert pool.status(spare_unloaded)["state"] == "ready"
    assert chat(public_server, spare_unloaded).status_code == 200  # loaded: a stranger is routed to it


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def test_a_pattern_that_explodes_the_grammar_is_refused_at_once(public_server):
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(a?){300}a{300}$"}},
              "required": ["a"], "description": "x" * 2900}  # ~3 KB, as in the finding
    started = time.monotonic()
    response = chat(public_server, response_format=schema_format(schema))
    elapsed = time.monotonic() - started
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "ways at once" in error["message"] and "limit" in error["message"]
    assert error["param"] == "response_format.json_schema.schema"
    assert elapsed < 1.0
    # the same pattern as a TGI regex grammar
    tgi = httpx.post(f"{public_server.url}/generate", timeout=30, json={
        "inputs": "Say a", "parameters": {"max_new_tokens": 4, "grammar": {"type": "regex",
                                                                          "value": "(a?){300}a{300}"}}})
    assert tgi.status_code == 400 and "ways at once" in tgi.json()["error"]["message"]


def test_a_deeply_nested_schema_is_a_400_not_a_500(public_server):
    schema: dict = {"type": "string"}
    for _ in range(400):
        schema = {"type": "object", "properties": {"x": schema}, "required": ["x"]}
    response = chat(public_server, response_format=schema_format(schema))
    assert response.status_code == 400, response.text
    assert "nested more than 32 levels" in response.json()["error"]["message"]


def tools(n: int) -> list[dict]:
    return [{"type": "function", "function": {
        "name": f"tool_{i}", "description": f"Tool number {i}.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}} for i in range(n)]


def test_a_constrained_call_among_128_tools_is_refused_naming_the_limit(public_server, keyed_server_2):
    started = time.monotonic()
    response = chat(public_server, tools=tools(128), tool_choice="required")
    assert response.status_code == 400, response.text
    assert time.monotonic() - started < 1.0
    error = response.json()["error"]
    assert error["param"] == "tools" and "at most 32" in error["message"]
    session = httpx.post(f"{keyed_server_2.url}/v1/sessions", headers=bearer(ALICE), timeout=30,
                         json={"tools": tools(128), "tool_choice": "required"})
    assert session.status_code == 400 and "at most 32" in session.json()["error"]["message"]
    assert chat(public_server, tools=tools(4), tool_choice="required").status_code == 200  # within bounds
