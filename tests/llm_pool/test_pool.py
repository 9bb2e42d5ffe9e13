"""The pool's residency rules, with a tiny random-weight Llama (a fake for mechanics: eviction
order, busy and pinned models, single-flight loads, hot-swap, failed loads)."""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from llm_pool import (
    Catalog,
    EngineConfig,
    GenerationParams,
    GenerationRequest,
    Message,
    ModelLoadError,
    ModelPool,
    spec_from_dict,
)
from llm_pool.backends import BackendContext, create_backend
from llm_pool.errors import ConflictError, InsufficientMemoryError

GREEDY = GenerationParams.validated(temperature=0, max_new_tokens=5)


def tiny_spec(name: str, folder: Path, version: str = "v1"):
    return spec_from_dict({"name": name, "version": version, "source": "local",
                           "location": str(folder), "kind": "chat"})


class CountingFactory:
    """The real backend factory, counting how often each model's weights are loaded."""

    def __init__(self):
        self.loads: Counter[str] = Counter()

    def __call__(self, spec, context):
        backend = create_backend(spec, context)
        original = backend.load

        def load(progress):
            self.loads[spec.key] += 1
            return original(progress)

        backend.load = load
        return backend


@pytest.fixture
def make_pool(tiny_model_dir, tmp_path):
    pools = []

    def build(names=("a", "b", "c"), models_that_fit: float = 2.5, extra_specs=()):
        specs = [tiny_spec(n, tiny_model_dir) for n in names] + list(extra_specs)
        factory = CountingFactory()
        context = BackendContext(cache_dir=tmp_path / "cache", device="cpu",
                                 engine=EngineConfig(kv_cache_bytes=2 * 2**20, max_batch_size=8))
        pool = ModelPool(Catalog(specs), context, budget_bytes=10**12, backend_factory=factory)
        pool.load(names[0])
        size = pool.status(names[0])["resident_bytes"]
        pool.budget = int(size * models_that_fit)
        pools.append(pool)
        return pool, factory

    yield build
    for pool in pools:
        pool.shutdown()


def ask(pool, model, max_new_tokens=5, text="hello world"):
    params = GenerationParams.validated(temperature=0, max_new_tokens=max_new_tokens)
    return pool.submit(model, GenerationRequest(params, messages=[Message("user", text)]))


def states(pool, *names):
    return [pool.status(n)["state"] for n in names]


def test_loading_beyond_budget_evicts_least_recently_used_idle_model(make_pool):
    pool, _ = make_pool()
    pool.load("b")
    ask(pool, "a").result(30)  # a is now more recently used than b
    pool.load("c")
    assert states(pool, "a", "b", "c") == ["ready", "unloaded", "ready"]
    assert pool.resident_bytes() <= pool.budget


def test_busy_and_pinned_models_are_never_evicted(make_pool):
    pool, _ = make_pool()
    pool.load("b")
    long_request = ask(pool, "a", max_new_tokens=4000)  # a: busy, and least recently used below
    ask(pool, "b").result(30)
    assert pool.status("a")["in_flight"] == 1
    pool.load("c")
    assert states(pool, "a", "b", "c") == ["ready", "unloaded", "ready"]

    pool.pin("c")
    before = {n: pool.status(n)["state"] for n in "abc"}
    with pytest.raises(InsufficientMemoryError) as info:
        pool.load("b")  # a is busy, c is pinned: nothing can make room
    assert "pinned" in info.value.message and "busy" in info.value.message
    assert {n: pool.status(n)["state"] for n in "ac"} == {"a": before["a"], "c": before["c"]}
    assert pool.status("b")["state"] == "failed"
    assert pool.resident_bytes() <= pool.budget
    long_request.cancel()
    assert long_request.result(10).reason == "cancelled"


def test_request_for_unloaded_model_loads_it_once_for_all_waiters(make_pool):
    pool, factory = make_pool()
    barrier = threading.Barrier(8)
    results, errors = [], []

    def client():
        barrier.wait()
        try:
            results.append(ask(pool, "b").result(60))
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert len(results) == 8 and all(r.reason in ("length", "stop") for r in results)
    assert factory.loads["b@v1"] == 1


def test_hot_swap_under_continuous_requests_loses_none(make_pool, tiny_model_dir):
    v2 = tiny_spec("a", tiny_model_dir, version="v2")
    pool, _ = make_pool(names=("a",), models_that_fit=3, extra_specs=[v2])
    stop, served, errors = threading.Event(), [], []

    def client():
        while not stop.is_set():
            try:
                served.append(ask(pool, "a").result(30).model)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    pool.swap("a", "v2")
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert not errors, errors[:3]
    assert "a@v1" in served and "a@v2" in served
    assert served[-1] == "a@v2"
    assert pool.status("a")["version"] == "v2"
    deadline = time.monotonic() + 10
    while pool.status("a@v1")["state"] != "unloaded" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.status("a@v1")["state"] == "unloaded"  # drained, then unloaded

    pool.rollback("a")
    assert pool.status("a")["version"] == "v1"
    assert ask(pool, "a").result(30).model == "a@v1"


def test_failed_load_leaves_the_pool_as_it_was_and_the_next_load_works(make_pool, tiny_model_dir, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated file
    missing = tiny_spec("missing", tmp_path / "no-such-folder")
    pool, _ = make_pool(names=("a", "b"), extra_specs=[tiny_spec("broken", broken), missing])
    pool.load("b")
    before = (pool.resident_bytes(), states(pool, "a", "b"))

    with pytest.raises(ModelLoadError, match="not a valid safetensors"):
        pool.load("broken")
    with pytest.raises(ModelLoadError, match="no config.json"):
        pool.load("missing")
    assert (pool.resident_bytes(), states(pool, "a", "b")) == before
    assert "safetensors" in pool.status("broken")["error"]

    shutil.copy(tiny_model_dir / "model.safetensors", weights)  # repaired
    pool.load("broken")
    assert pool.status("broken")["state"] == "ready"
    assert ask(pool, "broken").result(30).reason in ("length", "stop")


def test_model_larger_than_the_budget_fails_clearly(make_pool):
    pool, _ = make_pool(names=("a", "b"), models_that_fit=0.5)
    pool.unload("a")
    with pytest.raises(InsufficientMemoryError, match="budget"):
        pool.load("b")
    assert pool.resident_bytes() == 0


def test_unload_refuses_pinned_model_and_unpin_allows_it(make_pool):
    pool, _ = make_pool(names=("a",))
    pool.pin("a")
    with pytest.raises(ConflictError, match="pinned"):
        pool.unload("a")
    pool.unpin("a")
    assert pool.unload("a")["state"] == "unloaded"
    assert ask(pool, "a").result(30).reason in ("length", "stop")  # loads again on demand
