"""Per-client rate limits: token buckets on requests and on generated tokens.

A client is an API key, or an IP address when keys are off. The request bucket holds up to a
minute's worth of requests and refills continuously; the token bucket is charged with the tokens a
request actually generated, after it finishes, and admits new requests only while it is positive.
Either empty bucket answers `RateLimitedError` (429) with the seconds until it refills.

`RateLimiter` keeps the buckets in this process; `RedisRateLimiter` keeps them in Redis
(`--redis-url`), so replicas behind a load balancer share one limit per client.
`RedisBuckets` is that Redis side on its own; `Quotas` counts uploads per minute with it too.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass

from llm_pool.errors import RateLimitedError

log = logging.getLogger("shoal")


def token_limit_reached(tpm: float, level: float) -> RateLimitedError:
    """The 429 of an empty token bucket at `level` (<= 0), with the seconds until it reaches 1."""
    wait = (1 - level) * 60 / tpm
    return RateLimitedError(f"Token rate limit reached ({tpm:g} generated tokens per minute); "
                            f"retry in {wait:.0f} s.", retry_after=wait)


def request_limit_reached(rpm: float, level: float) -> RateLimitedError:
    """The 429 of a request bucket at `level` (< 1), with the seconds until it holds one request."""
    wait = (1 - level) * 60 / rpm
    return RateLimitedError(f"Request rate limit reached ({rpm:g} requests per minute); "
                            f"retry in {wait:.0f} s.", retry_after=wait)


@dataclass
class _Bucket:
    level: float
    stamp: float


class RateLimiter:
    def __init__(self, requests_per_minute: float = 0, tokens_per_minute: float = 0,
                 clock=time.monotonic, max_clients: int = 100_000):
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self._clock = clock
        self._lock = threading.Lock()
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}
        self._max_clients = max_clients

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def _refill(self, table: dict[str, _Bucket], client: str, per_minute: float) -> _Bucket:
        now = self._clock()
        bucket = table.get(client)
        if bucket is None:
            if len(table) >= self._max_clients:  # forget full buckets of idle clients
                for key in [k for k, b in table.items() if b.level >= per_minute][: len(table) // 2]:
                    del table[key]
            bucket = table[client] = _Bucket(per_minute, now)
        bucket.level = min(per_minute, bucket.level + (now - bucket.stamp) * per_minute / 60)
        bucket.stamp = now
        return bucket

    def admit(self, client: str) -> None:
        """Take one request from the client's buckets, or raise RateLimitedError."""
        with self._lock:
            if self.tpm:
                tokens = self._refill(self._tokens, client, self.tpm)
                if tokens.level <= 0:
                    raise token_limit_reached(self.tpm, tokens.level)
            if self.rpm:
                requests = self._refill(self._requests, client, self.rpm)
                if requests.level < 1:
                    raise request_limit_reached(self.rpm, requests.level)
                requests.level -= 1

    def charge_tokens(self, client: str, tokens: int) -> None:
        if not self.tpm or tokens <= 0:
            return
        with self._lock:
            self._refill(self._tokens, client, self.tpm).level -= tokens


# One step of one bucket, atomic in Redis, on Redis's clock (replicas' clocks may disagree).
# KEYS[1]: the bucket; ARGV: capacity (= per minute), mode, amount (charge).
# "peek": admit while the level is > 0, take nothing (tokens); "take": admit at >= 1 and take 1
# (requests); "charge": subtract the amount, no check. Returns {admitted, level as text}.
# The key expires once the bucket would be full again, so idle clients leave nothing behind.
_BUCKET_STEP = """
local capacity = tonumber(ARGV[1])
local mode = ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'level', 'stamp')
local level = tonumber(state[1])
local stamp = tonumber(state[2])
if level == nil or stamp == nil then
  level = capacity
  stamp = now
end
level = math.min(capacity, level + math.max(0, now - stamp) * capacity / 60000)
local admitted = 1
if mode == 'peek' then
  if level <= 0 then admitted = 0 end
  return {admitted, tostring(level)}
elseif mode == 'take' then
  if level < 1 then admitted = 0 else level = level - 1 end
else
  level = level - tonumber(ARGV[3])
end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'stamp', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - level) * 60000 / capacity) + 1000)
return {admitted, tostring(level)}
"""


class RedisBuckets:
    """Token buckets kept in Redis, shared by every replica on the same Redis; used by
    `RedisRateLimiter` (kinds "requests", "tokens") and `Quotas` (kind "uploads"). One object, one
    connection pool, may serve both.

    Each bucket step is one Lua script run atomically on Redis's clock (`TIME`). Keys are
    `shoal:rl:<kind>:<first 32 hex of sha256(client id)>`: client ids are not stored.

    Fails open: when Redis cannot be reached (or answers an error), every step admits (requests
    are admitted, tokens go uncounted); a warning is logged at most once per 30 s. Each call waits
    at most `timeout` seconds, without retries, and after a failure Redis is left alone for
    `pause_after_failure` seconds (admitting meanwhile), so a dead Redis never stalls requests.
    """

    WARN_EVERY = 30.0

    def __init__(self, url: str, timeout: float = 0.5, pause_after_failure: float = 2.0):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._errors = (redis.RedisError, OSError)
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                           retry=Retry(NoBackoff(), 0), health_check_interval=10)
        self._step = self._redis.register_script(_BUCKET_STEP)
        self._pause = pause_after_failure
        self._down_until = 0.0
        self._warned_at = -self.WARN_EVERY
        self._lock = threading.Lock()

    @staticmethod
    def key(kind: str, client: str) -> str:
        return f"shoal:rl:{kind}:{hashlib.sha256(client.encode()).hexdigest()[:32]}"

    def step(self, kind: str, client: str, per_minute: float, mode: str, amount: float = 0) -> float | None:
        """One step ("peek", "take" or "charge" `amount`, see `_BUCKET_STEP`) of the client's `kind`
        bucket, which holds `per_minute` and refills over a minute. None if the step admits (or
        Redis failed: fail open), else the bucket's level."""
        if time.monotonic() < self._down_until:
            return None
        try:
            admitted, level = self._step(keys=[self.key(kind, client)], args=[per_minute, mode, amount])
        except self._errors as exc:
            self._failed(exc)
            return None
        return None if int(admitted) else float(level)

    def _failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            self._down_until = now + self._pause
            if now - self._warned_at < self.WARN_EVERY:
                return
            self._warned_at = now
        log.warning("rate limits and upload quota: Redis unreachable (%s: %s); admitting requests without "
                    "shared limits (warned at most every %.0f s)", type(exc).__name__, exc, self.WARN_EVERY)

    def close(self) -> None:
        self._redis.close()


class RedisRateLimiter:
    """`RateLimiter`'s buckets kept in Redis (a `RedisBuckets`, `self.buckets`), shared by every
    replica on the same Redis: with `--rate-limit-rpm 2`, two requests in all, whichever replicas
    they reach. Keys `shoal:rl:<requests|tokens>:<hash>`; fails open as `RedisBuckets` does.
    """

    def __init__(self, url: str, requests_per_minute: float = 0, tokens_per_minute: float = 0,
                 timeout: float = 0.5, pause_after_failure: float = 2.0):
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self.buckets = RedisBuckets(url, timeout, pause_after_failure)

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    key = staticmethod(RedisBuckets.key)

    def _run(self, kind: str, client: str, per_minute: float, mode: str, amount: float = 0) -> float | None:
        return self.buckets.step(kind, client, per_minute, mode, amount)

    def admit(self, client: str) -> None:
        """Take one request from the client's buckets in Redis, or raise RateLimitedError."""
        if self.tpm:
            level = self._run("tokens", client, self.tpm, "peek")
            if level is not None:
                raise token_limit_reached(self.tpm, min(level, 0.0))
        if self.rpm:
            level = self._run("requests", client, self.rpm, "take")
            if level is not None:
                raise request_limit_reached(self.rpm, min(level, 1.0))

    def charge_tokens(self, client: str, tokens: int) -> None:
        if not self.tpm or tokens <= 0:
            return
        self._run("tokens", client, self.tpm, "charge", tokens)

    def close(self) -> None:
        self.buckets.close()
