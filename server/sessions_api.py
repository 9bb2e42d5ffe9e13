"""REST routes for chat sessions, so notebooks can use them: create, list, read, change, delete,
and send a message (answered whole, or streamed as server-sent events). Owner: a user (the API
key's owner; with keys off, the machine's owner on loopback); anyone else gets 401. Handlers that
touch the store are plain functions, which FastAPI runs off the event loop."""

from __future__ import annotations

import time
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from llm_pool import Finished, ShoalError
from llm_pool.reasoning import split
from llm_pool.stream import Failed
from memory.store import MAX_QUERY, StorageError
from service.identity import Caller

from .auth import user_caller
from .context import services_of
from .protocol import SamplingParams, timings, usage_dict
from .streaming import SSE_HEADERS, Chunk, chunked, result_or_disconnect, sse
from .tool_calls import Thought, ThoughtReader, ToolDef, session_tools

router = APIRouter(tags=["sessions"])
User = Depends(user_caller)


class SessionParams(SamplingParams):
    pass  # stored with the session (or sent for one message); its own name in /docs


class ContextPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_history_messages: int | None = Field(None, ge=0, le=100_000,
                                             description="Most history messages to send (None: all that fit).")


TOOLS = ("Functions the model may call in this session (OpenAI tool objects). A reply that calls one is "
         "stored with its tool_calls; the next message you send is that call's result.")
SYSTEM_PROMPT = "At most --max-system-prompt-chars characters (else 413)."
MCP_SERVERS = ("MCP servers (names from the operator's --mcp-config, see GET /v1/mcp/servers) whose tools the model "
               "may call in this session; Shoal runs each call and the model answers from its result.")
TOOL_CHOICE = "auto, or required: every message you write is answered with a call (the turn after a result: auto)."


class NewSession(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field("New chat", max_length=200)
    model: str | None = Field(None, max_length=200)
    system_prompt: str = Field("", description=SYSTEM_PROMPT)
    params: SessionParams = Field(default_factory=SessionParams)
    context_policy: ContextPolicy = Field(default_factory=ContextPolicy)
    tools: list[ToolDef] = Field(default_factory=list, max_length=128, description=TOOLS)
    tool_choice: Literal["auto", "required"] = Field("auto", description=TOOL_CHOICE)
    mcp_servers: list[str] = Field(default_factory=list, max_length=16, description=MCP_SERVERS)


class SessionChanges(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(None, max_length=200)
    model: str | None = Field(None, max_length=200)
    system_prompt: str | None = Field(None, description=SYSTEM_PROMPT)
    params: SessionParams | None = None
    context_policy: ContextPolicy | None = None
    tools: list[ToolDef] | None = Field(None, max_length=128, description=TOOLS + " [] removes them.")
    tool_choice: Literal["auto", "required"] | None = Field(None, description=TOOL_CHOICE)
    mcp_servers: list[str] | None = Field(None, max_length=16, description=MCP_SERVERS)


class NewMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: str = Field(min_length=1, description="At most --max-message-chars characters (else 413).")
    stream: bool = False
    params: SessionParams = Field(default_factory=SessionParams, description="For this message only.")
    chunk_size: int = Field(1, ge=1, le=256)
    stream_delay_ms: int = Field(0, ge=0, le=10_000)
    wait_for_files: bool = Field(True, description="While a file of the session is still being read, wait "
                                 "for it (up to 30 s, then 409); false answers at once from what is ready.")
    replace_from: int | None = Field(
        None, ge=0, description="Edit or regenerate: the index of one of your earlier messages; this turn "
        "replaces the chat from there on, and what it replaces is kept as another version of the chat "
        "(GET .../messages/{index}/versions, PATCH .../messages/{index} to go back to it).")


class VersionChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=0, description="Which version of the messages from this index on the chat goes on "
                                           "with (0 = the first; see the message's `versions`).")


def _policy(policy: ContextPolicy | None) -> dict | None:
    if policy is None:
        return None
    return {k: v for k, v in policy.model_dump().items() if v is not None}


@router.post("/v1/sessions", status_code=201, summary="Create a chat session")
def create_session(body: NewSession, request: Request, caller: Caller = User) -> dict:
    chat = services_of(request).chat
    session = chat.create(caller.user, title=body.title, model=body.model,
                          system_prompt=body.system_prompt, params=body.params.values(),
                          context_policy=_policy(body.context_policy), tools=session_tools(body.tools),
                          tool_choice=body.tool_choice, mcp_servers=body.mcp_servers)
    return session.public()


@router.get("/v1/sessions", summary="Your sessions, most recently used first")
def list_sessions(request: Request, caller: Caller = User,
                  q: str | None = Query(None, max_length=MAX_QUERY,
                                        description="Only sessions whose title or any message contains this text "
                                                    "(case-insensitive)")) -> dict:
    sessions = services_of(request).chat.search(caller.user, q)
    return {"object": "list", "data": [s.public() for s in sessions]}


@router.get("/v1/sessions/{session_id}", summary="A session with its messages")
def get_session(session_id: str, request: Request, caller: Caller = User) -> dict:
    chat, user = services_of(request).chat, caller.user
    return _with_messages(chat, user, chat.get(user, session_id))


def _with_messages(chat, user: str, session) -> dict:
    """A session with its messages (the chosen version of each fork): each message has its `index`;
    one where an edit or a regenerate started another version has `versions`: {"selected", "count"}."""
    messages, forks = chat.thread(user, session.id)
    shown = []
    for index, m in enumerate(messages):
        extra = {"versions": {"selected": forks[index][0], "count": forks[index][1]}} if index in forks else {}
        shown.append({"index": index, "role": m.role, "content": m.content, "created": m.created, **m.meta, **extra})
    return {**session.public(), "messages": shown}


@router.patch("/v1/sessions/{session_id}", summary="Rename, or change model, prompt, parameters")
def change_session(session_id: str, body: SessionChanges, request: Request, caller: Caller = User) -> dict:
    chat = services_of(request).chat
    changes = {"title": body.title, "model": body.model, "system_prompt": body.system_prompt,
               "params": body.params.values() if body.params else None,
               "context_policy": _policy(body.context_policy), "tools": session_tools(body.tools),
               "tool_choice": body.tool_choice, "mcp_servers": body.mcp_servers}
    return chat.update(caller.user, session_id, **changes).public()


@router.delete("/v1/sessions/{session_id}", summary="Delete a session, its files and memory")
def delete_session(session_id: str, request: Request, caller: Caller = User) -> dict:
    services_of(request).chat.delete(caller.user, session_id)
    return {"id": session_id, "deleted": True}


@router.delete("/v1/sessions/{session_id}/messages", summary="Delete a session's messages (it stays, with its "
               "settings and files)")
def clear_session(session_id: str, request: Request, caller: Caller = User) -> dict:
    session = services_of(request).chat.clear(caller.user, session_id)
    return {**session.public(), "messages": []}


@router.get("/v1/sessions/{session_id}/messages/{index}/versions",
            summary="The versions of a chat from one message on (what edits and regenerates replaced)")
def list_versions(session_id: str, index: int, request: Request, caller: Caller = User) -> dict:
    versions = services_of(request).chat.versions(caller.user, session_id, index)
    return {"object": "list", "index": index, "data": [
        {**v, "messages": [{"role": m["role"], "content": m["content"], "created": m["created"], **m["meta"]}
                           for m in v["messages"]]} for v in versions]}


@router.patch("/v1/sessions/{session_id}/messages/{index}",
              summary="Go on with another version of the chat from this message on")
def choose_version(session_id: str, index: int, body: VersionChoice, request: Request,
                   caller: Caller = User) -> dict:
    services = services_of(request)
    session = services.chat.select_version(caller.user, session_id, index, body.version)
    return _with_messages(services.chat, caller.user, session)


@router.delete("/v1/sessions/{session_id}/messages/{index}",
               summary="Delete the turn this message belongs to (undo: POST .../restore)")
def delete_turn(session_id: str, index: int, request: Request, caller: Caller = User) -> dict:
    services = services_of(request)
    session, _ = services.chat.delete_turn(caller.user, session_id, index)
    return _with_messages(services.chat, caller.user, session)


@router.post("/v1/sessions/{session_id}/restore",
             summary="Undo the last delete of messages in this session (within 10 minutes, if unchanged since)")
def restore_messages(session_id: str, request: Request, caller: Caller = User) -> dict:
    services = services_of(request)
    session = services.chat.restore(caller.user, session_id)
    return _with_messages(services.chat, caller.user, session)


@router.delete("/v1/sessions", summary="Delete sessions unused for some days (or all)")
def delete_old_sessions(request: Request, caller: Caller = User,
                        older_than_days: float = Query(ge=0, le=100_000,
                                                       description="0 deletes every session")) -> dict:
    gone = services_of(request).chat.delete_many(caller.user,
                                                  older_than=time.time() - older_than_days * 86400 + 1e-6)
    return {"deleted": gone}


@router.post("/v1/sessions/{session_id}/messages", summary="Send a message; get the reply (or SSE)")
async def send_message(session_id: str, body: NewMessage, request: Request, caller: Caller = User):
    services = services_of(request)
    turn = await services.chat.send(caller, session_id, body.content, params=body.params.values(),
                                    replace_from=body.replace_from, wait_for_files=body.wait_for_files)
    if not body.stream:
        ran = []
        while True:
            final = await result_or_disconnect(turn.handle, request)
            _raise_if_failed(await turn.saved)
            following = await services.chat.follow_up(caller, turn)
            if following is None:
                return {**_assistant(final, turn), **({"mcp_calls": ran} if ran else {})}
            ran.append(_ran(*following))
            turn = following[1]

    async def events():
        nonlocal turn
        while turn is not None:
            marks = turn.handle.request.thoughts
            reader = ThoughtReader(marks) if marks else None
            async for item in chunked(turn.handle, body.chunk_size, body.stream_delay_ms):
                if isinstance(item, Chunk) or (reader and isinstance(item, Finished)):
                    # a model that thinks: its thoughts as "thought" events, before the answer's tokens
                    parts = ([item] if reader is None else reader.read(item)) if isinstance(item, Chunk) \
                        else reader.end()
                    for part in parts:
                        if part.text:
                            yield sse({"type": "thought" if isinstance(part, Thought) else "token", "text": part.text})
                if isinstance(item, Finished):
                    saved = await turn.saved
                    if isinstance(saved, ShoalError):
                        yield sse({"type": "error", "error": saved.to_dict()})
                    else:
                        yield sse({"type": "done", "message": _assistant(item, turn)})
                elif isinstance(item, Failed):
                    yield sse({"type": "error", "error": item.error.to_dict()})
            try:  # a call of an MCP tool: run it, then the model answers from its result
                following = await services.chat.follow_up(caller, turn)
            except ShoalError as exc:
                yield sse({"type": "error", "error": exc.to_dict()})
                following = None
            if following is not None:
                yield sse({"type": "mcp_call", **_ran(*following)})
            turn = following[1] if following else None
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


def _ran(step: dict, _following) -> dict:
    result = step["result"]
    return {"tool_call": step["call"], "server": result.server, "tool": result.tool, "output": result.text,
            "is_error": result.error}


def _raise_if_failed(saved) -> None:
    if isinstance(saved, ShoalError):
        raise saved
    if isinstance(saved, Exception):
        raise StorageError(f"the reply could not be stored: {saved}")


def _assistant(final: Finished, turn) -> dict:
    calls = {"tool_calls": turn.tool_calls} if turn.tool_calls else {}
    thought, text = split(final.text, turn.handle.request.thoughts)
    return {"role": "assistant", "content": text, **({"reasoning": thought} if thought else {}), "model": final.model,
            "finish_reason": "tool_calls" if calls else final.reason, **calls,
            "usage": usage_dict(final), "timings": timings(final),
            "sources": [p.citation() for p in turn.passages],
            "history_dropped": turn.history_dropped}
