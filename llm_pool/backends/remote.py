"""Models served elsewhere: OpenAI-protocol servers (vLLM, llama.cpp, Ollama, `transformers serve`,
another Shoal) through `openai`, and TGI-protocol servers through `huggingface_hub`.

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

from ..errors import ModelLoadError, ServiceUnavailableError, ShoalError
from ..stream import Finished, GenerationHandle, GenerationRequest, TextDelta, Usage
from .base import Backend, Progress

log = logging.getLogger("shoal.remote")


class UpstreamError(ShoalError):
    status = 502
    type = "upstream_error"


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
        timeout = httpx.Timeout(self.timeout, connect=self.connect_timeout)
        limits = httpx.Limits(max_connections=self.max_connections)
        for replica in self.replicas:
            if self.spec.source == "openai":
                from openai import AsyncOpenAI

                replica.client = AsyncOpenAI(
                    base_url=replica.url,
                    api_key=self.api_key,
                    max_retries=0,
                    timeout=timeout,
                    http_client=httpx.AsyncClient(timeout=timeout, limits=limits),
                )
            else:
                from huggingface_hub import AsyncInferenceClient

                replica.client = AsyncInferenceClient(
                    base_url=replica.url,
                    timeout=self.timeout,
                    api_key=None if self.api_key == "unused" else self.api_key,
                )

    async def _close_clients(self) -> None:
        for replica in self.replicas:
            close = getattr(replica.client, "close", None)
            if close:
                try:
                    await close()
                except Exception:  # closing a dead connection is not worth a failure
                    pass

    # ------------------------------------------------------------------ health
    def _health_url(self, replica: Replica) -> str:
        return f"{replica.url}/models" if self.spec.source == "openai" else f"{replica.url}/health"

    def _check_sync(self, replica: Replica) -> bool:
        try:
            started = time.monotonic()
            response = httpx.get(
                self._health_url(replica),
                timeout=self.connect_timeout + 2,
                headers={"Authorization": f"Bearer {self.api_key}"},
            )
            response.raise_for_status()
            replica.healthy, replica.last_error = True, None
            replica.latency = replica.latency or time.monotonic() - started
        except Exception as exc:
            replica.healthy, replica.last_error = False, _describe(exc)
        replica.checked = time.monotonic()
        return replica.healthy

    async def _health_loop(self) -> None:
        async with httpx.AsyncClient(timeout=self.connect_timeout + 2) as client:
            while True:
                await asyncio.sleep(self.health_interval)
                for replica in self.replicas:
                    try:
                        response = await client.get(
                            self._health_url(replica), headers={"Authorization": f"Bearer {self.api_key}"}
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
                                _describe(exc),
                            )
                        replica.healthy, replica.last_error = False, _describe(exc)
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
                replica.last_error = _describe(last_error)
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
                replica.last_error = _describe(exc)
                handle.fail(UpstreamError(f"replica {replica.url} failed mid-stream: {_describe(exc)}"))
                return
            finally:
                replica.outstanding -= 1
        handle.fail(
            ServiceUnavailableError(
                f"no replica of '{self.spec.name}' could serve the request"
                + (f" (last error: {_describe(last_error)})" if last_error else ""),
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
            async for piece, done_reason, piece_usage in self._pieces(replica, request):
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

    async def _pieces(self, replica: Replica, request: GenerationRequest):
        """(text, finish_reason or None, (prompt_tokens, completion_tokens) or None) per upstream event."""
        params = request.params
        if self.spec.source == "openai":
            common: dict[str, Any] = {
                "model": self.upstream_model,
                "stream": True,
                "stream_options": {"include_usage": True},
                "temperature": params.temperature,
                "top_p": params.top_p,
            }
            if params.max_new_tokens:
                common["max_tokens"] = params.max_new_tokens
            if params.seed is not None:
                common["seed"] = params.seed
            if params.stop:
                common["stop"] = list(params.stop)
            extra = {
                k: v
                for k, v in (("top_k", params.top_k), ("repetition_penalty", params.repetition_penalty))
                if v not in (0, 1.0)
            }
            if extra:
                common["extra_body"] = extra
            try:
                if request.messages is not None:
                    stream = await replica.client.chat.completions.create(
                        messages=[{"role": m.role, "content": m.content} for m in request.messages], **common
                    )
                else:
                    stream = await replica.client.completions.create(prompt=request.prompt, **common)
            except Exception as exc:
                raise _translate(exc) from exc
            try:
                async for chunk in stream:
                    usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens) if chunk.usage else None
                    if not chunk.choices:
                        yield "", None, usage
                        continue
                    choice = chunk.choices[0]
                    piece = choice.delta.content if request.messages is not None else choice.text
                    yield piece or "", choice.finish_reason, usage
            finally:
                await stream.close()
            return
        client = replica.client
        sampling = params.temperature > 0
        kwargs: dict[str, Any] = {"max_new_tokens": params.max_new_tokens or 512, "stream": True}
        if sampling:
            kwargs.update(
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p if params.top_p < 1 else None,
                top_k=params.top_k or None,
            )
        if params.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = params.repetition_penalty
        if params.seed is not None:
            kwargs["seed"] = params.seed
        if params.stop:
            kwargs["stop"] = list(params.stop)
        if request.messages is not None:
            try:
                stream = await client.chat_completion(
                    [{"role": m.role, "content": m.content} for m in request.messages],
                    max_tokens=kwargs["max_new_tokens"],
                    temperature=params.temperature if sampling else 0.0,
                    seed=params.seed,
                    stop=list(params.stop) or None,
                    stream=True,
                )
            except Exception as exc:
                raise _translate(exc) from exc
            async for chunk in stream:
                choice = chunk.choices[0] if chunk.choices else None
                yield (
                    (choice.delta.content or "") if choice else "",
                    choice.finish_reason if choice else None,
                    None,
                )
            return
        try:
            stream = await client.text_generation(request.prompt, details=True, **kwargs)
        except Exception as exc:
            raise _translate(exc) from exc
        async for event in stream:
            details = event.details
            reason = None
            if details is not None:
                reason = {"length": "length"}.get(details.finish_reason, "stop")
            usage = (0, details.generated_tokens) if details is not None else None
            yield event.token.text if not event.token.special else "", reason, usage

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


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    return f"{type(exc).__name__}: {str(exc)[:200]}" if str(exc) else type(exc).__name__


def _translate(exc: Exception) -> Exception:
    """Upstream 4xx answers are the request's fault: pass them on as they are; the rest may retry."""
    status = getattr(exc, "status_code", None) or getattr(getattr(exc, "response", None), "status_code", None)
    if status and 400 <= status < 500 and status not in (408, 429):
        from ..errors import InvalidRequestError

        error = InvalidRequestError(f"the upstream server refused the request ({status}): {_describe(exc)}")
        error.status = status if status in (400, 404, 413, 422) else 400
        return error
    return exc
