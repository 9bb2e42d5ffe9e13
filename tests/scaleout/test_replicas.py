"""Scale-out with real Shoal processes on loopback ports: a front node serves a model whose
replicas are two other Shoal nodes (OpenAI protocol) and one of them again over TGI's protocol;
traffic spreads, survives a replica killed mid-run, and returns to it when it comes back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from openai import OpenAI

from llm_pool import Catalog, ModelPool, spec_from_dict
from llm_pool.backends import BackendContext
from service import build_services
from tests.conftest import CHAT_MODEL, MODEL_CACHE, ROOT, free_port, make_settings, serve


class Node:
    """A real `python app.py` process."""

    def __init__(self, tmp_path, name: str, extra: tuple[str, ...] = (), env: dict | None = None):
        self.extra, self.env = list(extra), dict(env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = tmp_path / name
        self.proc: subprocess.Popen | None = None

    def start(self) -> Node:
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "app.py", "--port", str(self.port), "--data-dir", str(self.data),
             "--model-cache-dir", str(MODEL_CACHE), "--preload", f'["{CHAT_MODEL}"]', "--log-level", "warning",
             "--max-batch-size", "4", *self.extra], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"node on {self.port} did not start")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nodes")
    a, b = Node(tmp, "a"), Node(tmp, "b")
    threads = [threading.Thread(target=n.start) for n in (a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def front(nodes, tmp_path_factory, embedder):
    a, b = nodes
    specs = [
        spec_from_dict({"name": "fleet", "version": "1", "source": "openai", "location": f"{a.url}/v1",
                        "replicas": [f"{b.url}/v1"], "remote_model": CHAT_MODEL, "kind": "chat",
                        "context_length": 8192, "options": {"health_interval": 0.5, "timeout": 60}}),
        spec_from_dict({"name": "fleet-tgi", "version": "1", "source": "tgi", "location": b.url, "kind": "completion",
                        "context_length": 8192, "options": {"health_interval": 0.5}}),
    ]
    pool = ModelPool(Catalog(specs), BackendContext(cache_dir=tmp_path_factory.mktemp("cache")), 10**9)
    server = serve(build_services(make_settings(tmp_path_factory.mktemp("front")), pool=pool, embedder=embedder),
                   with_ui=False)
    yield server, pool
    server.stop()
    pool.shutdown()


def ask(url: str, max_tokens: int = 12, stream: bool = True) -> tuple[bool, str | None]:
    """(got a first token, error or None)"""
    client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    got_first = False
    try:
        chunks = client.chat.completions.create(model="fleet", messages=[{"role": "user", "content": "Say hi."}],
                                                max_tokens=max_tokens, temperature=0, stream=True)
        finish = None
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                got_first = True
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return got_first, None if finish in ("stop", "length") else f"no finish reason ({finish})"
    except Exception as exc:  # noqa: BLE001 - reported to the assertion
        return got_first, str(exc)


def test_front_streams_from_remote_replicas_and_spreads_the_load(front):
    server, pool = front
    models = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert {m["id"] for m in models} == {"fleet", "fleet-tgi"}
    results = []
    threads = [threading.Thread(target=lambda: results.append(ask(server.url))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(first and error is None for first, error in results), results
    replicas = pool.backend("fleet").replicas
    assert all(r.served > 0 for r in replicas), [r.public() for r in replicas]
    status = httpx.get(f"{server.url}/v1/models/fleet").json()
    assert status["state"] == "ready" and status["device"] == "remote (openai)"


def test_tgi_protocol_replica_streams_completion(front):
    server, _ = front
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60, json={
            "model": "fleet-tgi", "prompt": "One, two, three,", "max_tokens": 6, "stream": True}) as response:
        texts = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert len(texts) >= 3


def test_killing_a_replica_moves_traffic_and_it_returns(front, nodes):
    server, pool = front
    a, b = nodes
    results: list[tuple[bool, str | None]] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            results.append(ask(server.url, max_tokens=24))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    a.kill()
    time.sleep(6)
    stop.set()
    for thread in threads:
        thread.join(120)
    failed_before_streaming = [r for r in results if r[1] and not r[0]]
    assert not failed_before_streaming, failed_before_streaming
    assert sum(1 for r in results if r[1] is None) >= 6
    replica_a = next(r for r in pool.backend("fleet").replicas if r.url.startswith(a.url))
    assert not replica_a.healthy

    a.start()  # the same port: the front's health checks find it again
    deadline = time.monotonic() + 30
    while not replica_a.healthy and time.monotonic() < deadline:
        time.sleep(0.2)
    assert replica_a.healthy
    served_before = replica_a.served
    for _ in range(4):
        threads = [threading.Thread(target=lambda: results.append(ask(server.url, max_tokens=8))) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert replica_a.served > served_before  # used again
