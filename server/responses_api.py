"""OpenAI's Responses API: POST /v1/responses (streamed or not), what Codex CLI and the OpenAI
Agents SDK speak.

Translation only, as for chat completions: `instructions` and the `input` (text, or items:
messages with `input_text` / `output_text` parts, `function_call` and `function_call_output`)
become the same chat; `tools` (function tools), `tool_choice`, `parallel_tool_calls` and
`text.format` (json_object / json_schema, enforced while decoding) go through the same tool plan
and constraints. The answer is `output` items (a `message` with `output_text`, or `function_call`
items); a stream sends the event types the `openai` SDK parses (`response.created`,
`response.output_item.added`, `response.output_text.delta`, `response.function_call_arguments.delta`,
..., `response.completed` / `response.incomplete`).

A model that thinks (`llm_pool/reasoning.py`) gives a `reasoning` item before its answer, with the
thoughts as `reasoning_text` content (streamed as `response.reasoning_text.delta` / `.done`; the
summary stays empty) and their tokens in `usage.output_tokens_details.reasoning_tokens`;
`reasoning.effort` switches thinking where the model's template allows it (else a 400 naming it).

Stored and durable, per user (`service/responses.py`): with `store` (OpenAI's default, for a
caller with an identity: a key, or the trusted local owner) a response and its conversation are
kept as one of the user's chats, so `previous_response_id` and `conversation` (a chat's id)
continue it, across restarts, and the user can open it in the UI. `GET` / `DELETE
/v1/responses/{id}`. A caller without an identity (keys off, a stranger) gets `store: false`
unless it asks for storage, which is then a 401 as for sessions. `background` is refused by name.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from llm_pool import Finished, GenerationParams, GenerationRequest, Message
from llm_pool.chat_format import ToolCall
from llm_pool.constraints import OutputFormat
from llm_pool.errors import AuthenticationError, InvalidParamsError, NotFoundError, ShoalError
from llm_pool.reasoning import Thinking
from llm_pool.stream import Failed
from memory.context import Passage, passages_prompt
from memory.store import StoredMessage
from service.mcp import McpTool
from service.mcp import function_name as mcp_function_name
from service.responses import Opening, answer_messages

from .auth import caller_of
from .context import admit, services_of
from .errors import from_client
from .openai_api import ChatMessageIn
from .protocol import MaxTokens, ModelRef, Seed, Temperature, TopP, refused, screened
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
    thoughts_of,
)

router = APIRouter(tags=["OpenAI-compatible"])

IGNORED = frozenset({"metadata", "service_tier", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
                     "prompt_cache_options", "user", "truncation", "include", "stream_options", "moderation"})
NOT_SUPPORTED = {
    "background": "background responses are not supported (stream instead)",
    "prompt": "stored prompt templates are not supported",
    "top_logprobs": "logprobs on responses are not supported yet (use /v1/chat/completions)",
    "access_programs": "not supported", "background_options": "not supported", "image": "not supported",
    "context_management": "not supported",
}


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str = Field(pattern=NAME)
    description: str | None = Field(None, max_length=8192)
    parameters: dict | None = None
    strict: bool | None = Field(None, description="Accepted; with required or a named tool the schema is "
                                "always enforced.")



class McpToolFilter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tool_names: list[str] | None = Field(None, max_length=256)
    read_only: bool | None = None


class McpApprovalFilter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    never: McpToolFilter | None = None


class McpToolIn(BaseModel):
    """OpenAI's `mcp` tool, naming one of the MCP servers the operator configured (--mcp-config)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["mcp"]
    server_label: str = Field(max_length=64, description="The name of a server in the operator's --mcp-config.")
    allowed_tools: list[str] | McpToolFilter | None = Field(None, description="Only these of its tools.")
    require_approval: Literal["never"] | McpApprovalFilter | None = Field(
        None, description="Shoal runs the calls itself, without an approval round trip (never).")
    server_description: str | None = Field(None, max_length=4096, description="Accepted; the server's tools "
                                           "carry their own descriptions.")

    @model_validator(mode="before")
    @classmethod
    def _configured_only(cls, data):
        if isinstance(data, dict):
            for field in ("server_url", "connector_id", "tunnel_id", "headers", "authorization"):
                if data.get(field) is not None:
                    raise refused(field, "Shoal calls only the MCP servers its operator configured "
                                  "(--mcp-config); name one by server_label")
            if data.get("require_approval") == "always":
                raise refused("require_approval", "approvals are not supported: Shoal runs the calls of the "
                              "operator's servers itself (use 'never')")
            if data.get("defer_loading"):
                raise refused("defer_loading", "not supported")
        return data

    def allowed(self) -> set[str] | None:
        if isinstance(self.allowed_tools, McpToolFilter):
            if self.allowed_tools.read_only:
                raise refused("allowed_tools.read_only", "not supported (name the tools in tool_names)")
            return set(self.allowed_tools.tool_names) if self.allowed_tools.tool_names is not None else None
        return set(self.allowed_tools) if self.allowed_tools is not None else None


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str = Field(pattern=NAME)


class NamedMcpTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["mcp"]
    server_label: str = Field(max_length=64)
    name: str | None = Field(None, max_length=128, description="One tool of that server (else any of them).")


class ReasoningConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = Field(
        None, description="none: no thinking; a level: thinking (passed to a template that reads it). Only for a "
        "model that thinks and whose template switches it.")
    summary: Literal["auto", "concise", "detailed"] | None = Field(None, description="Accepted; the thoughts "
                                                                    "come whole, as reasoning_text, not summarized.")
    generate_summary: Literal["auto", "concise", "detailed"] | None = Field(None, description="Deprecated "
                                                                             "form of summary.")


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    description: str | None = Field(None, max_length=4096)
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = Field(None, description="Only medium (the model's own) is supported.")


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _screen(cls, data):
        if isinstance(data, dict) and isinstance(data.get("conversation"), dict):
            data = {**data, "conversation": data["conversation"].get("id")}
        if isinstance(data, dict) and isinstance(data.get("tools"), list):
            for i, tool in enumerate(data["tools"]):
                kind = tool.get("type") if isinstance(tool, dict) else None
                if kind not in ("function", "mcp"):
                    raise refused(f"tools.{i}.type", f"'{kind}' tools are not supported (function tools, and mcp "
                                  "tools naming the operator's MCP servers)")
        return screened(data, IGNORED, NOT_SUPPORTED, lambda field, value: value in (None, False, {}))

    model: ModelRef = None
    input: str | list[dict[str, Any]] = Field(description="Text, or input items (messages, function_call, "
                                              "function_call_output).")
    instructions: str | None = Field(None, max_length=1_000_000)
    max_output_tokens: MaxTokens = None
    temperature: Temperature = None
    top_p: TopP = None
    seed: Seed = None
    stream: bool = False
    tools: list[Annotated[FunctionTool | McpToolIn, Field(discriminator="type")]] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | NamedMcpTool | None = None
    max_tool_calls: int | None = Field(None, ge=1, le=50, description="MCP calls Shoal runs for this response "
                                       "at most (and never more than --mcp-max-steps).")
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    grammar: str | None = Field(None, description="Shoal's extension, as on chat completions: llama.cpp's GBNF "
                                "grammar; the output (thoughts included) is a sentence of it.")
    reasoning: ReasoningConfig | None = None
    store: bool | None = Field(None, description="Keep the response and its conversation as one of your "
                               "chats (the default when you have an identity).")
    previous_response_id: str | None = Field(None, max_length=100, description="Continue from this stored "
                                             "response (a branch if its chat has moved on).")
    conversation: str | None = Field(None, max_length=100, description="A chat's id: continue it at its end.")

    def chat(self) -> list[ChatMessageIn]:
        """The new messages of this request (not the instructions, not a stored history)."""
        return from_client("input", self._chat)

    def _chat(self) -> list[ChatMessageIn]:
        out: list[ChatMessageIn] = []
        if isinstance(self.input, str):
            return [ChatMessageIn(role="user", content=self.input)]
        calls: list[dict] = []  # consecutive function_call items make one assistant turn
        for i, item in enumerate(self.input):
            kind, at = item.get("type", "message"), f"input.{i}"
            if kind != "function_call" and calls:
                out.append(ChatMessageIn(role="assistant", content=None, tool_calls=calls))
                calls = []
            if kind == "message":
                role = item.get("role")
                if role not in ("user", "assistant", "system", "developer"):
                    raise InvalidParamsError(f"{at}.role: one of user, assistant, system, developer",
                                             param=f"{at}.role")
                out.append(ChatMessageIn(role=role, content=_text(item.get("content"), f"{at}.content")))
            elif kind == "function_call":
                if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                    raise InvalidParamsError(f"{at}: a function_call item has call_id, name and arguments", param=at)
                calls.append({"id": item["call_id"],
                              "function": {"name": item["name"], "arguments": item["arguments"]}})
            elif kind == "function_call_output":
                output = item.get("output")
                if not isinstance(item.get("call_id"), str) or output is None:
                    raise InvalidParamsError(f"{at}: a function_call_output item has call_id and output", param=at)
                text = output if isinstance(output, str) else _text(output, f"{at}.output")
                out.append(ChatMessageIn(role="tool", content=text, tool_call_id=item["call_id"]))
            elif kind == "mcp_call":  # an MCP call Shoal ran, sent back (store: false): the call and its result
                if not all(isinstance(item.get(k), str) for k in ("id", "server_label", "name", "arguments")):
                    raise InvalidParamsError(f"{at}: an mcp_call item has id, server_label, name and arguments",
                                             param=at)
                out.append(ChatMessageIn(role="assistant", content=None, tool_calls=[{
                    "id": item["id"], "function": {"name": mcp_function_name(item["server_label"], item["name"]),
                                                   "arguments": item["arguments"]}}]))
                error = item.get("error")
                result = item.get("output") if item.get("output") is not None else \
                    f"error: {error.get('message') or error.get('content') if isinstance(error, dict) else error}"
                out.append(ChatMessageIn(role="tool", content=str(result), tool_call_id=item["id"]))
            elif kind in ("reasoning", "mcp_list_tools"):
                continue  # another model's thoughts, or a listing the tools themselves repeat
            else:
                raise refused(f"{at}.type", f"'{kind}' items are not supported (message, function_call, "
                               "function_call_output, mcp_call, mcp_list_tools, reasoning)")
        if calls:
            out.append(ChatMessageIn(role="assistant", content=None, tool_calls=calls))
        return out

    def input_items(self) -> list[dict[str, Any]]:
        """The input as items with ids, as `GET /v1/responses/{id}/input_items` lists them."""
        items = [{"type": "message", "role": "user", "content": self.input}] if isinstance(self.input, str) \
            else [dict(item) for item in self.input]
        for item in items:
            kind = item.setdefault("type", "message")
            if kind == "message":
                part = "output_text" if item.get("role") == "assistant" else "input_text"
                if isinstance(item.get("content"), str):
                    item["content"] = [{"type": part, "text": item["content"]}]
                item.setdefault("status", "completed")
            item.setdefault("id", f"{'msg' if kind == 'message' else 'item'}_{uuid.uuid4().hex[:24]}")
        return items

    def mcp_servers(self) -> list[McpToolIn]:
        return [t for t in self.tools or () if isinstance(t, McpToolIn)]

    def plan(self, mcp_tools: list[McpTool] = ()) -> ToolPlan | None:
        tools = [ToolDef.of(t.name, t.description, t.parameters) for t in self.tools or ()
                 if isinstance(t, FunctionTool)]
        tools += [ToolDef.of(**t.function()) for t in mcp_tools]
        tools = tools or None
        choice = self.tool_choice
        if isinstance(choice, NamedMcpTool):
            named = [t for t in mcp_tools if t.server == choice.server_label and choice.name in (None, t.name)]
            if not named:
                raise InvalidParamsError("tool_choice: no such tool among the request's mcp tools",
                                         param="tool_choice")
            choice = "required" if choice.name is None else NamedToolChoice(
                type="function", function=FunctionName(name=named[0].function_name))
        if isinstance(choice, NamedFunction):
            choice = NamedToolChoice(type="function", function=FunctionName(name=choice.name))
        plan = ToolPlan.of(tools, choice, self.parallel_tool_calls)
        if plan is not None and self.format() is not None:
            raise InvalidParamsError("text.format: not with tools (a call's arguments already follow its schema)",
                                     param="text.format")
        return plan

    def format(self) -> OutputFormat | None:
        wanted = self.text.format if self.text else None
        if self.grammar is not None:
            if (wanted is not None and wanted.type != "text") or self.tools:
                raise InvalidParamsError("grammar: not with text.format or tools (send one of them)", param="grammar")
            return OutputFormat.gbnf(self.grammar)
        if wanted is None or wanted.type == "text":
            return None
        if wanted.type == "json_object":
            return OutputFormat.json(None)
        if wanted.schema_ is None:
            raise InvalidParamsError("text.format.schema: required for json_schema", param="text.format.schema")
        return OutputFormat.json(wanted.schema_, param="text.format.schema")

    def request(self, plan: ToolPlan | None, earlier: list[Message] = (), ran: list[Message] = (),
                passages: list[Passage] = (), chat: str | None = None) -> GenerationRequest:
        """`chat`: the stored chat this continues (its KV may be kept on disk, kv_disk)."""
        params = GenerationParams.validated(max_new_tokens=self.max_output_tokens, temperature=self.temperature,
                                            top_p=self.top_p, seed=self.seed)
        opening = [Message("system", self.instructions)] if self.instructions else []
        if passages:  # from the files of the stored chat this continues
            opening.append(Message("system", passages_prompt(passages)))
        return GenerationRequest(params, messages=[*opening, *earlier, *history(self.chat()), *ran],
                                 output_format=plan.output_format() if plan else self.format(),
                                 tools=plan.tool_dicts() if plan else None,
                                 tool_prompt=plan.prompt() if plan else None, cache_key=chat,
                                 thinking=Thinking.of_effort(self.reasoning.effort, "reasoning.effort")
                                 if self.reasoning else None)


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidParamsError(f"{where}: text or a list of text parts", param=where)
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise refused(f"{where}.{i}.type", f"'{kind}' parts are not supported, only input_text and output_text")
        parts.append(part["text"])
    return "".join(parts)


class _Answer:
    """The response object, as it grows while streaming and as it is returned."""

    def __init__(self, body: ResponsesRequest, model: str, store: bool, passages: list[Passage] = ()):
        self.passages = list(passages)
        self.body = body
        self.store = store
        self.conversation: str | None = None
        self.id = f"resp_{uuid.uuid4().hex[:24]}"
        self.model = model
        self.created = int(time.time())
        self.output: list[dict] = []
        self.final: Finished | None = None
        self.spent: list[Finished] = []  # every generation of this response (one per MCP step, and the last)
        self.reasoning_tokens = 0

    @staticmethod
    def reasoning(text: str, status: str = "completed") -> dict:
        return {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex[:24]}", "status": status, "summary": [],
                "content": [{"type": "reasoning_text", "text": text}]}

    def message(self, text: str, status: str = "completed") -> dict:
        return {"type": "message", "id": f"msg_{uuid.uuid4().hex[:24]}", "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": self.annotations(text),
                             "logprobs": []}]}

    def annotations(self, text: str) -> list[dict]:
        """Where the answer cites a passage of the chat's files by its number, a file_citation."""
        out = []
        for number, passage in enumerate(self.passages, 1):
            at = text.find(f"[{number}]")
            if at >= 0 and passage.meta.get("file"):
                out.append({"type": "file_citation", "file_id": passage.meta.get("file_id") or "",
                            "filename": passage.meta["file"], "index": at})
        return sorted(out, key=lambda a: a["index"])

    @staticmethod
    def call(call: dict, status: str = "completed") -> dict:
        return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:24]}", "call_id": call["id"],
                "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": status}

    def status(self) -> str:
        if self.final is None:
            return "in_progress"
        return "incomplete" if self.final.reason == "length" else "completed"

    def usage(self) -> dict | None:
        if self.final is None:
            return None
        spent = self.spent or [self.final]
        prompt = sum(f.usage.prompt_tokens for f in spent)
        completion = sum(f.usage.completion_tokens for f in spent)
        cached = sum(f.usage.cached_tokens for f in spent)
        disk = sum(f.usage.disk_tokens for f in spent)
        return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached,
                                                                 "cached_tokens_from_disk": disk},
                "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                "total_tokens": prompt + completion}

    def dict(self) -> dict:
        body = self.body
        fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format \
            else {"type": "text"}
        choice = body.tool_choice
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": self.status(),
            "model": self.model, "output": self.output, "usage": self.usage(), "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if self.status() == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature, "top_p": body.top_p, "metadata": {}, "store": self.store,
            "previous_response_id": body.previous_response_id,
            "conversation": {"id": self.conversation} if self.conversation else None,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "tool_choice": choice.model_dump(exclude_none=True) if isinstance(choice, NamedFunction | NamedMcpTool)
            else (choice or "auto"),
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or ()],
            "text": {"format": fmt}, "truncation": "disabled",
            "reasoning": body.reasoning.model_dump(exclude={"generate_summary"}) if body.reasoning else None,
        }


def _stored(messages: list[ChatMessageIn]) -> list[StoredMessage]:
    """The request's new messages as a chat stores them (a tool's output as the user's answer to
    the call, as in the UI's chats)."""
    out = []
    for m in messages:
        if m.role == "tool":
            out.append(StoredMessage("user", m.text(), meta={"tool_call_id": m.tool_call_id}))
        elif m.role == "assistant" and m.tool_calls:
            calls = [{"id": c.id, "type": "function", "function": c.function.model_dump()} for c in m.tool_calls]
            out.append(StoredMessage("assistant", m.text(), meta={"tool_calls": calls, "finish_reason": "tool_calls"}))
        else:
            out.append(StoredMessage("system" if m.role == "developer" else m.role, m.text()))
    return out


class _McpRun:
    """The request's MCP tools and the calls Shoal runs for it (the call -> result -> continue loop)."""

    def __init__(self, services, caller, body: ResponsesRequest):
        self.services, self.caller, self.body = services, caller, body
        self.tools: list[McpTool] = []
        self.listed: list[dict] = []  # mcp_list_tools items, one per server
        self.limit = min(body.max_tool_calls or services.settings.mcp_max_steps, services.settings.mcp_max_steps)
        self.steps = 0
        self.ran: list[Message] = []  # the calls and results, as the model reads them next
        self.stored: list[StoredMessage] = []  # the same, as the chat stores them

    async def open(self) -> None:
        wanted = self.body.mcp_servers()
        if not wanted:
            return
        if self.caller.user is None:
            raise AuthenticationError(self.services.identity.user_refusal(), param="tools", code="api_key_required")
        for i, tool in enumerate(wanted):
            self.services.mcp.check([tool.server_label], f"tools.{i}.server_label")
            found = await self.services.mcp.tools([tool.server_label], tool.allowed())
            self.tools += found
            self.listed.append({"type": "mcp_list_tools", "id": f"mcpl_{uuid.uuid4().hex[:24]}",
                                "server_label": tool.server_label, "error": None,
                                "tools": [{"name": t.name, "description": t.description, "input_schema": t.schema,
                                           "annotations": None} for t in found]})

    def runnable(self, calls: list[dict] | None) -> list[tuple[dict, McpTool]] | None:
        """The calls Shoal runs itself: all of the answer's calls, when each is an MCP tool's."""
        if not calls or self.steps >= self.limit:
            return None
        found = [(c, next((t for t in self.tools if t.function_name == c["function"]["name"]), None)) for c in calls]
        return found if all(t is not None for _, t in found) else None

    async def run(self, call: dict, tool: McpTool) -> dict:
        self.steps += 1
        result = await self.services.mcp.call(tool, call["function"]["arguments"], self.caller.user)
        self.ran += [Message("assistant", "", (ToolCall(call["id"], call["function"]["name"],
                                                       call["function"]["arguments"]),)),
                     Message("tool", result.text or "(no output)", tool_call_id=call["id"])]
        self.stored += [StoredMessage("assistant", "", meta={"tool_calls": [call], "finish_reason": "tool_calls"}),
                        StoredMessage("user", result.text or "(no output)", meta={
                            "tool_call_id": call["id"], "tool": call["function"]["name"], "mcp_server": tool.server,
                            "mcp_tool": tool.name, **({"mcp_error": True} if result.error else {})})]
        return {"type": "mcp_call", "id": f"mcp_{uuid.uuid4().hex[:24]}", "server_label": tool.server,
                "name": tool.name, "arguments": call["function"]["arguments"], "approval_request_id": None,
                "output": None if result.error else result.text, "status": "failed" if result.error else "completed",
                "error": {"type": "mcp_tool_execution_error", "content": result.text} if result.error else None}

    def next_request(self, plan: ToolPlan, opening: Opening, passages: list[Passage]) -> GenerationRequest:
        """After a result the model answers freely (auto), as after a client's function output."""
        return self.body.request(plan.after_result(), opening.messages(), self.ran, passages,
                                 chat=opening.session_id)


async def _passages(services, caller, opening: Opening, body: ResponsesRequest) -> list[Passage]:
    """A stored chat's files answer on this route too: passages for the newest user message (the
    chat's own turns are all in the prompt already, so only files are searched)."""
    if opening.session_id is None or services.documents is None:
        return []
    query = next((m.text() for m in reversed(body.chat()) if m.role == "user"), "")
    if not query.strip():
        return []
    return await asyncio.to_thread(services.documents.retrieve, caller.user, opening.session_id, query,
                                   exclude_turns_from=0)


@router.post("/v1/responses", summary="Create a response (OpenAI Responses API)")
async def create_response(body: ResponsesRequest, request: Request):
    services, caller = services_of(request), caller_of(request)
    store = body.store if body.store is not None else caller.user is not None
    if (store or body.previous_response_id or body.conversation) and caller.user is None:
        field = "store" if body.store else "previous_response_id" if body.previous_response_id else "conversation"
        raise AuthenticationError(services.identity.user_refusal(), param=field, code="api_key_required")
    if body.previous_response_id and body.conversation:
        raise InvalidParamsError("send previous_response_id or conversation, not both", param="conversation")
    mcp = _McpRun(services, caller, body)
    await mcp.open()
    plan = body.plan(mcp.tools)
    opening = Opening()
    if body.previous_response_id or body.conversation:
        opening = await asyncio.to_thread(services.responses.opening, caller.user, body.previous_response_id,
                                          body.conversation)
    passages = await _passages(services, caller, opening, body)
    handle = await admit(request, body.model, body.request(plan, opening.messages(), passages=passages,
                                                           chat=opening.session_id))
    answer = _Answer(body, handle.model, store, passages)

    async def keep(final: Finished, calls: list[dict] | None) -> None:
        if store:
            reply = answer_messages(final, calls, handle.request.thoughts)
            if passages:  # kept with the answer, as the UI's chats keep them
                reply.meta["sources"] = [p.citation() for p in passages]
            new = [*_stored(body.chat()), *mcp.stored, reply]
            answer.conversation = await asyncio.to_thread(services.responses.save, caller.user, opening, new,
                                                          answer.dict(), handle.model, body.input_items())

    if not body.stream:
        answer.output += mcp.listed
        while True:
            marks = handle.request.thoughts
            pieces: list[Chunk] | None = [] if marks else None
            answer.final = await result_or_disconnect(handle, request, pieces)
            answer.spent.append(answer.final)
            thought, said, spent = thoughts_of(pieces or [], marks)
            text = "".join(c.text for c in said) if marks else answer.final.text
            answer.reasoning_tokens += spent
            if thought:
                answer.output.append(answer.reasoning(thought))
            current = plan if not mcp.steps else plan.after_result()
            calls = current.parse(text) if plan and answer.final.reason == "stop" else None
            runnable = mcp.runnable(calls)
            if not runnable:
                break
            for call, tool in runnable:
                answer.output.append(await mcp.run(call, tool))
            handle = await admit(request, body.model, mcp.next_request(plan, opening, passages))
        answer.output += [answer.call(c) for c in calls] if calls else [answer.message(text)]
        await keep(answer.final, calls)
        return answer.dict()

    sequence = 0

    def event(kind: str, **data) -> str:
        nonlocal sequence
        sequence += 1
        payload = {"type": kind, "sequence_number": sequence - 1, **data}
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def events():
        nonlocal handle
        yield event("response.created", response=answer.dict())
        yield event("response.in_progress", response=answer.dict())
        for at, listed in enumerate(mcp.listed):
            answer.output.append(listed)
            yield event("response.output_item.added", output_index=at, item={**listed, "tools": []})
            yield event("response.mcp_list_tools.in_progress", item_id=listed["id"], output_index=at)
            yield event("response.mcp_list_tools.completed", item_id=listed["id"], output_index=at)
            yield event("response.output_item.done", output_index=at, item=listed)
        while True:
            text: list[str] = []
            message: dict | None = None
            called: list[dict] | None = None
            thinking: dict | None = None  # the reasoning item, while the model thinks
            thought: list[str] = []
            async for item in answer_events(handle, plan if not mcp.steps else plan.after_result()):
                if isinstance(item, Thought):
                    answer.reasoning_tokens += item.tokens
                    if not item.text:
                        continue
                    if thinking is None:
                        thinking = answer.reasoning("", "in_progress")
                        thinking["content"] = []
                        answer.output.append(thinking)
                        rat = len(answer.output) - 1
                        yield event("response.output_item.added", output_index=rat, item=thinking)
                        yield event("response.content_part.added", item_id=thinking["id"], output_index=rat,
                                    content_index=0, part={"type": "reasoning_text", "text": ""})
                    thought.append(item.text)
                    yield event("response.reasoning_text.delta", item_id=thinking["id"], output_index=rat,
                                content_index=0, delta=item.text)
                    continue
                if thinking is not None and thinking["status"] == "in_progress":
                    part = {"type": "reasoning_text", "text": "".join(thought)}
                    thinking.update(status="completed", content=[part])
                    yield event("response.reasoning_text.done", item_id=thinking["id"], output_index=rat,
                                content_index=0, text=part["text"])
                    yield event("response.content_part.done", item_id=thinking["id"], output_index=rat,
                                content_index=0, part=part)
                    yield event("response.output_item.done", output_index=rat, item=thinking)
                if isinstance(item, Chunk):
                    if message is None:
                        message = answer.message("", "in_progress")
                        message["content"] = []
                        answer.output.append(message)
                        at = len(answer.output) - 1
                        yield event("response.output_item.added", output_index=at, item=message)
                        yield event("response.content_part.added", item_id=message["id"], output_index=at,
                                    content_index=0, part={"type": "output_text", "text": "", "annotations": []})
                    text.append(item.text)
                    yield event("response.output_text.delta", item_id=message["id"], output_index=at,
                                content_index=0, delta=item.text, logprobs=[])
                elif isinstance(item, Calls):
                    called = item.calls
                    if mcp.runnable(called):
                        continue  # run below, once the answer has finished
                    for call in item.calls:
                        done = answer.call(call)
                        at = len(answer.output)
                        answer.output.append(done)
                        yield event("response.output_item.added", output_index=at,
                                    item={**done, "arguments": "", "status": "in_progress"})
                        yield event("response.function_call_arguments.delta", item_id=done["id"], output_index=at,
                                    delta=done["arguments"])
                        yield event("response.function_call_arguments.done", item_id=done["id"], output_index=at,
                                    name=done["name"], arguments=done["arguments"])
                        yield event("response.output_item.done", output_index=at, item=done)
                elif isinstance(item, Finished):
                    answer.final = item
                    answer.spent.append(item)
                    runnable = mcp.runnable(called)
                    if runnable:
                        break
                    try:
                        await keep(item, called)
                    except ShoalError as exc:
                        yield event("error", code=exc.code or exc.type, message=exc.message, param=exc.param)
                        yield event("response.failed", response={**answer.dict(), "status": "failed", "error": {
                            "code": exc.code or "server_error", "message": exc.message}})
                        return
                    if message is not None:
                        whole = "".join(text)
                        part = {"type": "output_text", "text": whole, "annotations": answer.annotations(whole),
                                "logprobs": []}
                        message.update(status="completed", content=[part])
                        yield event("response.output_text.done", item_id=message["id"], output_index=at,
                                    content_index=0, text=whole, logprobs=[])
                        yield event("response.content_part.done", item_id=message["id"], output_index=at,
                                    content_index=0, part=part)
                        yield event("response.output_item.done", output_index=at, item=message)
                    kind = "response.incomplete" if answer.status() == "incomplete" else "response.completed"
                    yield event(kind, response=answer.dict())
                    return
                elif isinstance(item, Failed):
                    error = item.error
                    yield event("error", code=error.code or error.type, message=error.message, param=error.param)
                    failed = {**answer.dict(), "status": "failed", "error": {"code": error.code or "server_error",
                                                                               "message": error.message}}
                    yield event("response.failed", response=failed)
                    return
            for call, tool in runnable:
                at = len(answer.output)
                pending = {"type": "mcp_call", "id": f"mcp_{uuid.uuid4().hex[:24]}", "server_label": tool.server,
                           "name": tool.name, "arguments": "", "status": "in_progress", "output": None,
                           "error": None, "approval_request_id": None}
                answer.output.append(pending)
                yield event("response.output_item.added", output_index=at, item=pending)
                yield event("response.mcp_call_arguments.delta", item_id=pending["id"], output_index=at,
                            delta=call["function"]["arguments"])
                yield event("response.mcp_call_arguments.done", item_id=pending["id"], output_index=at,
                            arguments=call["function"]["arguments"])
                yield event("response.mcp_call.in_progress", item_id=pending["id"], output_index=at)
                done = {**await mcp.run(call, tool), "id": pending["id"]}
                answer.output[at] = done
                yield event("response.mcp_call.failed" if done["error"] else "response.mcp_call.completed",
                            item_id=done["id"], output_index=at)
                yield event("response.output_item.done", output_index=at, item=done)
            try:
                handle = await admit(request, body.model, mcp.next_request(plan, opening, passages))
            except ShoalError as exc:
                yield event("error", code=exc.code or exc.type, message=exc.message, param=exc.param)
                yield event("response.failed", response={**answer.dict(), "status": "failed", "error": {
                    "code": exc.code or "server_error", "message": exc.message}})
                return

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.get("/v1/responses/{response_id}", summary="A stored response (OpenAI Responses API)")
async def get_response(response_id: str, request: Request):
    caller = caller_of(request)
    if caller.user is None:
        raise NotFoundError(f"response '{response_id[:100]}' not found", param="response_id", code="response_not_found")
    return await asyncio.to_thread(services_of(request).responses.get, caller.user, response_id)


@router.get("/v1/responses/{response_id}/input_items", summary="The input items of a stored response")
async def list_input_items(response_id: str, request: Request,
                           order: Literal["asc", "desc"] = Query("desc", description="Newest first (desc), as OpenAI."),
                           limit: int = Query(20, ge=1, le=100), after: str | None = Query(None, max_length=100)):
    caller = caller_of(request)
    if caller.user is None:
        raise NotFoundError(f"response '{response_id[:100]}' not found", param="response_id", code="response_not_found")
    items = await asyncio.to_thread(services_of(request).responses.input_items, caller.user, response_id)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise InvalidParamsError(f"after: no input item '{after}' in this response", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


@router.delete("/v1/responses/{response_id}", summary="Delete a stored response (its chat stays)")
async def delete_response(response_id: str, request: Request):
    caller = caller_of(request)
    if caller.user is None:
        raise NotFoundError(f"response '{response_id[:100]}' not found", param="response_id", code="response_not_found")
    await asyncio.to_thread(services_of(request).responses.delete, caller.user, response_id)
    return {"id": response_id, "object": "response", "deleted": True}


@router.post("/v1/responses/{response_id}/cancel", summary="Cancel a background response")
async def cancel_response(response_id: str):
    raise InvalidParamsError("only background responses can be cancelled, and they are not supported (close the "
                             "stream to cancel a response)", param="response_id")
