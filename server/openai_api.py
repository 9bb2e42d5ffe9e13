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
from pydantic import BaseModel, ConfigDict, Field, model_validator

from llm_pool import Finished, GenerationParams, GenerationRequest, Message
from llm_pool.constraints import OutputFormat
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


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field("response", max_length=64)
    description: str | None = Field(None, max_length=4096)
    schema_: dict | None = Field(None, alias="schema", description="The JSON schema the answer must satisfy.")
    strict: bool | None = Field(None, description="Accepted; the schema is always enforced.")


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: enforced while decoding, on every local engine."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def output_format(self) -> OutputFormat | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return OutputFormat.json(None)
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise InvalidParamsError("response_format.json_schema.schema is required for type json_schema",
                                     param="response_format.json_schema.schema")
        return OutputFormat.json(self.json_schema.schema_, param="response_format.json_schema.schema")


# Fields of OpenAI's API that change nothing about the answer, which a server may ignore (storage,
# billing and routing hints). Every other unknown field is refused with a 400 that names it.
IGNORED_BY_SPEC = frozenset({"store", "metadata", "service_tier", "safety_identifier", "prompt_cache_key",
                             "prompt_cache_retention"})


class SamplingFields(BaseModel):
    """Fields shared by both endpoints. Bounds here are checked again by the core."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_ignorable(cls, data):
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in IGNORED_BY_SPEC}
        return data

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
    response_format: ResponseFormat | None = Field(None, description="json_object or json_schema: the "
                                                   "answer is constrained to valid JSON (of the schema).")

    def output_format(self) -> OutputFormat | None:
        return self.response_format.output_format() if self.response_format else None

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
    logprobs: bool = Field(False, description="Return each token's log-probability.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: the most likely "
                                     "alternatives at each position.")

    def request(self) -> GenerationRequest:
        if self.top_logprobs and not self.logprobs:
            raise InvalidParamsError("top_logprobs needs logprobs: true", param="top_logprobs")
        return GenerationRequest(self.params(self.max_completion_tokens),
                                 messages=[m.to_message() for m in self.messages],
                                 output_format=self.output_format(), want_logprobs=self.logprobs,
                                 top_logprobs=self.top_logprobs or 0)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(description="The text to continue (a list of one is accepted).")
    max_tokens: int | None = Field(None, ge=1, le=32768)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5, description="Return each token's log-probability and "
                                 "this many most likely alternatives.")


def _token(raw: bytes, logprob: float) -> dict:
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(chunks: list[Chunk]) -> dict:
    """OpenAI's chat `logprobs` object for these chunks' tokens."""
    content = []
    for chunk in chunks:
        for i, (raw, logprob) in enumerate(zip(chunk.token_bytes, chunk.logprobs)):
            top = chunk.top[i] if i < len(chunk.top) else ()
            content.append({**_token(raw, logprob), "top_logprobs": [_token(b, lp) for b, lp in top]})
    return {"content": content, "refusal": None}


def completion_logprobs(chunks: list[Chunk], offset: int) -> dict:
    """The legacy completions `logprobs` object: tokens, their logprobs, alternatives, offsets."""
    tokens, values, tops, offsets = [], [], [], []
    for chunk in chunks:
        for i, (raw, logprob) in enumerate(zip(chunk.token_bytes, chunk.logprobs)):
            text = raw.decode("utf-8", errors="replace")
            tokens.append(text)
            values.append(logprob)
            offsets.append(offset)
            offset += len(text)
            top = chunk.top[i] if i < len(chunk.top) else ()
            tops.append({b.decode("utf-8", errors="replace"): lp for b, lp in top})
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def usage_dict(finished: Finished) -> dict:
    usage = finished.usage
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


@router.post("/v1/chat/completions", summary="Chat completion (OpenAI-compatible)")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    handle = await admit(request, body.model, body.request(), body.cache_salt)
    ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    model = handle.model
    if not body.stream:
        pieces: list[Chunk] | None = [] if body.logprobs else None
        final = await result_or_disconnect(handle, request, pieces)
        return {"id": ident, "object": "chat.completion", "created": created, "model": model,
                "system_fingerprint": model,
                "choices": [{"index": 0, "finish_reason": final.reason,
                             "logprobs": chat_logprobs(pieces) if pieces is not None else None,
                             "message": {"role": "assistant", "content": final.text}}],
                "usage": usage_dict(final), "timings": timings(final)}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}

    async def events():
        yield sse(chunk({"role": "assistant", "content": ""}))
        async for item in chunked(handle, body.chunk_size, body.stream_delay_ms):
            if isinstance(item, Chunk):
                yield sse(chunk({"content": item.text}, logprobs=chat_logprobs([item]) if body.logprobs else None))
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
    wants = body.logprobs is not None
    if wants and body.echo:
        raise InvalidParamsError("logprobs with echo (the prompt's logprobs) is not supported", param="echo")
    gen = GenerationRequest(body.params(), prompt=prompt, output_format=body.output_format(),
                            want_logprobs=wants, top_logprobs=body.logprobs or 0)
    handle = await admit(request, body.model, gen, body.cache_salt)
    ident, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), handle.model
    prefix = prompt if body.echo else ""
    if not body.stream:
        pieces: list[Chunk] | None = [] if wants else None
        final = await result_or_disconnect(handle, request, pieces)
        return {"id": ident, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": prefix + final.text, "finish_reason": final.reason,
                             "logprobs": completion_logprobs(pieces, 0) if pieces is not None else None}],
                "usage": usage_dict(final), "timings": timings(final)}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(text: str, finish: str | None = None, logprobs: dict | None = None) -> dict:
        return {"id": ident, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}]}

    async def events():
        if prefix:
            yield sse(chunk(prefix))
        offset = 0
        async for item in chunked(handle, body.chunk_size, body.stream_delay_ms):
            if isinstance(item, Chunk):
                yield sse(chunk(item.text, logprobs=completion_logprobs([item], offset) if wants else None))
                offset += len(item.text)
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
