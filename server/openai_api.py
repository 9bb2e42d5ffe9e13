"""OpenAI-compatible routes: /v1/chat/completions and /v1/completions, streamed or not.

Translation only: request bodies (with their bounds, so they show in /docs) become a
`GenerationRequest` for the pool; events become OpenAI-shaped JSON or server-sent events. Shoal's
extensions (top_k, repetition_penalty, chunk_size, stream_delay_ms) are optional fields.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from llm_pool import Finished, GenerationParams, GenerationRequest
from llm_pool.constraints import OutputFormat
from llm_pool.errors import InvalidParamsError
from llm_pool.reasoning import Thinking
from llm_pool.stream import Failed, GenerationHandle

from .context import admit
from .protocol import (
    KeepAlive,
    MaxTokens,
    ModelRef,
    SamplingParams,
    StopText,
    timings,
    usage_dict,
)
from .streaming import SSE_HEADERS, Chunk, chunked, merged, result_or_disconnect, sse
from .tool_calls import (
    Calls,
    NamedToolChoice,
    Thought,
    ToolCallIn,
    ToolDef,
    ToolPlan,
    answer_events,
    history,
    thoughts_of,
)

router = APIRouter(tags=["OpenAI-compatible"])
MAX_CHOICES = 8  # n: each choice takes a batch slot


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str = Field(max_length=1_000_000)


class ChatMessageIn(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, description="Text, or a list of text parts (may be "
                                                 "null on an assistant message with tool_calls).")
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=64, description="An assistant's calls.")
    tool_call_id: str | None = Field(None, max_length=256, description="On a tool message: the call it answers.")
    reasoning_content: str | None = Field(None, description="An assistant's earlier thoughts: accepted and not "
                                          "shown to the model again.")

    @model_validator(mode="after")
    def _shape(self) -> ChatMessageIn:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message has tool calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool_call_id: a tool message names the call it answers")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content: required (only an assistant message with tool_calls may omit it)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


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

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None
    schema_: dict | None = Field(None, alias="schema", description="llama.cpp's form: json_object with the "
                                 "schema beside it (as json_schema's schema).")

    def output_format(self) -> OutputFormat | None:
        if self.schema_ is not None and self.type != "json_object":
            raise InvalidParamsError("response_format.schema: only with json_object (json_schema has its own)",
                                     param="response_format.schema")
        if self.type == "text":
            return None
        if self.type == "json_object":
            return OutputFormat.json(self.schema_, param="response_format.schema")
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise InvalidParamsError("response_format.json_schema.schema is required for type json_schema",
                                     param="response_format.json_schema.schema")
        return OutputFormat.json(self.json_schema.schema_, param="response_format.json_schema.schema")


# Fields of OpenAI's API that change nothing about the answer, which a server may ignore (storage,
# billing and routing hints). Every other unknown field is refused with a 400 that names it.
IGNORED_BY_SPEC = frozenset({"store", "metadata", "service_tier", "safety_identifier", "prompt_cache_key",
                             "prompt_cache_retention"})


class SamplingFields(SamplingParams):
    """Fields shared by both endpoints: the sampling fields (declared once, in `SamplingParams`; the
    token limit under OpenAI's name) and the request's own. Bounds here are checked again by the core."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_ignorable(cls, data):
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in IGNORED_BY_SPEC}
        return data

    max_new_tokens: MaxTokens = Field(None, alias="max_tokens")
    stop: StopText = None  # also a single string here
    model: ModelRef = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="How many answers to the same prompt (choices), "
                   "generated together in one batch.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    cache_salt: str | None = Field(None, max_length=256, description="Share cached prompt prefixes only "
                                   "with requests that send the same salt (vLLM's field). Without it, "
                                   "only with your own requests (your API key, or your browser).")
    chunk_size: int = Field(1, ge=1, le=256, description="Shoal extension: tokens per streamed event.")
    stream_delay_ms: int = Field(0, ge=0, le=10_000, description="Shoal extension: pause between events.")
    keep_alive: KeepAlive = None
    response_format: ResponseFormat | None = Field(None, description="json_object or json_schema: the "
                                                   "answer is constrained to valid JSON (of the schema).")
    grammar: str | None = Field(None, description="llama.cpp's GBNF grammar (`root ::= \"yes\" | \"no\"`): "
                                "the answer is a sentence of it, enforced while decoding on both engines.")

    def output_format(self) -> OutputFormat | None:
        if self.grammar is not None:
            if self.response_format is not None and self.response_format.type != "text":
                raise InvalidParamsError("grammar: not with response_format (send one of them)", param="grammar")
            return OutputFormat.gbnf(self.grammar)
        return self.response_format.output_format() if self.response_format else None

    def params(self, max_tokens: int | None = None) -> GenerationParams:
        values = self.values()
        if max_tokens:
            values["max_new_tokens"] = max_tokens
        return GenerationParams.validated(**values)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=10_000)
    max_completion_tokens: MaxTokens = None
    logprobs: bool = Field(False, description="Return each token's log-probability.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: the most likely "
                                     "alternatives at each position.")
    tools: list[ToolDef] | None = Field(None, max_length=128, description="Functions the model may call "
                                        "(shown through the model's chat template when it renders tools, "
                                        "else in Shoal's generic format; see the README).")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="auto (the default with tools), none, required, or a named function: the last "
        "two are enforced while decoding.")
    parallel_tool_calls: bool | None = Field(None, description="An answer in <tool_call> blocks may make "
                                             "several calls; false keeps the first. A constrained answer "
                                             "(required, a named tool) makes one.")
    add_generation_prompt: bool = Field(True, description="vLLM's: open the assistant's turn after the "
                                        "messages (false: the chat as it is, e.g. to continue its last message).")
    continue_final_message: bool = Field(False, description="vLLM's: the last message is the assistant's "
                                         "unfinished answer; the reply continues it (needs add_generation_prompt "
                                         "false).")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = Field(
        None, description="For a model that thinks and whose chat template switches it (enable_thinking, "
        "reasoning_effort): none turns thinking off, a level turns it on (and is passed to a template that reads "
        "it). Refused by name where the model cannot honour it.")

    def tool_plan(self) -> ToolPlan | None:
        if self.grammar is not None and self.tools:
            raise InvalidParamsError("grammar: not with tools (a call's arguments already follow its schema)",
                                     param="grammar")
        plan = ToolPlan.of(self.tools, self.tool_choice, self.parallel_tool_calls)
        if plan is not None and self.response_format is not None and self.response_format.type != "text":
            raise InvalidParamsError("response_format: not with tools (a call's arguments already follow "
                                     "its schema)", param="response_format")
        return plan

    def request(self, plan: ToolPlan | None = None) -> GenerationRequest:
        if self.top_logprobs and not self.logprobs:
            raise InvalidParamsError("top_logprobs needs logprobs: true", param="top_logprobs")
        return GenerationRequest(self.params(self.max_completion_tokens), messages=history(self.messages),
                                 output_format=plan.output_format() if plan else self.output_format(),
                                 want_logprobs=self.logprobs, top_logprobs=self.top_logprobs or 0,
                                 tools=plan.tool_dicts() if plan else None,
                                 tool_prompt=plan.prompt() if plan else None,
                                 add_generation_prompt=self.add_generation_prompt,
                                 continue_final_message=self.continue_final_message,
                                 thinking=Thinking.of_effort(self.reasoning_effort, "reasoning_effort"))


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(description="The text to continue (a list of one is accepted).")
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


async def admit_choices(request: Request, body: SamplingFields, make: Callable[[], GenerationRequest]
                        ) -> list[GenerationHandle]:
    """`n` generations of one prompt, admitted one by one (each counts for the rate limits and
    takes a batch slot); with a seed, choice i samples with seed + i so they differ reproducibly.
    If one is refused, those already admitted are cancelled."""
    handles: list[GenerationHandle] = []
    try:
        for i in range(body.n):
            gen = make()
            if i and gen.params.seed is not None:
                gen.params = replace(gen.params, seed=(gen.params.seed + i) % (2**63))
            handles.append(await admit(request, body.model, gen, body.cache_salt, body.keep_alive))
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise
    return handles


async def all_results(handles: list[GenerationHandle], request: Request,
                      pieces: list[list[Chunk] | None]) -> list[Finished]:
    """Every choice's result; if one fails, the others are cancelled (their slots freed) first."""
    try:
        return list(await asyncio.gather(*(result_or_disconnect(h, request, p) for h, p in zip(handles, pieces))))
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise


def total_usage(finals: list[Finished]) -> dict:
    """One prompt, n answers: the prompt counted once (as OpenAI does), every answer's tokens."""
    usage = usage_dict(finals[0])
    completion = sum(f.usage.completion_tokens for f in finals)
    return {**usage, "completion_tokens": completion, "total_tokens": usage["prompt_tokens"] + completion}


@router.post("/v1/chat/completions", summary="Chat completion (OpenAI-compatible)")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    plan = body.tool_plan()
    handles = await admit_choices(request, body, lambda: body.request(plan))
    ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    model = handles[0].model
    if not body.stream:
        marks = handles[0].request.thoughts
        pieces: list[list[Chunk] | None] = [[] if body.logprobs or marks else None for _ in handles]
        finals = await all_results(handles, request, pieces)
        choices = []
        for index, (final, collected) in enumerate(zip(finals, pieces)):
            thought, collected, _spent = thoughts_of(collected, marks) if collected is not None else ("", None, 0)
            answer = "".join(c.text for c in collected) if marks else final.text
            calls = plan.parse(answer) if plan and final.reason == "stop" else None
            message = {"role": "assistant", "content": None, "tool_calls": calls} if calls \
                else {"role": "assistant", "content": answer}
            if marks:
                message["reasoning_content"] = thought or None
            choices.append({"index": index, "finish_reason": "tool_calls" if calls else final.reason,
                            "logprobs": chat_logprobs(collected) if body.logprobs else None,
                            "message": message})
        return {"id": ident, "object": "chat.completion", "created": created, "model": model,
                "system_fingerprint": model, "choices": choices,
                "usage": total_usage(finals), "timings": timings(finals[0])}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> str:
        return sse({"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                    "system_fingerprint": model,
                    "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]})

    def lp(pieces: list[Chunk]) -> dict | None:
        return chat_logprobs(pieces) if body.logprobs and pieces else None

    async def choice(index: int, handle: GenerationHandle):
        """One choice's events: SSE strings, then its Finished (or Failed)."""
        yield chunk(index, {"role": "assistant", "content": ""})
        called = False
        async for item in answer_events(handle, plan, body.chunk_size, body.stream_delay_ms):
            if isinstance(item, Thought):
                if item.text:
                    yield chunk(index, {"reasoning_content": item.text})
            elif isinstance(item, Chunk):
                yield chunk(index, {"content": item.text}, logprobs=lp([item]))
            elif isinstance(item, Calls):
                called = True
                for n, call in enumerate(item.calls):
                    yield chunk(index, {"tool_calls": [{"index": n, "id": call["id"], "type": "function",
                                                        "function": {"name": call["function"]["name"],
                                                                     "arguments": ""}}]},
                                logprobs=lp(item.pieces) if n == 0 else None)
                    yield chunk(index, {"tool_calls": [{"index": n, "function": {
                        "arguments": call["function"]["arguments"]}}]})
            elif isinstance(item, Finished):
                yield chunk(index, {}, "tool_calls" if called else item.reason)
                yield item
            else:
                yield item

    async def events():
        finals: list[Finished] = []
        async for _index, item in merged([choice(i, h) for i, h in enumerate(handles)]):
            if isinstance(item, str):
                yield item
            elif isinstance(item, Finished):
                finals.append(item)
            elif isinstance(item, Failed):
                yield sse({"error": item.error.to_dict()})
                break
        if include_usage and len(finals) == len(handles):
            yield sse({"id": ident, "object": "chat.completion.chunk", "created": created,
                       "model": model, "choices": [], "usage": total_usage(finals)})
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
    handles = await admit_choices(request, body, lambda: GenerationRequest(
        body.params(), prompt=prompt, output_format=body.output_format(), want_logprobs=wants,
        top_logprobs=body.logprobs or 0))
    ident, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), handles[0].model
    prefix = prompt if body.echo else ""
    if not body.stream:
        pieces: list[list[Chunk] | None] = [[] if wants else None for _ in handles]
        finals = await all_results(handles, request, pieces)
        return {"id": ident, "object": "text_completion", "created": created, "model": model,
                "system_fingerprint": model,
                "choices": [{"index": i, "text": prefix + final.text, "finish_reason": final.reason,
                             "logprobs": completion_logprobs(collected, 0) if collected is not None else None}
                            for i, (final, collected) in enumerate(zip(finals, pieces))],
                "usage": total_usage(finals), "timings": timings(finals[0])}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(index: int, text: str, finish: str | None = None, logprobs: dict | None = None) -> str:
        return sse({"id": ident, "object": "text_completion", "created": created, "model": model,
                    "system_fingerprint": model,
                    "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}]})

    async def choice(index: int, handle: GenerationHandle):
        if prefix:
            yield chunk(index, prefix)
        offset = 0
        async for item in chunked(handle, body.chunk_size, body.stream_delay_ms):
            if isinstance(item, Chunk):
                yield chunk(index, item.text, logprobs=completion_logprobs([item], offset) if wants else None)
                offset += len(item.text)
            else:
                if isinstance(item, Finished):
                    yield chunk(index, "", item.reason)
                yield item

    async def events():
        finals: list[Finished] = []
        async for _index, item in merged([choice(i, h) for i, h in enumerate(handles)]):
            if isinstance(item, str):
                yield item
            elif isinstance(item, Finished):
                finals.append(item)
            elif isinstance(item, Failed):
                yield sse({"error": item.error.to_dict()})
                break
        if include_usage and len(finals) == len(handles):
            yield sse({"id": ident, "object": "text_completion", "created": created,
                       "model": model, "choices": [], "usage": total_usage(finals)})
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)
