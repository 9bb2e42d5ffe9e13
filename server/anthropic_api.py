"""Anthropic's Messages API: POST /v1/messages (streamed or not) and /v1/messages/count_tokens.

What Claude Code, the `anthropic` SDK and agent SDKs speak. Translation only: a Messages request
becomes the same chat the OpenAI route builds (system, turns, `tool_use` as an assistant's tool
calls, `tool_result` as tool messages, `tools` and `tool_choice` through the same tool plan), and
the answer comes back as content blocks, or as Anthropic's stream events (`message_start`,
`content_block_start` / `_delta` / `_stop`, `message_delta`, `message_stop`). Errors have
Anthropic's shape (see errors.py). Keys come in `x-api-key` (or `Authorization: Bearer`);
`anthropic-version` and `anthropic-beta` headers are accepted.

`output_config.format` (a JSON schema) is enforced while decoding, as `response_format` is on the
OpenAI route. `temperature`, `top_p` and `top_k`, which the current SDK no longer lists, are
accepted when sent (older clients and `extra_body`). Refused by name, never ignored: image,
document and other non-text blocks, server tools (web search, code execution, ...), `mcp_servers`,
`container` and `output_config.effort` (see the README's compatibility table).

A model that thinks (`llm_pool/reasoning.py`) answers with a `thinking` block (its signature
empty) before its text, streamed as `thinking_delta`s; `thinking` (enabled, adaptive, disabled)
switches it where the model's chat template allows, and is refused by name otherwise (a model
that does not reason accepts only disabled).
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from llm_pool import Finished, GenerationParams, GenerationRequest
from llm_pool.constraints import OutputFormat
from llm_pool.errors import InvalidParamsError
from llm_pool.reasoning import Thinking, split
from llm_pool.stream import Failed

from .auth import caller_of
from .context import admit, services_of
from .errors import ANTHROPIC_TYPES, from_client
from .openai_api import ChatMessageIn
from .protocol import (
    MAX_NEW_TOKENS_LIMIT,
    MaxTokens,
    ModelRef,
    StopText,
    Temperature,
    TopK,
    TopP,
    refused,
    screened,
)
from .streaming import SSE_HEADERS, Chunk, result_or_disconnect
from .tool_calls import (
    NAME,
    Calls,
    FunctionName,
    NamedToolChoice,
    Thought,
    ToolDef,
    ToolPlan,
    answer_events,
    history,
)

router = APIRouter(tags=["Anthropic-compatible"])

# Fields that change nothing about the answer (billing, routing, region, caching hints): accepted.
IGNORED = frozenset({"metadata", "service_tier", "cache_control", "context_management", "diagnostics",
                     "inference_geo", "speed", "user_profile_id", "workspace_id"})
NOT_SUPPORTED = {
    "mcp_servers": "MCP servers per request are not supported yet",
    "container": "code execution containers are not supported",
    "prefill": "not supported: end the messages with an assistant turn instead (it is continued)",
}


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["custom"] | None = Field(None, description="Client tools only; server tools (web search, "
                                           "code execution, ...) are refused by name.")
    name: str = Field(pattern=NAME)
    description: str | None = Field(None, max_length=8192)
    input_schema: dict = Field(description="JSON Schema of the tool's input.")
    cache_control: dict | None = Field(None, description="Accepted; prompt caching is automatic.")

    @model_validator(mode="before")
    @classmethod
    def _server_tool(cls, data):
        if isinstance(data, dict) and data.get("type") not in (None, "custom"):
            raise ValueError(f"tool type '{data.get('type')}': server tools are not supported, only "
                             "client tools (name, description, input_schema)")
        return data


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, pattern=NAME)
    disable_parallel_tool_use: bool | None = None


class JSONFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_schema"]
    schema_: dict = Field(alias="schema", description="The JSON schema the answer must satisfy.")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: JSONFormat | None = Field(None, description="The answer is constrained to JSON of this schema.")
    effort: str | None = Field(None, description="Refused unless null: switch thinking with `thinking`.")

    @model_validator(mode="after")
    def _effort(self) -> OutputConfig:
        if self.effort is not None:
            raise refused("output_config.effort", "not supported: switch a thinking model's thinking with `thinking`")
        return self


class ThinkingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["enabled", "adaptive", "disabled"]
    budget_tokens: int | None = Field(None, ge=1, description="Accepted; the thoughts count within max_tokens.")
    display: Literal["summarized", "omitted"] | None = Field(None, description="omitted: the thinking blocks "
                                                             "come empty.")

    def wish(self) -> Thinking:
        return Thinking(self.type != "disabled", "thinking")


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]] = Field(description="Text, or content blocks: text, tool_use "
                                                "(assistant), tool_result (user).")


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_ignorable(cls, data):
        return screened(data, IGNORED, NOT_SUPPORTED, lambda field, value: value is None)

    model: ModelRef = Field(description="A model served here (name or name@version).")
    messages: list[MessageIn] = Field(min_length=1, max_length=10_000)
    max_tokens: int = Field(ge=1, le=MAX_NEW_TOKENS_LIMIT, description="Most tokens to generate (required, as "
                            "in Anthropic's API).")
    system: str | list[dict[str, Any]] | None = Field(None, description="Text, or text blocks.")
    stop_sequences: StopText = None
    temperature: Temperature = None
    top_p: TopP = None
    top_k: TopK = None
    stream: bool = False
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    output_config: OutputConfig | None = None
    thinking: ThinkingConfig | None = Field(None, description="For a model that thinks: on (enabled, adaptive) "
                                            "or off (disabled), where its chat template switches thinking.")
    grammar: str | None = Field(None, description="Shoal's extension, as on chat completions: llama.cpp's GBNF "
                                "grammar; the output (thoughts included) is a sentence of it.")

    def chat(self) -> list[ChatMessageIn]:
        """The conversation as the OpenAI route's messages (same history, same tool turns)."""
        return from_client("messages", self._chat)

    def _chat(self) -> list[ChatMessageIn]:
        out: list[ChatMessageIn] = []
        if self.system is not None:
            out.append(ChatMessageIn(role="system", content=_text(self.system, "system")))
        for i, message in enumerate(self.messages):
            out += _turn(message, f"messages.{i}.content")
        return out

    def plan(self) -> ToolPlan | None:
        tools = [ToolDef.of(t.name, t.description, t.input_schema) for t in self.tools or ()]
        choice = self.tool_choice
        if choice is None:
            return ToolPlan.of(tools or None, None)
        if choice.type == "tool":
            if not choice.name:
                raise InvalidParamsError("tool_choice.name: required with type 'tool'", param="tool_choice.name")
            named = NamedToolChoice(type="function", function=FunctionName(name=choice.name))
            return ToolPlan.of(tools or None, named, not choice.disable_parallel_tool_use)
        mapped = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        return ToolPlan.of(tools or None, mapped, not choice.disable_parallel_tool_use)

    def output_format(self, plan: ToolPlan | None) -> OutputFormat | None:
        wanted = self.output_config.format if self.output_config else None
        if self.grammar is not None:
            if wanted is not None or plan is not None:
                raise InvalidParamsError("grammar: not with output_config.format or tools (send one of them)",
                                         param="grammar")
            return OutputFormat.gbnf(self.grammar)
        if wanted is None:
            return plan.output_format() if plan else None
        if plan is not None:
            raise InvalidParamsError("output_config.format: not with tools (a call's input already follows its "
                                     "schema)", param="output_config.format")
        return OutputFormat.json(wanted.schema_, param="output_config.format.schema")

    def prefilled(self, chat: list[ChatMessageIn]) -> dict:
        """Anthropic's prefill: a last assistant turn of text is the beginning of the answer, which
        the model continues (the reply holds only what it adds)."""
        last = chat[-1] if chat else None
        if last is not None and last.role == "assistant" and not last.tool_calls and last.text():
            return {"add_generation_prompt": False, "continue_final_message": True}
        return {}

    def request(self, plan: ToolPlan | None) -> GenerationRequest:
        params = GenerationParams.validated(max_new_tokens=self.max_tokens, temperature=self.temperature,
                                            top_p=self.top_p, top_k=self.top_k, stop=self.stop_sequences)
        chat = self.chat()
        return GenerationRequest(params, messages=history(chat), output_format=self.output_format(plan),
                                 tools=plan.tool_dicts() if plan else None,
                                 tool_prompt=plan.prompt() if plan else None, **self.prefilled(chat),
                                 thinking=self.thinking.wish() if self.thinking else None)


class CountTokensRequest(MessagesRequest):
    max_tokens: MaxTokens = None
    stream: bool = False


def _text(content: str | list[dict], where: str) -> str:
    """Text, or a list of text blocks, as one text."""
    if isinstance(content, str):
        return content
    parts = []
    for i, block in enumerate(content):
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise refused(f"{where}.{i}.type", f"'{block.get('type')}' blocks are not supported here, only text")
        parts.append(block["text"])
    return "\n".join(parts)


def _turn(message: MessageIn, where: str) -> list[ChatMessageIn]:
    if isinstance(message.content, str):
        return [ChatMessageIn(role=message.role, content=message.content)]
    texts: list[str] = []
    calls: list[dict] = []
    results: list[ChatMessageIn] = []
    for i, block in enumerate(message.content):
        kind, at = block.get("type"), f"{where}.{i}"
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and message.role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str) \
                    or not isinstance(block.get("input", {}), dict):
                raise InvalidParamsError(f"{at}: a tool_use block has an id, a name and an input object", param=at)
            calls.append({"id": block["id"], "function": {"name": block["name"],
                                                          "arguments": json.dumps(block.get("input", {}))}})
        elif kind == "tool_result" and message.role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise InvalidParamsError(f"{at}.tool_use_id: required", param=f"{at}.tool_use_id")
            content = block.get("content")
            text = _text(content, f"{at}.content") if content is not None else ""
            if block.get("is_error"):
                text = f"Error: {text}"
            results.append(ChatMessageIn(role="tool", content=text, tool_call_id=block["tool_use_id"]))
        elif kind in ("thinking", "redacted_thinking") and message.role == "assistant":
            continue  # an earlier answer's thoughts are not shown to the model again (as Anthropic does)
        else:
            raise refused(f"{at}.type", f"'{kind}' blocks are not supported in a {message.role} message "
                           "(text, tool_use from the assistant, tool_result from the user)")
    out = results
    text = "\n".join(texts)
    if message.role == "assistant":
        out.append(ChatMessageIn(role="assistant", content=text or (None if calls else ""),
                                 tool_calls=calls or None))
    elif text or not results:
        out.append(ChatMessageIn(role="user", content=text))
    return out


def _stop(final: Finished, called: bool) -> tuple[str, str | None]:
    if called:
        return "tool_use", None
    if final.reason == "length":
        return "max_tokens", None
    if final.stopped_by == "stop_sequence":
        return "stop_sequence", final.stop_sequence
    return "end_turn", None


def _usage(final: Finished | None) -> dict:
    if final is None:
        return {"input_tokens": 0, "output_tokens": 0}
    usage = final.usage
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens, "output_tokens": usage.completion_tokens,
            "cache_read_input_tokens": usage.cached_tokens, "cache_creation_input_tokens": 0}


def _tool_use(call: dict) -> dict:
    try:
        arguments = json.loads(call["function"]["arguments"] or "{}")
    except ValueError:
        arguments = {}
    return {"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
            "input": arguments if isinstance(arguments, dict) else {"value": arguments}}


def _thinking(text: str) -> dict:
    """A thinking block; its signature is empty (Shoal's thoughts are not signed)."""
    return {"type": "thinking", "thinking": text, "signature": ""}


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


@router.post("/v1/messages", summary="Create a message (Anthropic-compatible)")
async def messages(body: MessagesRequest, request: Request):
    plan = body.plan()
    handle = await admit(request, body.model, body.request(plan))
    ident, model = f"msg_{uuid.uuid4().hex[:24]}", handle.model
    shown = not (body.thinking and body.thinking.display == "omitted")
    if not body.stream:
        final = await result_or_disconnect(handle, request)
        thought, text = split(final.text, handle.request.thoughts)
        calls = plan.parse(text) if plan and final.reason == "stop" else None
        content = [_tool_use(c) for c in calls] if calls else [{"type": "text", "text": text}]
        if thought:
            content.insert(0, _thinking(thought if shown else ""))
        reason, sequence = _stop(final, bool(calls))
        return {"id": ident, "type": "message", "role": "assistant", "model": model, "content": content,
                "stop_reason": reason, "stop_sequence": sequence, "usage": _usage(final)}

    async def events():
        yield _event("message_start", {"message": {
            "id": ident, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": _usage(None)}})
        index, text_open, called, thinking = 0, False, False, False
        async for item in answer_events(handle, plan):
            if isinstance(item, Thought):
                if not item.text:
                    continue
                if not thinking:
                    yield _event("content_block_start", {"index": index, "content_block": _thinking("")})
                    thinking = True
                if shown:
                    yield _event("content_block_delta", {"index": index,
                                                         "delta": {"type": "thinking_delta", "thinking": item.text}})
                continue
            if thinking:
                yield _event("content_block_stop", {"index": index})
                index, thinking = index + 1, False
            if isinstance(item, Chunk):
                if not text_open:
                    yield _event("content_block_start", {"index": index,
                                                         "content_block": {"type": "text", "text": ""}})
                    text_open = True
                yield _event("content_block_delta", {"index": index,
                                                     "delta": {"type": "text_delta", "text": item.text}})
            elif isinstance(item, Calls):
                called = True
                for call in item.calls:
                    block = _tool_use(call)
                    yield _event("content_block_start", {"index": index, "content_block": {**block, "input": {}}})
                    yield _event("content_block_delta", {"index": index, "delta": {
                        "type": "input_json_delta", "partial_json": json.dumps(block["input"])}})
                    yield _event("content_block_stop", {"index": index})
                    index += 1
            elif isinstance(item, Finished):
                if text_open:
                    yield _event("content_block_stop", {"index": index})
                reason, sequence = _stop(item, called)
                yield _event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                               "usage": _usage(item)})
                yield _event("message_stop", {})
                return
            elif isinstance(item, Failed):
                error = item.error
                yield _event("error", {"error": {"type": ANTHROPIC_TYPES.get(error.status, "api_error"),
                                                 "message": error.message}})
                return

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/v1/messages/count_tokens", summary="Count a message's input tokens (Anthropic-compatible)")
async def count_tokens(body: CountTokensRequest, request: Request):
    plan = body.plan()
    chat = body.chat()
    gen = GenerationRequest(GenerationParams(), messages=history(chat), tools=plan.tool_dicts() if plan else None,
                            tool_prompt=plan.prompt() if plan else None, **body.prefilled(chat),
                            thinking=body.thinking.wish() if body.thinking else None)
    ids, _context = await services_of(request).tokenize(body.model, gen, caller_of(request))
    return {"input_tokens": len(ids)}
