"""Faults inside the engine and the pool end every admitted request: with a finish reason or an
error, never a stream that hangs. Slots and in-flight counts return to zero and the next request
works. Faults are injected with `llm_pool.faults` (a named step raises) into the real engine
running the tiny random-weight Llama (a fake for mechanics)."""

from __future__ import annotations

import threading
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
    ShoalError,
    faults,
    spec_from_dict,
)
from llm_pool.backends import BackendContext
from llm_pool.stream import Failed


@pytest.fixture(params=["ragged", "padded"])
def tiny_pool(request, tiny_model_dir, tmp_path):
    """Both KV layouts of the transformers engine: ragged (the default) and padded (the fallback
    for models whose attention the ragged layout cannot run)."""
    spec = spec_from_dict({"name": "tiny", "version": "1", "source": "local", "location": str(tiny_model_dir)})
    context = BackendContext(cache_dir=tmp_path / "cache", device="cpu",
                             engine=EngineConfig(max_batch_size=4, queue_size=16, kv_cache_bytes=8 * 2**20,
                                                 layout=request.param))
    pool = ModelPool(Catalog([spec]), context, 10**10)
    pool.load("tiny")
    assert engine_of(pool).layout == request.param
    yield pool
    faults.disarm_all()
    pool.shutdown()


def ask(pool, words: int = 3, max_new: int = 40):
    text = " ".join(f"w{i}" for i in range(words))
    params = GenerationParams.validated(temperature=0, max_new_tokens=max_new)
    return pool.submit("tiny", GenerationRequest(params, messages=[Message("user", text)]))


def engine_of(pool):
    return pool.backend("tiny").engine


def final_of(handle, within: float = 30):
    """The last event: Finished, or Failed (which result() raises). A hang fails here."""
    try:
        handle.result(within)
    except ShoalError:
        pass
    assert handle.done, f"{handle.id} never ended"
    return handle.final


def assert_all_ended_and_idle(pool, handles, within: float = 30) -> list:
    finals = [final_of(h, within) for h in handles]
    assert all(isinstance(f, (Finished, Failed)) for f in finals)
    deadline = time.monotonic() + within
    while (pool.in_flight() or engine_of(pool)._active) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.in_flight() == 0 and engine_of(pool)._active == 0
    assert not engine_of(pool)._owned and not engine_of(pool)._rows
    after = ask(pool, max_new=5).result(30)  # and the model still answers
    assert isinstance(after, Finished) and after.usage.completion_tokens == 5
    return finals


@pytest.mark.parametrize("point", ["engine.step", "engine.prefill", "engine.remove_rows"])
def test_a_failing_engine_step_ends_every_request_and_frees_every_slot(tiny_pool, point):
    handles = [ask(tiny_pool, words=n + 2, max_new=30 + 5 * n) for n in range(6)]  # 4 run, 2 wait
    time.sleep(0.05)
    faults.arm(point, times=1)
    finals = assert_all_ended_and_idle(tiny_pool, handles)
    assert any(isinstance(f, Failed) for f in finals)  # the fault happened and was reported
    failed = [f for f in finals if isinstance(f, Failed)]
    assert all("injected fault" in f.error.message for f in failed)


def test_a_row_leaving_while_the_batch_is_rebuilt_is_not_orphaned(tiny_pool):
    """The finding: `_remove_rows` dropped leaving rows from the batch before rebuilding the
    cache; a failure in between left their requests waiting forever."""
    short = [ask(tiny_pool, max_new=3) for _ in range(2)]
    long = [ask(tiny_pool, max_new=200) for _ in range(2)]
    faults.arm("engine.remove_rows", times=1)
    assert_all_ended_and_idle(tiny_pool, short + long)


def test_failing_callbacks_do_not_stop_the_batch(tiny_pool):
    """A completion callback that raises is logged; neither its request nor the others lose anything."""
    first = ask(tiny_pool, max_new=4)
    first.on_done(lambda handle: 1 / 0)
    others = [ask(tiny_pool, max_new=30) for _ in range(3)]
    finals = assert_all_ended_and_idle(tiny_pool, [first, *others])
    assert all(isinstance(f, Finished) for f in finals)


def test_a_slow_callback_runs_beside_the_batch_not_inside_it(tiny_pool):
    """A callback is the caller's code; the chat store's is moved to a thread of its own. This
    measures that the engine keeps stepping while another request's callback of 0.5 s runs."""
    started = threading.Event()

    def slow(handle):
        started.set()
        time.sleep(0.5)

    quick = ask(tiny_pool, max_new=2)
    long = ask(tiny_pool, max_new=300)
    quick.on_done(lambda h: threading.Thread(target=slow, args=(h,), daemon=True).start())
    assert isinstance(final_of(long), Finished) and started.is_set()


def test_a_load_failing_half_way_leaves_a_failed_model_and_a_working_reload(tiny_model_dir, tmp_path):
    spec = spec_from_dict({"name": "tiny", "version": "1", "source": "local", "location": str(tiny_model_dir)})
    pool = ModelPool(Catalog([spec]), BackendContext(cache_dir=tmp_path, device="cpu"), 10**10)
    try:
        faults.arm("pool.load", times=1)
        with pytest.raises(Exception, match="injected fault"):
            pool.load("tiny")
        status = pool.status("tiny")
        assert status["state"] == "failed" and status["resident_bytes"] == 0 and pool.resident_bytes() == 0
        assert pool.load("tiny")["state"] == "ready"
        assert isinstance(ask(pool, max_new=3).result(30), Finished)
    finally:
        faults.disarm_all()
        pool.shutdown()


def test_a_request_as_long_as_the_kv_budget_allows_is_served(tiny_model_dir, tmp_path):
    """The finding: `submit` accepted prompt + max_new equal to `max_request_tokens`, which the
    batch's reservation (one position more) never fitted: that job, and every job queued behind
    it, waited until the queue timeout."""
    spec = spec_from_dict({"name": "tiny", "version": "1", "source": "local", "location": str(tiny_model_dir)})
    context = BackendContext(cache_dir=tmp_path, device="cpu",
                             engine=EngineConfig(kv_cache_bytes=2**16, queue_timeout=20))
    pool = ModelPool(Catalog([spec]), context, 10**10)
    try:
        pool.load("tiny")
        limit = engine_of(pool).max_request_tokens
        assert limit < 4096  # the KV budget binds, not the context window
        prompt = " ".join(["w1"] * 8)
        prompt_tokens = len(pool.backend("tiny").prompt_ids(
            GenerationRequest(GenerationParams(), messages=[Message("user", prompt)])))
        params = GenerationParams.validated(temperature=0, max_new_tokens=limit - prompt_tokens)
        biggest = pool.submit("tiny", GenerationRequest(params, messages=[Message("user", prompt)]))
        behind = ask(pool, max_new=3)
        assert isinstance(biggest.result(60), Finished) and biggest.result().reason == "length"
        assert isinstance(behind.result(60), Finished)
    finally:
        pool.shutdown()


def test_stop_that_times_out_leaves_the_running_step_its_buffers(tiny_pool):
    """The finding: stop() freed the batch's buffers after its join timed out, while a step could
    still be using them. Now the step keeps them and frees them when the thread ends; every
    request still ends."""
    engine = engine_of(tiny_pool)
    original = engine._step
    in_step = threading.Event()

    def slow_step():
        in_step.set()
        time.sleep(0.5)
        original()

    engine._step = slow_step
    handles = [ask(tiny_pool, max_new=50) for _ in range(2)]
    assert in_step.wait(10)
    engine.stop(timeout=0.05)
    assert engine._thread.is_alive() and engine.holds_kv  # not pulled from under the step
    for handle in handles:
        assert final_of(handle) is not None
    engine._thread.join(10)
    assert not engine._thread.is_alive() and not engine.holds_kv and engine._active == 0
