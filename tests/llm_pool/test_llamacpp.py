"""The llama.cpp engine as the pool manages it, with the real llama-server built by the setup and
the real SmolLM2 GGUF: concurrent requests share its slots and answer as they would alone, a
user's next turn reuses its own prefix, a crash of the engine fails only what was in flight and
the next request loads it again, a swap between engines under load fails nothing, eviction
works across engines, and a first start before llama.cpp is built serves the transformers
version and swaps over when the build is done."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from llm_pool import (
    Catalog,
    EngineConfig,
    Failed,
    Finished,
    GenerationParams,
    GenerationRequest,
    Message,
    ModelPool,
    ShoalError,
    TextDelta,
    llamacpp_build,
)
from llm_pool.backends import BackendContext
from tests.conftest import LLAMA_CHAT, MODEL_CACHE, ROOT, TRANSFORMERS_CHAT

QUESTIONS = ["What is the capital of France? Answer in one word.", "Name three colours.",
             "What is two plus two?", "Write one sentence about cats."]

pytestmark = pytest.mark.skipif(llamacpp_build.find_server() is None,
                                reason="llama.cpp is not built (scripts/setup.sh --dev builds it)")


def request(text: str, scope: str | None = None, **params) -> GenerationRequest:
    params.setdefault("temperature", 0)
    params.setdefault("max_new_tokens", 24)
    return GenerationRequest(GenerationParams.validated(**params), messages=[Message("user", text)],
                             cache_scope=scope)


def own_pool(budget: str | int = 8 * 2**30, **engine) -> ModelPool:
    """A pool of its own (its own llama-server processes), over the real catalog."""
    catalog = Catalog.from_toml(ROOT / "models.toml")
    context = BackendContext(cache_dir=MODEL_CACHE, engine=EngineConfig(**engine))
    return ModelPool(catalog, context, budget if isinstance(budget, int) else int(float(budget) * 2**30))


def test_concurrent_requests_share_the_slots_and_keep_their_own_parameters(pool):
    """llama.cpp's kernels are not batch-invariant: a greedy answer computed beside others may
    differ from the same request alone (as with the bf16 version; the transformers version is the
    reproducible one). What each request asked for holds whatever shares the batch."""
    backend = pool.backend(LLAMA_CHAT) or (pool.load(LLAMA_CHAT) and pool.backend(LLAMA_CHAT))
    handles = [pool.submit(LLAMA_CHAT, request(q, max_new_tokens=40)) for q in QUESTIONS]
    handles += [pool.submit(LLAMA_CHAT, request(QUESTIONS[1], temperature=1.2, seed=3)),
                pool.submit(LLAMA_CHAT, request(QUESTIONS[3], stop=[" "], max_new_tokens=40)),
                pool.submit(LLAMA_CHAT, request(QUESTIONS[2], max_new_tokens=3))]
    together = [h.result(60) for h in handles]
    assert all(f.text.strip() for f in together)
    assert "Paris" in together[0].text
    assert together[5].stopped_by == "stop_sequence" and " " not in together[5].text
    assert together[6].reason == "length" and together[6].usage.completion_tokens == 3
    assert backend.load_stats()["peak_running"] >= 2  # they really ran side by side
    assert backend.load_stats()["running"] == 0


def test_a_users_next_turn_reuses_their_prefix_and_nobody_elses(pool):
    opening = [Message("user", "My cat is called Tom. " * 8 + QUESTIONS[0])]
    params = GenerationParams.validated(temperature=0, max_new_tokens=16)
    first = pool.submit(LLAMA_CHAT, GenerationRequest(params, messages=opening, cache_scope="user:ann")).result(60)
    turn = [*opening, Message("assistant", first.text), Message("user", "And of Germany?")]
    mine = pool.submit(LLAMA_CHAT, GenerationRequest(params, messages=turn, cache_scope="user:ann")).result(60)
    theirs = pool.submit(LLAMA_CHAT, GenerationRequest(params, messages=turn, cache_scope="user:bob")).result(60)
    nobody = pool.submit(LLAMA_CHAT, GenerationRequest(params, messages=turn)).result(60)
    assert mine.usage.cached_tokens >= first.usage.prompt_tokens - 1
    assert theirs.usage.cached_tokens == 0 and nobody.usage.cached_tokens == 0
    assert mine.text.strip() and theirs.text.strip()


def test_cancelling_one_stream_leaves_the_others(pool):
    expected = pool.submit(LLAMA_CHAT, request(QUESTIONS[3], max_new_tokens=40)).result(60).text
    victim = pool.submit(LLAMA_CHAT, request("Write a long poem.", max_new_tokens=400))
    others = [pool.submit(LLAMA_CHAT, request(QUESTIONS[3], max_new_tokens=40)) for _ in range(2)]
    for event in victim:
        if isinstance(event, TextDelta):
            victim.cancel()
            break
    assert victim.result(5).reason == "cancelled"
    assert [h.result(60).text for h in others] == [expected, expected]
    assert pool.backend(LLAMA_CHAT).load_stats()["running"] == 0


def test_a_crashed_engine_fails_what_was_in_flight_and_loads_again_on_the_next_request():
    pool = own_pool()
    try:
        pool.load(LLAMA_CHAT)
        backend = pool.backend(LLAMA_CHAT)
        stream = pool.submit(LLAMA_CHAT, request("Write a very long essay about the sea.", max_new_tokens=2000))
        for event in stream:
            if isinstance(event, TextDelta):
                break
        killed_at = time.monotonic()
        os.kill(backend._server.process.pid, signal.SIGKILL)
        final = None
        for event in stream:  # the stream ends, with an error, within a second
            final = event
        assert isinstance(final, Failed), final
        assert time.monotonic() - killed_at < 1.5
        assert final.error.status == 503 and "llama.cpp stopped" in final.error.message
        assert pool.in_flight() == 0
        answer = pool.submit(LLAMA_CHAT, request(QUESTIONS[0])).result(120)  # loads it again
        assert "Paris" in answer.text
        assert pool.backend(LLAMA_CHAT) is not backend and pool.status(LLAMA_CHAT)["state"] == "ready"
    finally:
        pool.shutdown()


def test_swap_between_engines_under_load_fails_no_request():
    pool = own_pool()
    name = LLAMA_CHAT.split("@")[0]
    results: list[object] = []
    stop = threading.Event()

    def client(n: int) -> None:
        while not stop.is_set():
            try:
                results.append(pool.submit(name, request(QUESTIONS[n % 4], max_new_tokens=12)).result(120))
            except ShoalError as exc:
                results.append(exc)

    try:
        pool.load(LLAMA_CHAT)
        threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        def served_by(version: str, count: int) -> None:
            """Wait (not a fixed time: a loading model slows the other on 2 cores) until `count`
            more requests were answered by `version`."""
            start = len(results)
            deadline = time.monotonic() + 120
            while sum(1 for r in results[start:] if getattr(r, "model", "") == version) < count:
                assert time.monotonic() < deadline, f"no traffic reached {version}"
                time.sleep(0.1)

        served_by(LLAMA_CHAT, 3)
        to_transformers = pool.swap(name, TRANSFORMERS_CHAT.split("@")[1])
        served_by(TRANSFORMERS_CHAT, 3)
        back = pool.swap(name, LLAMA_CHAT.split("@")[1])
        served_by(LLAMA_CHAT, 3)
        stop.set()
        for thread in threads:
            thread.join(120)
        assert to_transformers["engine"] == "transformers" and back["engine"] == "llama.cpp"
        failures = [r for r in results if not isinstance(r, Finished)]
        assert not failures and len(results) >= 9
        deadline = time.monotonic() + 30  # the retired version unloads once idle
        while pool.status(TRANSFORMERS_CHAT)["state"] != "unloaded" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pool.status(TRANSFORMERS_CHAT)["state"] == "unloaded"
    finally:
        stop.set()
        pool.shutdown()


def test_eviction_works_across_engines_and_stops_the_engine_process():
    probe = own_pool()
    try:
        probe.load(LLAMA_CHAT)
        llama_bytes = probe.status(LLAMA_CHAT)["resident_bytes"]
    finally:
        probe.shutdown()
    pool = own_pool(budget=llama_bytes + 2**30)  # room for either, not both (fp32 SmolLM2 is ~1.07 GB)
    try:
        pool.load(LLAMA_CHAT)
        process = pool.backend(LLAMA_CHAT)._server.process
        pool.load(TRANSFORMERS_CHAT)
        assert pool.status(LLAMA_CHAT)["state"] == "unloaded"
        assert process.poll() is not None  # the server process is gone, its memory with it
        pool.load(LLAMA_CHAT)
        assert pool.status(TRANSFORMERS_CHAT)["state"] == "unloaded"
        assert "Paris" in pool.submit(LLAMA_CHAT, request(QUESTIONS[0])).result(60).text
    finally:
        pool.shutdown()


def test_a_long_prompt_is_read_in_steps_beside_running_streams_and_a_short_one_goes_first():
    """A KV per slot (the budget holds the window for each slot), and a long prompt arriving
    beside a running stream read half a batch (128 tokens) per step: the stream keeps getting
    a token per step while a ~3k-token prompt is read, and a short request sent after the long one
    gets its answer before the long one's first token. The pieces are not counted as cached
    tokens. The order is recorded as the engine hands out tokens, not timed."""
    pool = own_pool(max_batch_size=4, llamacpp_kv_bytes=2**30)
    try:
        pool.load(LLAMA_CHAT)
        info = pool.backend(LLAMA_CHAT).info()
        assert info["kv_layout"] == "per-slot" and info["kv_tokens"] == 4 * 8192
        log: list[str] = []

        def recorded(handle, name):
            push = handle.push

            def logged(event):
                if isinstance(event, TextDelta):
                    log.append(name)
                push(event)
            handle.push = logged
            return handle

        running = recorded(pool.submit(LLAMA_CHAT, request("Tell me a long story about a lighthouse keeper.",
                                                           max_new_tokens=3000)), "running")
        while not log:
            time.sleep(0.01)
        text = " ".join(f"item {i} is on the list." for i in range(450))
        long = recorded(pool.submit(LLAMA_CHAT, request(f"Summarize: {text}", max_new_tokens=2)), "long")
        time.sleep(0.5)
        short = recorded(pool.submit(LLAMA_CHAT, request("Say hi.", max_new_tokens=2)), "short")
        usage = long.result(300).usage
        prompt = usage.prompt_tokens
        assert short.result(60).usage.completion_tokens == 2
        assert prompt > 2500 and usage.cached_tokens == 0
        first_long = log.index("long")
        assert log.index("short") < first_long  # the short prompt did not wait behind the long one
        # about one token of the running stream per 128 prompt tokens; reading 256 per step (all
        # of a step's batch) would give at most prompt // 256 + a few, a whole-prompt step ~1
        assert log[:first_long].count("running") >= prompt // 128 * 3 // 4
        running.cancel()
    finally:
        pool.shutdown()


def test_models_show_their_engine_and_its_memory(pool):
    pool.load(LLAMA_CHAT)
    status = pool.status(LLAMA_CHAT)
    assert status["engine"] == "llama.cpp" and pool.status(TRANSFORMERS_CHAT)["engine"] == "transformers"
    assert status["context_length"] == 8192
    weights = os.path.getsize(pool.backend(LLAMA_CHAT)._gguf)
    # weights + the KV it allocated (a KV per slot: the session's 8 GB budget holds 16 x 8192 tokens),
    # measured in llama-server's process, within what the pool counts for it
    backend = pool.backend(LLAMA_CHAT)
    assert backend.info()["kv_layout"] == "per-slot"
    assert weights < status["resident_bytes"] <= backend.estimate_bytes() * 1.1


def test_a_first_start_serves_transformers_while_llama_cpp_builds_then_swaps(tmp_path, monkeypatch, embedder):
    """The build itself is replaced by a wait (what this test is about is the hand-over); the binary
    it then returns is the real one."""
    from service import build_services
    from tests.conftest import make_settings

    real = llamacpp_build.find_server()
    release = threading.Event()
    monkeypatch.setattr(llamacpp_build, "find_server", lambda: real if release.is_set() else None)

    def build(report=None, jobs=None):
        release.wait(120)
        return real

    monkeypatch.setattr(llamacpp_build, "build", build)
    services = build_services(make_settings(tmp_path / "data", preload=None), embedder=embedder)
    try:
        services.preload()
        name = LLAMA_CHAT.split("@")[0]
        assert services.pool.status(name)["version"] == TRANSFORMERS_CHAT.split("@")[1]
        answer = services.pool.submit(name, request(QUESTIONS[0])).result(300)
        assert "Paris" in answer.text and answer.model == TRANSFORMERS_CHAT
        release.set()
        deadline = time.monotonic() + 120
        while services.pool.status(name)["engine"] != "llama.cpp" and time.monotonic() < deadline:
            time.sleep(0.2)
        status = services.pool.status(name)
        assert status["version"] == LLAMA_CHAT.split("@")[1] and status["state"] == "ready"
        assert services.pool.submit(name, request(QUESTIONS[0])).result(60).model == LLAMA_CHAT
        state = (tmp_path / "data" / "pool-state.json").read_text()
        assert TRANSFORMERS_CHAT.split("@")[1] not in state  # the stand-in was never the operator's choice
    finally:
        services.close()
