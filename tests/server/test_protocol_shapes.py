"""What a peer's test suite (llama.cpp's server tests, pointed at Shoal) checks of any server: an
unknown API path is a 404 and a wrong method a 405 (with Allow), each in the shape of the
protocol asked (OpenAI's, Anthropic's, TGI's routes), while the UI keeps its pages; a streamed
chat never sends an empty content delta; llama.cpp's json_object-with-schema is enforced; and
completions carry a system_fingerprint."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import CHAT_ENGINES


@pytest.mark.parametrize(("method", "path", "status", "allow"), [
    ("GET", "/v1/chat/completions", 405, "POST"),
    ("DELETE", "/v1/completions", 405, "POST"),
    ("PUT", "/v1/models", 405, "GET, POST"),
    ("GET", "/generate", 405, "POST"),
    ("POST", "/v1/no-such-route", 404, None),
    ("GET", "/v1/chat/completion", 404, None),
    ("GET", "/api/chat", 404, None),
])
def test_unknown_paths_and_wrong_methods_are_openai_shaped(live_server, method, path, status, allow):
    response = httpx.request(method, f"{live_server.url}{path}")
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert path in error["message"] and error["type"]
    assert response.headers.get("allow") == allow


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v1/messages", 405), ("GET", "/v1/messages/count_tokens", 405), ("POST", "/v1/messages/batches", 404)])
def test_under_v1_messages_they_are_anthropic_shaped(live_server, method, path, status):
    response = httpx.request(method, f"{live_server.url}{path}", json={})
    assert response.status_code == status
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] in ("invalid_request_error", "not_found_error")


def test_the_ui_keeps_its_own_pages(live_server):
    assert "text/html" in httpx.get(live_server.url).headers["content-type"]
    assert httpx.get(f"{live_server.url}/gradio_api/no-such-thing").status_code == 404


@pytest.mark.parametrize("model", CHAT_ENGINES)
def test_a_streamed_chat_sends_no_empty_delta(live_server, model):
    body = {"model": model, "stream": True, "max_tokens": 24, "temperature": 0,
            "messages": [{"role": "user", "content": "Name three colours."}]}
    with httpx.stream("POST", f"{live_server.url}/v1/chat/completions", json=body, timeout=120) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}  # the opening chunk, as OpenAI sends it
    assert deltas[-1] == {} and events[-1]["choices"][0]["finish_reason"]  # the finishing chunk
    assert all(d.get("content") for d in deltas[1:-1]), deltas  # and nothing empty between


@pytest.mark.parametrize("model", CHAT_ENGINES)
def test_json_object_with_a_schema_beside_it_is_enforced(live_server, model):
    """llama.cpp's form of a schema: `{"type": "json_object", "schema": {...}}`."""
    import jsonschema
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}},
              "required": ["colour"], "additionalProperties": False}
    body = {"model": model, "max_tokens": 40, "temperature": 0,
            "response_format": {"type": "json_object", "schema": schema},
            "messages": [{"role": "user", "content": "Pick a colour."}]}
    answer = httpx.post(f"{live_server.url}/v1/chat/completions", json=body, timeout=120).json()
    jsonschema.validate(json.loads(answer["choices"][0]["message"]["content"]), schema)
    wrong = httpx.post(f"{live_server.url}/v1/chat/completions", timeout=60,
                       json={**body, "response_format": {"type": "text", "schema": schema}})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "response_format.schema"


def test_completions_carry_a_system_fingerprint(live_server):
    body = {"prompt": "The sea is", "max_tokens": 4}
    made = httpx.post(f"{live_server.url}/v1/completions", json=body, timeout=60).json()
    assert made["system_fingerprint"] == made["model"]
    with httpx.stream("POST", f"{live_server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks and all(c["system_fingerprint"] == made["model"] for c in chunks)
