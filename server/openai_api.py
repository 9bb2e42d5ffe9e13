"""OpenAI-compatible routes: /v1/chat/completions and /v1/completions, streamed or not.

Translation only: request bodies (with their bounds, so they show in /docs) become a
`GenerationRequest` for the pool; events become OpenAI-shaped JSON or server-sent events. Shoal's
extensions (top_k, repetition_penalty, chunk_size, stream_delay_ms) are optional fields.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from llm_pool import Finished, GenerationParams, GenerationRequest, Message
from llm_pool.errors import InvalidParamsError
from llm_pool.stream import Failed

from .context import admit
from .streaming import SSE_HEADERS, Chunk, chunked, result_or_disconnect, sse

router = APIRouter(tags=["OpenAI-compatible"])


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str = Field(max_length=1_000_000)


class ChatMessageIn(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="Text, or a list of text parts.")
    name: str | None = Field(None, max_length=256)

    def to_message(self) -> Message:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return Message("system" if self.role == "developer" else self.role, content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by both endpoints. Bounds here are checked again by the core."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, max_length=200, description="Model name (or name@version); "
                              "default: the server's default model.")
    max_tokens: int | None = Field(None, ge=1, le=32768, description="Most tokens to generate.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy. Default 0.7.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1_000_000, description="Shoal extension; 0 = off.")
    repetition_penalty: float | None = Field(None, gt=0, le=10, description="Shoal extension.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Only 0 is supported.")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Only 0 is supported.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(None, description="Up to 16 stop sequences.")
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    cache_salt: str | None = Field(None, max_length=256, description="Share cached prompt prefixes only "
                                   "with requests that send the same salt (vLLM's field). Without it, "
                                   "only with your own requests (your API key, or your browser).")
    chunk_size: int = Field(1, ge=1, le=256, description="Shoal extension: tokens per streamed event.")
    stream_delay_ms: int = Field(0, ge=0, le=10_000, description="Shoal extension: pause between events.")

    def params(self, max_tokens: int | None = None) -> GenerationParams:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise InvalidParamsError(f"{name} is not supported (use repetition_penalty)", param=name)
        return GenerationParams.validated(
            max_new_tokens=max_tokens or self.max_tokens, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k, repetition_penalty=self.repetition_penalty,
            seed=self.seed, stop=self.stop)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=10_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=32768)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(description="The text to continue (a list of one is accepted).")
    max_tokens: int | None = Field(None, ge=1, le=32768)
    echo: bool = False


def usage_dict(finished: Finished) -> dict:
    usage = finished.usage
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


@router.post("/v1/chat/completions", summary="Chat completion (OpenAI-compatible)")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    gen = GenerationRequest(body.params(body.max_completion_tokens),
                            messages=[m.to_message() for m in body.messages])
    handle = await admit(request, body.model, gen, body.cache_salt)
    ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    model = handle.model
    if not body.stream:
        final = await result_or_disconnect(handle, request)
        return {"id": ident, "object": "chat.completion", "created": created, "model": model,
                "system_fingerprint": model,
                "choices": [{"index": 0, "finish_reason": final.reason, "logprobs": None,
                             "message": {"role": "assistant", "content": final.text}}],
                "usage": usage_dict(final), "timings": timings(final)}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    async def events():
        yield sse(chunk({"role": "assistant", "content": ""}))
        async for item in chunked(handle, body.chunk_size, body.stream_delay_ms):
            if isinstance(item, Chunk):
                yield sse(chunk({"content": item.text}))
            elif isinstance(item, Finished):
                yield sse(chunk({}, item.reason))
                if include_usage:
                    yield sse({"id": ident, "object": "chat.completion.chunk", "created": created,
                               "model": model, "choices": [], "usage": usage_dict(item)})
            elif isinstance(item, Failed):
                yield sse({"error": item.error.to_dict()})
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/v1/completions", summary="Text completion (OpenAI-compatible)")
async def completions(body: CompletionRequest, request: Request):
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise InvalidParamsError("prompt: send one prompt per request (or use /v1/batch)",
                                     param="prompt")
        prompt = prompt[0]
    gen = GenerationRequest(body.params(), prompt=prompt)
    handle = await admit(request, body.model, gen, body.cache_salt)
    ident, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), handle.model
    prefix = prompt if body.echo else ""
    if not body.stream:
        final = await result_or_disconnect(handle, request)
        return {"id": ident, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": prefix + final.text, "finish_reason": final.reason,
                             "logprobs": None}],
                "usage": usage_dict(final), "timings": timings(final)}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(text: str, finish: str | None = None) -> dict:
        return {"id": ident, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

    async def events():
        if prefix:
            yield sse(chunk(prefix))
        async for item in chunked(handle, body.chunk_size, body.stream_delay_ms):
            if isinstance(item, Chunk):
                yield sse(chunk(item.text))
            elif isinstance(item, Finished):
                yield sse(chunk("", item.reason))
                if include_usage:
                    yield sse({"id": ident, "object": "text_completion", "created": created,
                               "model": model, "choices": [], "usage": usage_dict(item)})
            elif isinstance(item, Failed):
                yield sse({"error": item.error.to_dict()})
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


def timings(final: Finished) -> dict:
    """Shoal extension (like llama.cpp's): where the time went."""
    return {"ttft_s": round(final.ttft, 4) if final.ttft is not None else None,
            "duration_s": round(final.duration, 4), "queued_s": round(final.queued, 4),
            "tokens_per_second": round(final.tokens_per_second, 2)}
