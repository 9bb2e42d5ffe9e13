"""Admission control and auth, each on its own server: a full queue answers 503 + Retry-After,
a rate limit 429 + Retry-After, and with API keys every route but /health needs a key."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets

from llm_pool import Catalog, EngineConfig, ModelPool, spec_from_dict
from llm_pool.backends import BackendContext
from service import build_services
from tests.conftest import CHAT_MODEL, make_settings, serve

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture
def tiny_server(tiny_model_dir, tmp_path):
    """One tiny model with one batch slot and one queue place."""
    spec = spec_from_dict({"name": "tiny", "version": "1", "source": "local", "location": str(tiny_model_dir)})
    context = BackendContext(cache_dir=tmp_path / "models", device="cpu",
                             engine=EngineConfig(max_batch_size=1, queue_size=1, kv_cache_bytes=4 * 2**20))
    pool = ModelPool(Catalog([spec]), context, budget_bytes=10**9)
    pool.load("tiny")
    server = serve(build_services(make_settings(tmp_path / "data"), pool=pool), with_ui=False)
    yield server
    server.stop()
    pool.shutdown()


async def _burst(url: str, n: int) -> list[httpx.Response]:
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 3000, "temperature": 0}
    async with httpx.AsyncClient(timeout=120) as client:
        first = asyncio.create_task(client.post(f"{url}/v1/completions", json=body))
        await asyncio.sleep(0.3)  # the first one holds the only slot
        rest = [asyncio.create_task(client.post(f"{url}/v1/completions", json=body)) for _ in range(n - 1)]
        return await asyncio.gather(first, *rest)


def test_full_queue_answers_503_with_retry_after_and_admitted_ones_finish(tiny_server):
    responses = asyncio.run(_burst(tiny_server.url, 4))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 503, 503]  # one running, one queued, two turned away
    refused = [r for r in responses if r.status_code == 503]
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert all(r.json()["error"]["code"] == "queue_full" for r in refused)
    done = [r.json() for r in responses if r.status_code == 200]
    assert all(d["choices"][0]["finish_reason"] == "length" for d in done)


def test_rate_limit_answers_429_with_retry_after(pool, tmp_path):
    server = serve(build_services(make_settings(tmp_path, rate_limit_rpm=2), pool=pool), with_ui=False)
    try:
        body = {"model": CHAT_MODEL, "messages": QUESTION, "max_tokens": 2}
        codes = [httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60) for _ in range(3)]
        assert [r.status_code for r in codes] == [200, 200, 429]
        assert int(codes[2].headers["retry-after"]) >= 1
        assert codes[2].json()["error"]["type"] == "rate_limit_error"
    finally:
        server.stop()


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/generate"), ("POST", "/"),
    ("GET", "/metrics"), ("POST", "/v1/batch"), ("GET", "/gradio_api/info"), ("GET", "/openapi.json"),
    ("POST", "/v1/models/smollm2-135m/load"), ("POST", "/tokenize"), ("POST", "/detokenize"),
    ("POST", "/v1/embeddings"), ("POST", "/api/embed"), ("POST", "/v1/rerank"), ("POST", "/rerank"),
    ("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens"), ("POST", "/v1/responses"),
    ("GET", "/v1/responses/resp_1"), ("DELETE", "/v1/responses/resp_1"), ("POST", "/v1/responses/resp_1/cancel"),
    ("GET", "/v1/responses/resp_1/input_items"), ("GET", "/v1/mcp/servers"), ("GET", "/docs"), ("GET", "/redoc"),
    ("GET", "/docs-assets/swagger-ui-bundle.js"), ("DELETE", "/v1/sessions/s1/messages"),
])
def test_with_keys_every_route_but_health_needs_one(keyed_server, method, path):
    response = httpx.request(method, f"{keyed_server.url}{path}", json={})
    assert response.status_code == 401, (path, response.status_code)
    assert response.json()["error"]["type"] == "authentication_error"


def test_keys_are_accepted_in_the_usual_places(keyed_server):
    url = f"{keyed_server.url}/v1/models"
    assert httpx.get(url, headers={"Authorization": "Bearer sk-test-1"}).status_code == 200
    assert httpx.get(url, headers={"x-api-key": "sk-test-1"}).status_code == 200
    in_url = httpx.get(url, params={"api_key": "sk-test-1"})  # URLs are logged: refused, and it says so
    assert in_url.status_code == 401 and "URL" in in_url.json()["error"]["message"]
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{keyed_server.url}/health").status_code == 200
    assert httpx.get(f"{keyed_server.url}/health/ready").status_code == 200
    page = httpx.get(keyed_server.url, headers={"accept": "text/html"})
    assert page.status_code == 303 and page.headers["location"] == "/login"
    login = httpx.post(f"{keyed_server.url}/login", data={"api_key": "sk-test-1"})
    assert login.status_code == 303 and "shoal_session" in login.cookies
    assert "sk-test-1" not in login.headers["set-cookie"]  # the cookie names the key's owner, signed
    assert httpx.get(keyed_server.url, cookies=login.cookies).status_code == 200


def test_websocket_needs_a_key_in_its_first_message(keyed_server):
    async def attempt(first):
        async with websockets.connect(keyed_server.url.replace("http", "ws") + "/v1/ws") as ws:
            await ws.send(json.dumps(first))
            reply = json.loads(await ws.recv())
            if reply["type"] == "error":
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await ws.recv()
                return reply, closed.value.rcvd.code
            return reply, None

    refused, code = asyncio.run(attempt({"type": "generate", "prompt": "hi"}))
    assert refused["error"]["type"] == "authentication_error" and code == 4401
    hello, _ = asyncio.run(attempt({"type": "auth", "api_key": "sk-test-1"}))
    assert hello["type"] == "hello"


class FailsMidStreamBackend:
    """A fake backend (for the SSE error framing, not for generation): two tokens, then an error."""

    def __init__(self, spec, context):
        from llm_pool.backends.base import Backend  # noqa: F401 - same interface, duck-typed
        self.spec, self.context = spec, context

    def prepare(self, progress):
        pass

    def estimate_bytes(self):
        return 1

    def load(self, progress):
        pass

    def unload(self):
        pass

    def memory_bytes(self):
        return 1

    def info(self):
        return {}

    def load_stats(self):
        return {}

    @property
    def context_length(self):
        return 1024

    def count_tokens(self, text):
        return len(text.split())

    def submit(self, request):
        import threading

        from llm_pool.errors import GenerationError
        from llm_pool.stream import GenerationHandle, TextDelta

        handle = GenerationHandle(request, model=self.spec.key)

        def produce():
            handle.push(TextDelta("Hello", (1,), (0.0,)))
            handle.push(TextDelta(" there", (2,), (0.0,)))
            handle.fail(GenerationError("the device fell over"))

        threading.Timer(0.05, produce).start()
        return handle


def test_a_stream_that_fails_after_it_began_ends_with_an_error_then_done(tmp_path, embedder):
    spec = spec_from_dict({"name": "flaky", "version": "1", "source": "local", "location": "/nowhere"})
    pool = ModelPool(Catalog([spec]), BackendContext(cache_dir=tmp_path), budget_bytes=10**9,
                     backend_factory=FailsMidStreamBackend)
    server = serve(build_services(make_settings(tmp_path / "d"), pool=pool, embedder=embedder), with_ui=False)
    try:
        lines = []
        body = {"model": "flaky", "messages": QUESTION, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][6:])
        assert error["error"]["message"].endswith("the device fell over")
        assert any('"Hello"' in line for line in lines)
        with httpx.stream("POST", f"{server.url}/generate_stream", json={"inputs": "x", "model": "flaky"},
                          timeout=30) as response:
            tgi = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
        assert tgi[-1]["error"].endswith("the device fell over")
    finally:
        server.stop()
        pool.shutdown()


def test_queue_timeout_and_leaving_the_queue(tiny_model_dir, tmp_path, embedder):
    spec = spec_from_dict({"name": "tiny", "version": "1", "source": "local", "location": str(tiny_model_dir)})
    context = BackendContext(cache_dir=tmp_path / "m", device="cpu",
                             engine=EngineConfig(max_batch_size=1, queue_size=4, queue_timeout=1.0,
                                                 kv_cache_bytes=4 * 2**20))
    pool = ModelPool(Catalog([spec]), context, budget_bytes=10**9)
    pool.load("tiny")
    server = serve(build_services(make_settings(tmp_path / "d"), pool=pool, embedder=embedder), with_ui=False)
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 3000, "temperature": 0}
    try:
        async def scenario():
            async with httpx.AsyncClient(timeout=120) as client:
                holder = asyncio.create_task(client.post(f"{server.url}/v1/completions", json=body))
                await asyncio.sleep(0.3)
                waited = await client.post(f"{server.url}/v1/completions", json=body)  # waits 1 s, then gives up
                leaver = asyncio.create_task(client.post(f"{server.url}/v1/completions", json=body))
                await asyncio.sleep(0.3)
                queued_while_waiting = pool.status("tiny")["queue"]["waiting"]
                leaver.cancel()  # the client goes away while queued
                await asyncio.sleep(0.5)
                left = pool.status("tiny")["queue"]["waiting"]
                await holder
                return waited, queued_while_waiting, left

        waited, queued, left = asyncio.run(scenario())
        assert waited.status_code == 503 and waited.json()["error"]["code"] == "queue_timeout"
        assert "waited" in waited.json()["error"]["message"] and waited.headers["retry-after"]
        assert queued == 1 and left == 0
    finally:
        server.stop()
        pool.shutdown()


def test_token_rate_limit_and_cors(pool, tmp_path, embedder):
    settings = make_settings(tmp_path, rate_limit_tpm=5, cors_origins=["https://notebook.example"])
    server = serve(build_services(settings, pool=pool, embedder=embedder), with_ui=False)
    try:
        body = {"model": CHAT_MODEL, "messages": QUESTION, "max_tokens": 12, "temperature": 0}
        first = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] > 5
        second = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert second.status_code == 429 and "token" in second.json()["error"]["message"].lower()
        allowed = httpx.options(f"{server.url}/v1/models", headers={
            "Origin": "https://notebook.example", "Access-Control-Request-Method": "GET"})
        assert allowed.headers.get("access-control-allow-origin") == "https://notebook.example"
        other = httpx.options(f"{server.url}/v1/models", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        server.stop()


def test_cors_is_off_by_default(live_server):
    response = httpx.get(f"{live_server.url}/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers
