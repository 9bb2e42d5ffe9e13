"""The HTTP API's contract against real servers on loopback ports: SSE framing, chunking and
pacing, the WebSocket protocol, batches, metrics, the Gradio API, admission control, errors."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import websockets

from tests.conftest import CHAT_MODEL

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def stream_chat(url: str, **body) -> list:
    payload = {"model": CHAT_MODEL, "messages": QUESTION, "temperature": 0, "stream": True, **body}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=payload, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse_events(response)


def content(events) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


def test_raw_sse_with_chunk_size_groups_tokens(live_server):
    single = stream_chat(live_server.url, max_tokens=16)
    grouped = stream_chat(live_server.url, max_tokens=16, chunk_size=4)
    assert single[-1] == "[DONE]" and grouped[-1] == "[DONE]"
    assert content(single) == content(grouped)
    pieces = lambda events: [e for e in events if isinstance(e, dict) and e["choices"][0]["delta"].get("content")]
    assert len(pieces(grouped)) <= (len(pieces(single)) + 3) // 4 + 1
    assert len(pieces(grouped)) < len(pieces(single))


def test_stream_delay_paces_the_events(live_server):
    payload = {"model": CHAT_MODEL, "messages": QUESTION, "temperature": 0, "stream": True,
               "max_tokens": 6, "stream_delay_ms": 250}
    stamps = []
    with httpx.stream("POST", f"{live_server.url}/v1/chat/completions", json=payload, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                stamps.append(time.monotonic())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert len(gaps) >= 3 and min(gaps) >= 0.2


def test_client_disconnect_mid_stream_frees_the_slot(live_server, pool):
    payload = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Write a long essay."}],
               "stream": True, "max_tokens": 2000}
    with httpx.stream("POST", f"{live_server.url}/v1/chat/completions", json=payload, timeout=60) as response:
        for line in response.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break
        assert pool.status(CHAT_MODEL)["in_flight"] == 1
    deadline = time.monotonic() + 3
    while pool.status(CHAT_MODEL)["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.status(CHAT_MODEL)["in_flight"] == 0
    assert pool.status(CHAT_MODEL)["queue"]["running"] == 0


async def _ws_session(url: str, script):
    async with websockets.connect(url.replace("http", "ws") + "/v1/ws") as ws:
        hello = json.loads(await ws.recv())
        assert hello["type"] == "hello"
        return await script(ws)


async def _collect_until(ws, predicate, limit=2000):
    seen = []
    for _ in range(limit):
        message = json.loads(await asyncio.wait_for(ws.recv(), 60))
        seen.append(message)
        if predicate(message, seen):
            return seen
    raise AssertionError("did not see the expected messages")


def test_websocket_runs_two_generations_and_cancels_one(live_server):
    async def script(ws):
        await ws.send(json.dumps({"type": "generate", "id": "long", "model": CHAT_MODEL,
                                  "messages": [{"role": "user", "content": "Write a long story."}],
                                  "params": {"max_new_tokens": 1500, "temperature": 0}}))
        await ws.send(json.dumps({"type": "generate", "id": "short", "model": CHAT_MODEL, "messages": QUESTION,
                                  "params": {"max_new_tokens": 12, "temperature": 0}}))
        cancelled = False
        seen = []
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), 60))
            seen.append(message)
            if message["type"] == "token" and message["id"] == "long" and not cancelled:
                await ws.send(json.dumps({"type": "cancel", "id": "long"}))
                cancelled = True
            done = {m["id"]: m for m in seen if m["type"] == "done"}
            if {"long", "short"} <= set(done):
                return seen, done

    seen, done = asyncio.run(_ws_session(live_server.url, script))
    assert done["long"]["finish_reason"] == "cancelled"
    assert done["long"]["usage"]["completion_tokens"] < 200
    assert done["short"]["finish_reason"] in ("stop", "length")
    short_text = "".join(m["text"] for m in seen if m["type"] == "token" and m["id"] == "short")
    assert short_text == done["short"]["text"] and short_text
    started = [m for m in seen if m["type"] == "started"]
    assert {m["id"] for m in started} == {"long", "short"}


def test_websocket_steers_the_next_turn_and_reports_errors(live_server):
    async def script(ws):
        await ws.send(json.dumps({"type": "set_params", "params": {"max_new_tokens": 5, "temperature": 0}}))
        ack = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "generate", "id": "a", "model": CHAT_MODEL, "messages": QUESTION}))
        seen = await _collect_until(ws, lambda m, _: m["type"] == "done")
        await ws.send(json.dumps({"type": "set_params", "params": {"temperature": 7}}))
        bad = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "generate", "id": "b", "model": "nope", "prompt": "x"}))
        unknown = json.loads(await ws.recv())
        await ws.send("not json")
        garbage = json.loads(await ws.recv())
        return ack, seen[-1], bad, unknown, garbage

    ack, done, bad, unknown, garbage = asyncio.run(_ws_session(live_server.url, script))
    assert ack["type"] == "params" and ack["params"]["max_new_tokens"] == 5
    assert done["usage"]["completion_tokens"] == 5 and done["finish_reason"] == "length"
    assert bad["type"] == "error" and bad["error"]["param"] == "temperature"
    assert unknown["type"] == "error" and unknown["id"] == "b" and unknown["error"]["type"] == "not_found_error"
    assert garbage["type"] == "error"


def test_batch_answers_in_order_and_reports_failures_in_place(live_server):
    body = {"model": CHAT_MODEL, "params": {"max_tokens": 8, "temperature": 0},
            "items": [{"messages": QUESTION}, {"prompt": "x", "model": "no-such-model"},
                      {"prompt": "One, two, three,"}, {"messages": QUESTION, "params": {"temperature": 9}}]}
    response = httpx.post(f"{live_server.url}/v1/batch", json=body, timeout=120)
    assert response.status_code == 400  # the out-of-range temperature is refused up front, by name
    assert "temperature" in response.json()["error"]["message"]
    body["items"].pop()
    results = httpx.post(f"{live_server.url}/v1/batch", json=body, timeout=120).json()
    assert [r["index"] for r in results["results"]] == [0, 1, 2]
    first, failed, third = results["results"]
    assert first["ok"] and first["usage"]["completion_tokens"] <= 8
    assert not failed["ok"] and failed["status"] == 404 and "no-such-model" in failed["error"]["message"]
    assert third["ok"] and third["finish_reason"] == "length"
    assert (results["succeeded"], results["failed"]) == (2, 1)


def test_metrics_are_exposed_in_prometheus_format(live_server):
    httpx.post(f"{live_server.url}/v1/chat/completions", timeout=60,
               json={"model": CHAT_MODEL, "messages": QUESTION, "max_tokens": 4})
    text = httpx.get(f"{live_server.url}/metrics").text
    for name in ("shoal_requests_total", "shoal_generated_tokens_total", "shoal_queue_depth",
                 "shoal_time_to_first_token_seconds_bucket", "shoal_request_duration_seconds_bucket",
                 "shoal_models_resident", "shoal_memory_used_bytes"):
        assert name in text
    assert f'shoal_model_ready{{model="{CHAT_MODEL}"' in text


def test_gradio_client_uses_the_named_endpoints(live_server):
    from gradio_client import Client
    client = Client(live_server.url, verbose=False)
    names = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert "/chat" in names and "/complete" in names
    text, _figures = client.predict(CHAT_MODEL, "One, two, three,", 0, 6, api_name="/complete")
    assert text.strip()


def test_direct_run_route_that_bypasses_the_queue_is_closed(live_server):
    response = httpx.post(f"{live_server.url}/gradio_api/run/complete",
                          json={"data": [CHAT_MODEL, "hello", 0, 4]})
    assert response.status_code == 404


def test_openapi_documents_routes_and_bounds(live_server):
    spec = httpx.get(f"{live_server.url}/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/generate", "/generate_stream",
                 "/v1/batch", "/v1/models", "/v1/models/{name}/swap", "/health", "/metrics"):
        assert path in spec["paths"], path
    temperature = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]["temperature"]
    bounds = temperature["anyOf"][0]
    assert bounds["maximum"] == 2 and bounds["minimum"] == 0
    assert httpx.get(f"{live_server.url}/docs").status_code == 200


def test_context_overflow_is_a_400_with_the_numbers(live_server):
    response = httpx.post(f"{live_server.url}/v1/chat/completions", timeout=60,
                          json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "word " * 9000}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "8192" in error["message"]


def test_chat_with_a_completion_model_is_a_clear_400(live_server):
    response = httpx.post(f"{live_server.url}/v1/chat/completions", timeout=300,
                          json={"model": "gemma3-270m", "messages": QUESTION})
    assert response.status_code == 400 and "completion model" in response.json()["error"]["message"]


def test_model_that_fails_to_load_is_a_503_with_the_reason(live_server):
    inside_roots = live_server_models_dir(live_server) / "nothing-here"  # registrations read only there
    register = httpx.post(f"{live_server.url}/v1/models", json={
        "name": "ghost", "version": "1", "source": "local", "location": str(inside_roots)})
    assert register.status_code == 201 and register.json()["state"] == "unloaded"
    response = httpx.post(f"{live_server.url}/v1/completions", json={"model": "ghost", "prompt": "hi"}, timeout=60)
    assert response.status_code == 503 and "config.json" in response.json()["error"]["message"]
    status = httpx.get(f"{live_server.url}/v1/models/ghost").json()
    assert status["state"] == "failed" and "config.json" in status["error"]
    duplicate = httpx.post(f"{live_server.url}/v1/models", json={
        "name": "ghost", "version": "1", "source": "local", "location": str(inside_roots)})
    assert duplicate.status_code == 409
    bad_source = httpx.post(f"{live_server.url}/v1/models", json={
        "name": "ghost", "version": "2", "source": "ftp", "location": "/x"})
    assert bad_source.status_code == 400 and "source" in bad_source.json()["error"]["message"]


def live_server_models_dir(server):
    return server.server.config.app.state.services.settings.models_dir


@pytest.mark.parametrize("body, field", [
    ({"messages": QUESTION, "max_tokens": 0}, "max_tokens"),
    ({"messages": QUESTION, "top_p": 1.5}, "top_p"),
    ({"messages": QUESTION, "n": 9}, "n"),
    ({"messages": QUESTION, "temperature": "warm"}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": QUESTION, "stop": ["a"] * 20}, "stop"),
    ({"messages": QUESTION, "presence_penalty": 3}, "presence_penalty"),
    ({"messages": QUESTION, "logit_bias": {"fish": 1}}, "logit_bias.fish"),
    ({"messages": QUESTION, "logit_bias": {"5": 101}}, "logit_bias.5"),
    ({"messages": QUESTION, "min_p": 1.5}, "min_p"),
])
def test_bad_parameters_are_400_naming_the_field(live_server, body, field):
    response = httpx.post(f"{live_server.url}/v1/chat/completions", json={"model": CHAT_MODEL, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert field in (error["param"] or "") or field in error["message"]
