"""Load and overload: a sweep up to capacity with no failures, 3x overload refused fast with
Retry-After, pool thrash with no failed request, and determinism under concurrency."""

from __future__ import annotations

import asyncio
import time

import httpx

from llm_pool import Catalog, EngineConfig, GenerationParams, GenerationRequest, Message, ModelPool, spec_from_dict
from llm_pool.backends import BackendContext
from service import build_services
from tests.conftest import CHAT_MODEL, make_settings, serve

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


async def _request(client, url, i, stream):
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": f"Say a word about {i}."}],
            "max_tokens": 8, "temperature": 0, "stream": stream}
    if not stream:
        response = await client.post(f"{url}/v1/chat/completions", json=body)
        return response.status_code, response.json()["choices"][0]["finish_reason"] if response.is_success else None
    finish = None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"finish_reason": "' in line:
                finish = line.split('"finish_reason": "')[1].split('"')[0]
        return response.status_code, finish


def test_concurrency_sweep_to_32_clients_has_no_failures(live_server):
    async def sweep(n):
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(_request(client, live_server.url, i, i % 2 == 0) for i in range(n)))

    for n in (1, 4, 16, 32):
        results = asyncio.run(sweep(n))
        assert all(code == 200 for code, _ in results), (n, results)
        assert all(finish in ("stop", "length") for _, finish in results), (n, results)


def test_three_times_overload_is_refused_fast_and_admitted_requests_finish(tiny_model_dir, tmp_path, embedder):
    spec = spec_from_dict({"name": "tiny", "version": "1", "source": "local", "location": str(tiny_model_dir)})
    context = BackendContext(cache_dir=tmp_path / "m", device="cpu",
                             engine=EngineConfig(max_batch_size=2, queue_size=2, kv_cache_bytes=8 * 2**20))
    pool = ModelPool(Catalog([spec]), context, budget_bytes=10**9)
    pool.load("tiny")
    server = serve(build_services(make_settings(tmp_path / "d"), pool=pool, embedder=embedder), with_ui=False)

    async def burst():
        body = {"model": "tiny", "prompt": "hello world", "max_tokens": 3000, "temperature": 0}
        async with httpx.AsyncClient(timeout=120) as client:
            async def one():
                started = time.monotonic()
                response = await client.post(f"{server.url}/v1/completions", json=body)
                return response, time.monotonic() - started
            return await asyncio.gather(*(one() for _ in range(12)))

    try:
        results = asyncio.run(burst())
        admitted = [r for r, _ in results if r.status_code == 200]
        refused = [(r, t) for r, t in results if r.status_code != 200]
        assert len(admitted) == 4 and len(refused) == 8  # capacity: 2 running + 2 queued
        assert all(r.status_code == 503 and int(r.headers["retry-after"]) >= 1 for r, _ in refused)
        assert max(t for _, t in refused) < min(t for r, t in results if r.status_code == 200)  # refused fast
        assert all(r.json()["choices"][0]["finish_reason"] == "length" for r in admitted)
        deadline = time.monotonic() + 5
        while pool.in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool.in_flight() == 0
    finally:
        server.stop()
        pool.shutdown()


def test_pool_thrash_three_models_in_a_budget_for_two_fails_nothing(tiny_model_dir, tmp_path):
    specs = [spec_from_dict({"name": n, "version": "1", "source": "local", "location": str(tiny_model_dir)})
             for n in ("a", "b", "c")]
    context = BackendContext(cache_dir=tmp_path, device="cpu", engine=EngineConfig(kv_cache_bytes=2 * 2**20))
    pool = ModelPool(Catalog(specs), context, budget_bytes=10**12, load_timeout=120)
    pool.load("a")
    pool.budget = int(pool.status("a")["resident_bytes"] * 2.5)
    params = GenerationParams.validated(temperature=0, max_new_tokens=60)
    errors, done = [], []

    def client(i):
        for round_ in range(6):
            model = "abc"[(i + round_) % 3]
            try:
                final = pool.submit(model, GenerationRequest(params, messages=[Message("user", "hello")])).result(120)
                done.append(final.model)
            except Exception as exc:  # noqa: BLE001
                errors.append((model, exc))
            assert pool.resident_bytes() <= pool.budget

    import threading
    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert not errors, errors[:3]
        assert len(done) == 36 and {m.split("@")[0] for m in done} == {"a", "b", "c"}
    finally:
        pool.shutdown()


def test_same_greedy_request_at_once_gives_identical_answers_and_streaming_matches(live_server):
    body = {"model": CHAT_MODEL, "messages": QUESTION, "max_tokens": 40, "temperature": 0}

    async def four():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{live_server.url}/v1/chat/completions", json=body)
                                          for _ in range(4)))

    texts = [r.json()["choices"][0]["message"]["content"] for r in asyncio.run(four())]
    assert len(set(texts)) == 1
    streamed = ""
    with httpx.stream("POST", f"{live_server.url}/v1/chat/completions", json={**body, "stream": True},
                      timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                import json
                event = json.loads(line[6:])
                if event.get("choices"):
                    streamed += event["choices"][0]["delta"].get("content") or ""
    assert streamed == texts[0]
