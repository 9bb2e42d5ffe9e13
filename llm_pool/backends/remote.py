"""Models served elsewhere: the replica logic of every remote backend, whatever its protocol.

The wire protocol is an adapter (`protocols.ProtocolAdapter`) picked once by the spec's source:
OpenAI-protocol servers (vLLM, llama.cpp, Ollama, `transformers serve`, another Shoal) through
`openai_protocol.py`, TGI-protocol servers through `tgi_protocol.py`. This module owns the rest.

A remote model may have several replicas. Each request goes to the healthy replica with the fewest
requests outstanding; a replica that fails a health check or a request is taken out and checked
again every few seconds; a request that fails before its first token is retried once on another
replica. Streaming, cancellation (closing the upstream stream), parameters and errors pass
through. "Load" attaches (at least one replica must answer), "unload" detaches; nothing counts
against the local memory budget. Each backend runs its own event loop in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from ..errors import InvalidRequestError, ModelLoadError, ServiceUnavailableError, ShoalError, UpstreamError
from ..stream import Finished, GenerationHandle, GenerationRequest, TextDelta, Usage
from .base import Backend, Progress
from .openai_protocol import OpenAIProtocol
from .protocols import ProtocolAdapter, describe
from .tgi_protocol import TGIProtocol

log = logging.getLogger("shoal.remote")

PROTOCOLS: dict[str, type[ProtocolAdapter]] = {"openai": OpenAIProtocol, "tgi": TGIProtocol}


class _NoTokenYet(Exception):
    """A failure before the first token: safe to retry elsewhere."""


@dataclass
class Replica:
    url: str
    healthy: bool = True
    outstanding: int = 0
    served: int = 0
    failures: int = 0
    latency: float | None = None  # seconds, moving average of time to first token
    last_error: str | None = None
    checked: float = 0.0
    client: Any = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "outstanding": self.outstanding,
            "served": self.served,
            "latency_ms": round(self.latency * 1000, 1) if self.latency is not None else None,
            "last_error": self.last_error,
        }


class RemoteBackend(Backend):
    def __init__(self, spec, context):
        super().__init__(spec, context)
        options = spec.options
        self.timeout = float(options.get("timeout", 120))
        self.connect_timeout = float(options.get("connect_timeout", 3))
        self.max_connections = int(options.get("max_connections", 64))
        self.retries = int(options.get("retries", 1))
        self.health_interval = float(options.get("health_interval", 2))
        self.api_key = options.get("api_key") or "unused"
        self.upstream_model = spec.remote_model or spec.name
        self.replicas = [Replica(url.rstrip("/")) for url in (spec.location, *spec.replicas)]
        self.protocol = PROTOCOLS[spec.source](
            upstream_model=self.upstream_model,
            api_key=self.api_key,
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
            max_connections=self.max_connections,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._health_task: asyncio.Future | None = None

    # ------------------------------------------------------------------ lifecycle
    def prepare(self, progress: Progress) -> None:
        policy = self.context.policy
        if policy is not None and not policy.is_trusted(self.spec):  # DNS may have changed since registering
            for url in (self.spec.location, *self.spec.replicas):
                policy.check_url(url, "location", ModelLoadError)
        progress(0.2, "contacting replicas")
        results = [self._check_sync(replica) for replica in self.replicas]
        if not any(results):
            errors = "; ".join(f"{r.url}: {r.last_error}" for r in self.replicas)
            raise ModelLoadError(f"model '{self.spec.key}': no replica answers ({errors})")

    def estimate_bytes(self) -> int:
        return 0

    def memory_bytes(self) -> int:
        return 0

    def load(self, progress: Progress) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"remote-{self.spec.key}", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open_clients(), self._loop).result(30)
        self._health_task = asyncio.run_coroutine_threadsafe(self._health_loop(), self._loop)
        progress(1.0, "attached")

    def unload(self) -> None:
        if self._loop is None:
            return
        if self._health_task:
            self._health_task.cancel()
        asyncio.run_coroutine_threadsafe(self._close_clients(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(10)
        self._loop = None

    async def _open_clients(self) -> None:
        for replica in self.replicas:
            replica.client = await self.protocol.open_client(replica.url)

    async def _close_clients(self) -> None:
        for replica in self.replicas:
            close = getattr(replica.client, "close", None)
            if close:
                try:
                    await close()
                except Exception:  # closing a dead connection is not worth a failure
                    pass

    # ------------------------------------------------------------------ health
    def _check_sync(self, replica: Replica) -> bool:
        try:
            started = time.monotonic()
            response = httpx.get(
                self.protocol.health_url(replica.url),
                timeout=self.connect_timeout + 2,
                headers={"Authorization": f"Bearer {self.api_key}"},
            )
            response.raise_for_status()
            replica.healthy, replica.last_error = True, None
            replica.latency = replica.latency or time.monotonic() - started
        except Exception as exc:
            replica.healthy, replica.last_error = False, describe(exc)
        replica.checked = time.monotonic()
        return replica.healthy

    async def _health_loop(self) -> None:
        async with httpx.AsyncClient(timeout=self.connect_timeout + 2) as client:
            while True:
                await asyncio.sleep(self.health_interval)
                for replica in self.replicas:
                    try:
                        response = await client.get(
                            self.protocol.health_url(replica.url), headers={"Authorization": f"Bearer {self.api_key}"}
                        )
                        response.raise_for_status()
                        if not replica.healthy:
                            log.info("replica %s of %s is back", replica.url, self.spec.key)
                        replica.healthy, replica.last_error = True, None
                    except Exception as exc:
                        if replica.healthy:
                            log.warning(
                                "replica %s of %s failed its health check: %s",
                                replica.url,
                                self.spec.key,
                                describe(exc),
                            )
                        replica.healthy, replica.last_error = False, describe(exc)
                    replica.checked = time.monotonic()

    def _pick(self, tried: set[str]) -> Replica | None:
        candidates = [r for r in self.replicas if r.healthy and r.url not in tried]
        if not candidates:
            return None
        return min(candidates, key=lambda r: (r.outstanding, r.latency or 0))

    # ------------------------------------------------------------------ requests
    def submit(self, request: GenerationRequest) -> GenerationHandle:
        if self._loop is None:
            raise ModelLoadError(f"model '{self.spec.key}' is not attached")
        if not any(r.healthy for r in self.replicas):
            raise ServiceUnavailableError(
                f"no healthy replica for model '{self.spec.name}'", retry_after=2.0, code="no_healthy_replica"
            )
        if request.output_format is not None:
            param = request.output_format.param
            raise InvalidRequestError(f"{param}: structured output is not forwarded to remote models yet; "
                                     f"'{self.spec.name}' is served by a remote server", param=param)
        self.reasoning.template_kwargs(request.thinking)  # a wish to think is refused: not forwarded yet
        if not request.add_generation_prompt or request.continue_final_message:
            param = "continue_final_message" if request.continue_final_message else "add_generation_prompt"
            raise InvalidRequestError(f"{param}: not forwarded to remote models; '{self.spec.name}' is served "
                                      "by a remote server", param=param)
        handle = GenerationHandle(request, model=self.spec.key)
        asyncio.run_coroutine_threadsafe(self._serve(handle), self._loop)
        return handle

    async def _serve(self, handle: GenerationHandle) -> None:
        tried: set[str] = set()
        attempts = 1 + self.retries
        last_error: Exception | None = None
        for _ in range(attempts):
            replica = self._pick(tried)
            if replica is None:
                break
            tried.add(replica.url)
            replica.outstanding += 1
            try:
                await self._stream(replica, handle)
                replica.served += 1
                return
            except _NoTokenYet as exc:
                last_error = exc.__cause__ or exc
                replica.healthy, replica.failures = False, replica.failures + 1
                replica.last_error = describe(last_error)
                log.warning(
                    "replica %s failed before the first token (%s); retrying elsewhere",
                    replica.url,
                    replica.last_error,
                )
            except ShoalError as exc:
                handle.fail(exc)
                return
            except Exception as exc:  # after the first token: the stream ends with an error
                replica.failures += 1
                replica.last_error = describe(exc)
                handle.fail(UpstreamError(f"replica {replica.url} failed mid-stream: {describe(exc)}"))
                return
            finally:
                replica.outstanding -= 1
        handle.fail(
            ServiceUnavailableError(
                f"no replica of '{self.spec.name}' could serve the request"
                + (f" (last error: {describe(last_error)})" if last_error else ""),
                retry_after=2.0,
            )
        )

    async def _stream(self, replica: Replica, handle: GenerationHandle) -> None:
        request = handle.request
        started = time.monotonic()
        text, tokens, usage = "", 0, None
        first = True
        finish = "stop"
        try:
            async for piece, done_reason, piece_usage in self.protocol.pieces(replica.client, request):
                if handle.cancelled:
                    finish = "cancelled"
                    break
                if piece_usage:
                    usage = piece_usage
                if done_reason:
                    finish = done_reason
                if piece:
                    if first:
                        latency = time.monotonic() - started
                        replica.latency = (
                            latency if replica.latency is None else 0.8 * replica.latency + 0.2 * latency
                        )
                        first = False
                    tokens += 1
                    text += piece
                    handle.push(TextDelta(piece, (0,), ()))
        except ShoalError:
            raise
        except Exception as exc:
            if first:
                raise _NoTokenYet() from exc
            raise
        prompt_tokens, completion_tokens = usage or (0, tokens)
        handle.push(
            Finished(
                finish,
                Usage(prompt_tokens, completion_tokens),
                text,
                self.spec.key,
                (handle.first_token_at - handle.created) if handle.first_token_at else None,
                time.monotonic() - handle.created,
            )
        )

    # ------------------------------------------------------------------ status
    @property
    def context_length(self) -> int:
        return self.spec.context_length or 4096

    def info(self) -> dict[str, Any]:
        latencies = [r.latency for r in self.replicas if r.latency is not None]
        return {
            "device": f"remote ({self.spec.source})",
            "dtype": "remote",
            "parameters": None,
            "context_length": self.context_length,
            "replicas": [r.public() for r in self.replicas],
            "latency_ms": round(min(latencies) * 1000, 1) if latencies else None,
        }

    def load_stats(self) -> dict[str, Any]:
        return {
            "running": sum(r.outstanding for r in self.replicas),
            "waiting": 0,
            "replicas": [r.public() for r in self.replicas],
        }
