"""Rate limits (and uploads per minute) shared by replicas through a real Redis (`--redis-url`): two
Shoal servers on one Redis count one limit per client; without Redis each counts its own; a hung or dead Redis admits
(fail open) without stalling requests."""

from __future__ import annotations

import os
import signal
import time
import uuid

import httpx
import pytest

from llm_pool.errors import RateLimitedError
from service import build_services
from service.limits import RedisRateLimiter
from tests.conftest import CHAT_MODEL, RedisProcess, make_settings, serve


def _key(name: str) -> str:
    return f"sk-{name}-{uuid.uuid4().hex[:12]}"  # fresh per run: the session's Redis outlives a test


def _ask(server, key: str) -> httpx.Response:
    """A cheap request through the limiter: one generated token."""
    return httpx.post(f"{server.url}/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                      json={"model": CHAT_MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]})


@pytest.fixture
def replicas(pool, embedder, tmp_path):
    """start(redis_url, keys) -> two Shoal servers (own data dirs, one loaded model) with
    --rate-limit-rpm 2 (and `settings`, if any); stopped at the end."""
    started = []

    def start(redis_url: str | None, keys: list[str], rpm: float = 2, **settings):
        servers = []
        for name in ("a", "b"):
            services = build_services(make_settings(tmp_path / name, api_keys=keys, rate_limit_rpm=rpm,
                                                    redis_url=redis_url, **settings), pool=pool, embedder=embedder)
            servers.append(serve(services, with_ui=False))
            started.append((servers[-1], services))
        return servers

    yield start
    for server, services in started:
        server.stop()
        services.documents.close()  # indexing of uploaded files, if any
        services.store.close()
        close = getattr(services.limiter, "close", None)
        if close:
            close()


def test_replicas_on_one_redis_share_each_clients_limit(replicas, redis_server):
    alice, bob = _key("alice"), _key("bob")
    a, b = replicas(redis_server, [alice, bob])
    assert _ask(a, alice).status_code == 200
    assert _ask(b, alice).status_code == 200
    for server in (a, b):  # two in all, whichever replica they reached
        third = _ask(server, alice)
        assert third.status_code == 429, third.text
        assert "Request rate limit reached (2 requests per minute)" in third.text
        assert 20 <= int(third.headers["Retry-After"]) <= 30
    assert [_ask(b, bob).status_code, _ask(a, bob).status_code, _ask(a, bob).status_code] == [200, 200, 429]


def test_without_redis_each_replica_counts_its_own(replicas):
    """Today's behaviour, for contrast: --rate-limit-rpm 2 is two per process, four in all."""
    alice = _key("alice")
    a, b = replicas(None, [alice])
    assert [_ask(a, alice).status_code for _ in range(3)] == [200, 200, 429]
    assert [_ask(b, alice).status_code for _ in range(3)] == [200, 200, 429]


def test_a_hung_or_dead_redis_admits_without_stalling(replicas, tmp_path):
    redis = RedisProcess(tmp_path / "redis")
    try:
        alice = _key("alice")
        a, b = replicas(redis.url, [alice], rpm=1)
        started = time.monotonic()
        first = _ask(a, alice).status_code
        baseline = time.monotonic() - started  # a request here, now (slower on a busy machine)
        assert [first, _ask(b, alice).status_code] == [200, 429]  # shared while up
        os.kill(redis.process.pid, signal.SIGSTOP)  # hung: connections open, nothing answers
        for state in ("hung", "dead"):
            for server in (a, b, a, b):
                started = time.monotonic()
                response = _ask(server, alice)
                assert response.status_code == 200, (state, response.text)
                # each Redis call waits 0.5 s at most, then Redis is left alone for 2 s
                assert time.monotonic() - started < baseline + 1.5, state
            if state == "hung":
                redis.process.kill()  # SIGKILL ends a stopped process too
                redis.process.wait(10)
    finally:
        redis.stop()


def test_buckets_live_in_redis_under_hashed_ids_and_expire(redis_server):
    """The limiter on its own: token bucket (peek, charge) and request bucket (take), keys that do
    not hold the client id, and expiry once a bucket would be full again."""
    import redis

    limiter = RedisRateLimiter(redis_server, requests_per_minute=60, tokens_per_minute=100)
    client = f"key-{uuid.uuid4().hex[:16]}"
    store = redis.Redis.from_url(redis_server)
    try:
        limiter.admit(client)
        limiter.charge_tokens(client, 150)  # 100 - 150: empty for ~30 s
        with pytest.raises(RateLimitedError) as limited:
            limiter.admit(client)
        assert "Token rate limit reached (100 generated tokens per minute)" in str(limited.value)
        assert 25 <= limited.value.retry_after <= 31
        keys = sorted(k.decode() for k in store.keys(f"shoal:rl:*{limiter.key('tokens', client)[-32:]}"))
        assert keys == [limiter.key("requests", client), limiter.key("tokens", client)]
        assert not any(client in k.decode() for k in store.keys("shoal:rl:*"))
        assert 1_000 < store.pttl(limiter.key("requests", client)) <= 3_000  # 1 of 60 taken: ~1 s to refill
        assert 80_000 < store.pttl(limiter.key("tokens", client)) <= 91_000  # 150 short of full
    finally:
        limiter.close()
        store.close()


def test_replicas_on_one_redis_share_each_users_uploads_per_minute(replicas, redis_server):
    """--max-uploads-per-minute 2 with Redis: two uploads in all, whichever replicas they reach."""
    carol = _key("carol")
    a, b = replicas(redis_server, [carol], rpm=0, max_uploads_per_minute=2, min_free_disk_mb=0)
    headers = {"Authorization": f"Bearer {carol}"}

    def upload(server) -> httpx.Response:  # to a session of carol's on that replica (each has its own data dir)
        sid = httpx.post(f"{server.url}/v1/sessions", headers=headers, json={"model": CHAT_MODEL},
                         timeout=30).json()["id"]
        return httpx.post(f"{server.url}/v1/sessions/{sid}/files", headers=headers, timeout=60,
                          files={"file": ("notes.txt", b"Uploads are counted once for all replicas.\n")})

    assert [upload(a).status_code, upload(b).status_code] == [202, 202]
    third = upload(a)
    assert third.status_code == 429, third.text
    error = third.json()["error"]
    assert error["code"] == "too_many_uploads" and "--max-uploads-per-minute" in error["message"], error
    assert 20 <= int(third.headers["Retry-After"]) <= 31
