"""Per-client rate limits: token buckets on requests and on generated tokens.

A client is an API key, or an IP address when keys are off. The request bucket holds up to a
minute's worth of requests and refills continuously; the token bucket is charged with the tokens a
request actually generated, after it finishes, and admits new requests only while it is positive.
Either empty bucket answers `RateLimitedError` (429) with the seconds until it refills.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from llm_pool.errors import RateLimitedError


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
                    wait = (1 - tokens.level) * 60 / self.tpm
                    raise RateLimitedError(f"Token rate limit reached ({self.tpm:g} generated tokens "
                                           f"per minute); retry in {wait:.0f} s.", retry_after=wait)
            if self.rpm:
                requests = self._refill(self._requests, client, self.rpm)
                if requests.level < 1:
                    wait = (1 - requests.level) * 60 / self.rpm
                    raise RateLimitedError(f"Request rate limit reached ({self.rpm:g} requests per "
                                           f"minute); retry in {wait:.0f} s.", retry_after=wait)
                requests.level -= 1

    def charge_tokens(self, client: str, tokens: int) -> None:
        if not self.tpm or tokens <= 0:
            return
        with self._lock:
            self._refill(self._tokens, client, self.tpm).level -= tokens
