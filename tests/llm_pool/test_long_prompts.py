"""Long prompts do not stall everyone: the ragged layout reads a prompt in chunks inside the
running batch's steps (the streams already running keep getting tokens meanwhile), and a request
that does not fit the KV budget yet lets smaller ones pass for a while instead of blocking the
queue. Run on the tiny random-weight Llama (a fake for scheduling mechanics); the order of events
is recorded on the engine thread itself, so nothing here depends on timing."""

from __future__ import annotations

import time

import pytest

from llm_pool import (
    Catalog,
    EngineConfig,
    Finished,
    GenerationParams,
    GenerationRequest,
    Message,
    ModelPool,
    TextDelta,
    spec_from_dict,
)
from llm_pool.backends import BackendContext

BYTES_PER_TOKEN = 256  # the tiny Llama: 2 layers x (keys + values) x 1 head x 16 dims x 4 bytes


def tiny_pool(folder, tmp_path, **engine) -> ModelPool:
    spec = spec_from_dict({"name": "tiny", "version": "1", "source": "local", "location": str(folder)})
    config = EngineConfig(max_batch_size=4, queue_size=16, **engine)
    pool = ModelPool(Catalog([spec]), BackendContext(cache_dir=tmp_path / "cache", device="cpu", engine=config), 10**10)
    pool.load("tiny")
    assert pool.backend("tiny").engine.bytes_per_token == BYTES_PER_TOKEN
    return pool


def ask(pool, words: int, max_new: int):
    text = " ".join(f"w{i % 60}" for i in range(words))
    params = GenerationParams.validated(temperature=0, max_new_tokens=max_new)
    return pool.submit("tiny", GenerationRequest(params, messages=[Message("user", text)]))


def record(handle, name: str, log: list) -> None:
    """Append (name, tokens) to `log` for each of the handle's deltas and (name, "end") for its
    finish, as the engine sends them."""
    push = handle.push

    def logged(event):
        if isinstance(event, TextDelta):
            log.append((name, len(event.token_ids)))
        elif isinstance(event, Finished):
            log.append((name, "end"))
        push(event)
    handle.push = logged


def started(handle, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while handle.first_token_at is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handle.first_token_at is not None


@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_a_running_stream_keeps_getting_tokens_while_a_long_prompt_is_read(tiny_model_dir, tmp_path, layout):
    pool = tiny_pool(tiny_model_dir, tmp_path, layout=layout, prefill_chunk=16, kv_cache_bytes=8 * 2**20)
    try:
        running = ask(pool, words=3, max_new=3000)
        started(running)
        log: list = []
        record(running, "running", log)
        long = ask(pool, words=400, max_new=2)
        record(long, "long", log)
        assert long.result(60).usage.prompt_tokens > 400
        first = next(i for i, (name, _) in enumerate(log) if name == "long")
        meanwhile = sum(n for name, n in log[:first] if name == "running")
        if layout == "ragged":
            # ~400 prompt tokens at 16 per step: the running stream got a token at every one of
            # those steps, not a pause as long as the whole prompt's prefill
            assert meanwhile >= 400 // 16 - 1
        else:
            assert meanwhile <= 2  # the padded layout reads the prompt whole: the stream waits
        running.cancel()
        assert running.result(30).reason == "cancelled"
    finally:
        pool.shutdown()


@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_a_small_request_passes_one_that_does_not_fit_yet(tiny_model_dir, tmp_path, layout):
    # room for ~800 tokens of KV in the batch: the running request (~310) and the big one (~615)
    # do not fit together, the running one and a short one do
    pool = tiny_pool(tiny_model_dir, tmp_path, layout=layout, kv_cache_bytes=int(800 * BYTES_PER_TOKEN / 0.75))
    try:
        running = ask(pool, words=3, max_new=300)
        started(running)
        big = ask(pool, words=600, max_new=10)
        short = ask(pool, words=3, max_new=5)
        assert short.result(60).usage.completion_tokens == 5
        assert big.first_token_at is None  # still waiting for room: the short one went first
        assert running.result(120).reason == "length"
        assert big.result(60).usage.completion_tokens == 10  # and it ran once there was room
    finally:
        pool.shutdown()


def test_once_it_has_waited_its_turn_nobody_passes_it(tiny_model_dir, tmp_path):
    pool = tiny_pool(tiny_model_dir, tmp_path, kv_cache_bytes=int(800 * BYTES_PER_TOKEN / 0.75), bypass_seconds=0)
    try:
        running = ask(pool, words=3, max_new=300)
        started(running)
        log: list = []
        record(running, "running", log)
        big = ask(pool, words=600, max_new=10)
        time.sleep(0.05)
        short = ask(pool, words=3, max_new=5)
        record(short, "short", log)
        running.result(120)
        assert big.result(60).usage.completion_tokens == 10 and short.result(60).usage.completion_tokens == 5
        # the short one could have run beside the running one, but the big one was first in line:
        # it waited with it until there was room for the big one
        assert log.index(("running", "end")) < next(i for i, (name, _) in enumerate(log) if name == "short")
    finally:
        pool.shutdown()
