"""Chat sessions: a user's conversations, each with its own model, parameters and history.

`ChatService.send` builds the context for a new user turn (system prompt, the turn, retrieved
passages, recent history that fits), starts the generation through `Services.submit`, and when it
ends stores the user message and the reply together in one transaction. Regenerate and edit of
any message start a new version of the chat from there (the old one is kept: `select_version`);
a turn can be deleted and the delete undone. Used alike by the Gradio UI and the /v1/sessions routes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from llm_pool import Finished, GenerationHandle, GenerationParams, GenerationRequest, Message, chat_format
from llm_pool.chat_format import ToolCall
from llm_pool.constraints import OutputFormat
from llm_pool.errors import ConflictError, InvalidParamsError, InvalidRequestError, PayloadTooLargeError
from llm_pool.reasoning import split
from memory.context import Passage, build_context
from memory.store import Session, SessionStore, StoredMessage

from .documents import DocumentsNotReadyError
from .identity import Caller
from .quotas import Quotas

log = logging.getLogger("shoal.chat")


@dataclass
class Turn:
    """A started turn: its generation handle and the context it was built from."""

    handle: GenerationHandle
    session: Session
    user_text: str
    passages: list[Passage]
    history_dropped: int
    saved: asyncio.Future | None = None
    answering: dict | None = None  # the tool call the user's message is the result of
    tool_calls: list[dict] | None = None  # once saved: the reply as tool calls, if it made any
    plan: chat_format.ToolPlan | None = None  # the functions the model was offered, and how
    step: int = 0  # MCP calls run for this turn so far (the call -> result -> continue loop)
    result_meta: dict | None = None  # on a turn answering an MCP call: which server and tool ran it
    carried: str = ""  # a continued reply: the text it had (the stored reply is that + the new text)


class ChatService:
    def __init__(self, store: SessionStore, services, documents=None, wait_for_files: float = 30.0,
                 quotas: Quotas | None = None):
        self.store = store
        self.services = services
        self.documents = documents  # DocumentService: files and memory of earlier turns
        self.wait_for_files = wait_for_files
        self.quotas = quotas or Quotas.from_settings(services.settings)
        self._creating = threading.Lock()  # counting a user's sessions and adding one: one step
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat-save")  # in order
        self._writing: dict[str, int] = {}  # sessions with a reply being generated (and stored)
        self._waiting_files: set[str] = set()  # sessions whose next turn waits for its files
        self._ask_now: set[str] = set()  # ... and whose user asked to go on without them
        self._writing_lock = threading.Lock()

    def delete(self, user: str, session_id: str) -> None:
        """Delete a session with its files and memory."""
        self.store.delete(user, session_id)
        self.services.forget_kv([session_id])
        if self.documents:
            self.documents.delete_session(session_id)

    def clear(self, user: str, session_id: str) -> Session:
        """The chat's messages deleted: from the store and from what the model is ever shown again
        (`restore` undoes it for a while)."""
        self._check_idle(session_id)
        session = self.store.clear_messages(user, session_id)
        self.services.forget_kv([session_id])
        if self.documents:
            self.documents.searcher.forget(session_id)
        return session

    # ------------------------------------------------------------------ versions, delete, undo
    def select_version(self, user: str, session_id: str, at: int, version: int) -> Session:
        """The chat goes on with another version of its messages from `at` on (what an edit or a
        regenerate replaced): the model sees that version from now on."""
        self._check_idle(session_id)
        session = self.store.select_version(user, session_id, at, version)
        self._remember_from(user, session_id, at)
        return session

    def versions(self, user: str, session_id: str, at: int) -> list[dict]:
        return self.store.versions(user, session_id, at)

    def delete_turn(self, user: str, session_id: str, index: int) -> tuple[Session, int]:
        """Delete the turn message `index` belongs to: from the store, the remembered turns and the
        saved KV (the model never sees it again); `restore` undoes it for a while."""
        self._check_idle(session_id)
        session, start = self.store.delete_turn(user, session_id, index)
        self.services.forget_kv([session_id])
        self._remember_from(user, session_id, start)
        return session, start

    def restore(self, user: str, session_id: str) -> Session:
        """Undo the last delete of messages in this chat (a turn, or all of them)."""
        self._check_idle(session_id)
        session, start = self.store.restore(user, session_id)
        self._remember_from(user, session_id, start)
        return session

    def _remember_from(self, user: str, session_id: str, start: int) -> None:
        """The turns retrieval may recall, from message `start` on, are the chat's own again."""
        if not self.documents:
            return
        messages = self.store.messages(user, session_id)
        turns = [(i, m.content, messages[i + 1].content) for i, m in enumerate(messages[:-1])
                 if i >= start and m.role == "user" and not m.meta.get("tool_call_id")
                 and messages[i + 1].role == "assistant" and not messages[i + 1].meta.get("tool_calls")
                 and messages[i + 1].content]
        self.documents.remember_turns(session_id, start, turns)

    def _check_idle(self, session_id: str) -> None:
        if self._writing.get(session_id):
            raise ConflictError("a reply is being written in this chat: wait for it, or stop it, first",
                                param="session_id", code="reply_in_progress")

    def _writes(self, session_id: str, step: int) -> None:
        with self._writing_lock:
            count = self._writing.get(session_id, 0) + step
            if count > 0:
                self._writing[session_id] = count
            else:
                self._writing.pop(session_id, None)

    def delete_many(self, user: str, *, older_than: float) -> list[str]:
        gone = self.store.delete_many(user, older_than=older_than)
        self.services.forget_kv(gone)
        for session_id in gone:
            if self.documents:
                self.documents.delete_session(session_id)
        return gone

    # ------------------------------------------------------------------ sessions
    # (the adapters, REST and UI, read chats through these: never the store itself)
    def list(self, user: str) -> list[Session]:
        return self.store.list(user)

    def get(self, user: str, session_id: str) -> Session:
        return self.store.get(user, session_id)

    def messages(self, user: str, session_id: str) -> list[StoredMessage]:
        return self.store.messages(user, session_id)

    def thread(self, user: str, session_id: str) -> tuple[list[StoredMessage], dict[int, tuple[int, int]]]:
        """The chat's messages (the versions chosen) and where it has other versions."""
        return self.store.thread(user, session_id)

    def export(self, user: str, session_id: str) -> dict:
        return self.store.export(user, session_id)

    turn_bounds = staticmethod(SessionStore.turn_bounds)

    def search(self, user: str, query: str | None = None) -> list[Session]:
        """The user's sessions, most recently used first; with `query`, only those whose title or
        any message contains it (case-insensitive). Another user's sessions are never searched."""
        return self.store.search(user, query or "")

    def create(self, user: str, *, title: str = "New chat", model: str | None = None,
               system_prompt: str = "", params: dict | None = None,
               context_policy: dict | None = None, tools: list[dict] | None = None,
               tool_choice: str | None = None, mcp_servers: list[str] | None = None) -> Session:
        """`tools`: OpenAI tool objects, checked by the caller (the server's ToolDef)."""
        if model is not None:
            self.services.pool.resolve(model)  # 404 for a model that does not exist
        self.quotas.check_system_prompt(system_prompt)
        clean = self.check_params(params or {})
        _check_calls(tools or [], tool_choice or "auto")
        servers = self.services.mcp.check(list(mcp_servers or []), "mcp_servers")
        with self._creating:
            self._check_room(user)
            return self.store.create(user, title=title, model=model, system_prompt=system_prompt or "",
                                     params=clean, context_policy=self._policy(context_policy or {}),
                                     tools=list(tools or []), tool_choice=self._tool_choice(tool_choice or "auto"),
                                     mcp_servers=servers)

    def import_session(self, user: str, data: Any) -> Session:
        """A session exported by Shoal (shoal-session/1), within the same quotas as a new one."""
        meta = data.get("session") if isinstance(data, dict) else None
        if isinstance(meta, dict):
            self.quotas.check_system_prompt(str(meta.get("system_prompt") or ""))
        if isinstance(data, dict) and isinstance(data.get("messages"), list):
            self.quotas.check_messages(len(data["messages"]))
        with self._creating:
            self._check_room(user)
            return self.store.import_session(user, data)

    def _check_room(self, user: str) -> None:
        self.quotas.check_new_session(len(self.store.list(user)))

    def update(self, user: str, session_id: str, **changes: Any) -> Session:
        changes = {k: v for k, v in changes.items() if v is not None}
        self.quotas.check_system_prompt(changes.get("system_prompt"))
        if "model" in changes:
            self.services.pool.resolve(changes["model"])
        if "params" in changes:
            changes["params"] = self.check_params(changes["params"])
        if "context_policy" in changes:
            changes["context_policy"] = self._policy(changes["context_policy"])
        if "tool_choice" in changes:
            changes["tool_choice"] = self._tool_choice(changes["tool_choice"])
        if "mcp_servers" in changes:
            changes["mcp_servers"] = self.services.mcp.check(list(changes["mcp_servers"]), "mcp_servers")
        if "tools" in changes or "tool_choice" in changes:
            current = self.store.get(user, session_id)
            _check_calls(changes.get("tools", current.tools), changes.get("tool_choice", current.tool_choice))
        return self.store.update(user, session_id, **changes)

    @staticmethod
    def _tool_choice(choice: str) -> str:
        if choice not in ("auto", "required"):
            raise InvalidParamsError("tool_choice: auto or required", param="tool_choice")
        return choice

    @staticmethod
    def check_params(params: dict) -> dict:
        return {k: v for k, v in GenerationParams.validated(**params).to_dict().items() if k in params}

    @staticmethod
    def _policy(policy: dict) -> dict:
        value = policy.get("max_history_messages")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InvalidParamsError("context_policy.max_history_messages must be a whole number >= 0",
                                     param="context_policy")
        unknown = set(policy) - {"max_history_messages"}
        if unknown:
            raise InvalidParamsError(f"unknown context policy '{sorted(unknown)[0]}'", param="context_policy")
        return dict(policy)

    # ------------------------------------------------------------------ turns
    async def continue_reply(self, caller: Caller, session_id: str, params: dict | None = None) -> Turn:
        """Extend the chat's last reply where it was cut (Stop, or its token limit): the model
        continues that text (continue_final_message), and the stored reply becomes the whole."""
        user = caller.user
        if user is None:
            raise InvalidRequestError("a chat session needs a user", param="session_id")
        history = await asyncio.to_thread(self.store.messages, user, session_id)
        last = history[-1] if history else None
        if (last is None or last.role != "assistant" or len(history) < 2 or history[-2].role != "user"
                or last.meta.get("finish_reason") not in ("cancelled", "length") or not last.content):
            raise InvalidRequestError("nothing to continue: the chat's last reply was not cut short",
                                      param="session_id", code="nothing_to_continue")
        return await self.send(caller, session_id, history[-2].content, params=params,
                               replace_from=len(history) - 2, carried=last.content)

    async def send(self, caller: Caller, session_id: str, text: str, *, params: dict | None = None,
                   replace_from: int | None = None, output_format: OutputFormat | None = None,
                   result_meta: dict | None = None, carried: str = "", wait_for_files: bool = True) -> Turn:
        """Start a turn for `caller` (a user). `replace_from`: index of the history message the new
        turn replaces (regenerate / edit); the reply is stored in its place. Reading the store,
        counting tokens and retrieval run off the event loop."""
        user = caller.user
        if user is None:
            raise InvalidRequestError("a chat session needs a user", param="session_id")
        if not isinstance(text, str) or not text.strip():
            raise InvalidParamsError("content must not be empty", param="content")
        limit = self.services.settings.max_message_chars
        if len(text) > limit:
            raise PayloadTooLargeError(f"content has {len(text)} characters; the limit is {limit} "
                                       "(--max-message-chars)", param="content", code="message_too_large")
        loop = asyncio.get_running_loop()
        session, history, model = await loop.run_in_executor(None, self._opening, user, session_id, replace_from)
        self.quotas.check_messages(len(history) + 2)  # the user's message and the reply
        self.services.check_version(model, caller)  # a stranger does not load other versions
        gen_params = GenerationParams.validated(**{**session.params, **(params or {})})
        if wait_for_files:
            await self._wait_for_files(user, session_id)
        backend = await self._loaded_backend(model)
        answering = _open_call(history)
        context = await loop.run_in_executor(None, self._context, user, session, history, text, gen_params,
                                             backend, answering)
        request = GenerationRequest(gen_params, messages=context.messages, cache_key=session_id,
                                    output_format=output_format)
        if carried:  # the reply goes on from its own last word
            request.messages.append(Message("assistant", carried))
            request.add_generation_prompt, request.continue_final_message = False, True
        tools = list(session.tools)
        if session.mcp_servers:
            tools += [{"type": "function", "function": t.function()}
                      for t in await self.services.mcp.tools(session.mcp_servers)]
        plan = None
        if tools:
            if output_format is not None:
                raise InvalidParamsError("response_format: not in a session with tools (a call's arguments "
                                         "already follow its schema)", param="response_format")
            # the user's turns follow the session's tool_choice; the turn after a tool's result answers
            plan = chat_format.ToolPlan([t["function"] for t in tools], session.tool_choice)
            if answering:
                plan = plan.after_result()
            request.tools, request.tool_prompt, request.output_format = tools, plan.prompt(), plan.output_format()
        handle = await self.services.submit(model, request, caller)
        turn = Turn(handle, session, text, context.passages, context.history_dropped, answering=answering,
                    plan=plan, result_meta=result_meta, carried=carried)
        turn.saved = loop.create_future()
        turn_index = len(history)
        # stored in a thread of its own: an fsync'd transaction must not stall the engine's step
        self._writes(session_id, +1)
        try:
            handle.on_done(lambda h: self._saver.submit(self._save, user, turn, replace_from, loop, turn_index))
        except BaseException:
            self._writes(session_id, -1)
            raise
        return turn

    def _opening(self, user: str, session_id: str, replace_from: int | None):
        session = self.store.get(user, session_id)
        model = session.model or self.services.pool.default_model
        if self.services.pool.spec(model).kind != "chat":
            raise InvalidRequestError(f"model '{model}' is a completion model; pick a chat model for this "
                                      "session", param="model", code="not_a_chat_model")
        history = self.store.messages(user, session_id)
        if replace_from is not None:
            if (isinstance(replace_from, bool) or not isinstance(replace_from, int)
                    or not 0 <= replace_from < len(history) or history[replace_from].role != "user"
                    or history[replace_from].meta.get("tool_call_id")):
                raise InvalidParamsError(f"replace_from: message {replace_from} is not one of your messages in "
                                         "this chat (give the index of a user message)", param="replace_from")
            history = history[:replace_from]
        return session, history, model

    def _context(self, user: str, session: Session, history: list[StoredMessage], text: str,
                 gen_params: GenerationParams, backend, answering: dict | None = None):
        reply_room = gen_params.max_new_tokens or min(512, backend.context_length // 4)
        messages = [_as_message(m) for m in history]

        def build(passages):
            return build_context(
                system_prompt=session.system_prompt, history=messages, user_text=text,
                count_tokens=backend.count_tokens, budget=backend.context_length - reply_room,
                max_history_messages=session.context_policy.get("max_history_messages"), passages=passages,
                reply_to=answering["id"] if answering else None)

        context = build(())
        if self.documents:  # turns still in the window need no recalling
            passages = self.documents.retrieve(user, session.id, text,
                                               exclude_turns_from=len(messages) - context.history_used)
            if passages:
                context = build(passages)
        return context

    async def _wait_for_files(self, user: str, session_id: str) -> None:
        """Files still being read would make an answer from nothing: wait a little, then say so
        (unless the user asks to go on without them: `ask_now`)."""
        if not self.documents:
            return
        deadline = time.monotonic() + self.wait_for_files
        loop = asyncio.get_running_loop()
        self._ask_now.discard(session_id)
        try:
            while True:
                pending = await loop.run_in_executor(None, self.documents.pending, user, session_id)
                if not pending:
                    return
                if session_id in self._ask_now:
                    return  # answered from what is ready
                if time.monotonic() >= deadline:
                    raise DocumentsNotReadyError(pending)
                self._waiting_files.add(session_id)
                await asyncio.sleep(0.25)
        finally:
            self._waiting_files.discard(session_id)
            self._ask_now.discard(session_id)

    def waits_for_files(self, session_id: str | None) -> bool:
        return session_id in self._waiting_files

    def ask_now(self, user: str, session_id: str) -> bool:
        """The turn waiting for this chat's files goes on without them (from what is ready)."""
        self.store.get(user, session_id)  # another user's chat: not found
        if session_id not in self._waiting_files:
            return False
        self._ask_now.add(session_id)
        return True

    def _save(self, user: str, turn: Turn, replace_from: int | None, loop, turn_index: int) -> None:
        """Store the turn (user message and reply in one transaction); always resolve `turn.saved`
        with the stored session, None (nothing to store) or the exception."""
        result: Any = None
        try:
            final = turn.handle.final
            if isinstance(final, Finished) and (final.text or final.reason != "cancelled"):
                meta = {"model": final.model, "finish_reason": final.reason,
                        "usage": {"prompt_tokens": final.usage.prompt_tokens,
                                  "completion_tokens": final.usage.completion_tokens,
                                  "cached_tokens": final.usage.cached_tokens,
                                  "disk_tokens": final.usage.disk_tokens},
                        "timings": {"ttft_s": final.ttft, "duration_s": final.duration,
                                    "tokens_per_second": final.tokens_per_second},
                        "sources": [p.citation() for p in turn.passages]}
                # a model that thinks: its thoughts are kept beside the answer, never shown to it again
                thought, text = split(final.text, turn.handle.request.thoughts)
                text = turn.carried + text
                if thought:
                    meta["reasoning"] = thought
                calls = None
                if turn.plan is not None and final.reason == "stop":
                    calls = turn.plan.parse(text)
                if calls:
                    meta.update(tool_calls=calls, finish_reason="tool_calls")
                    turn.tool_calls = calls
                answered = ({"tool_call_id": turn.answering["id"], "tool": turn.answering["function"]["name"],
                             **(turn.result_meta or {})} if turn.answering else {})
                now = time.time()
                result = self.store.append(user, turn.session.id, [
                    StoredMessage("user", turn.user_text, now, answered),
                    StoredMessage("assistant", text, now, meta)], truncate_to=replace_from,
                    fork=not turn.carried)
                if self.documents and text and not calls:
                    self.documents.remember_turn(turn.session.id, turn_index, turn.user_text, text)
        except Exception as exc:  # the session may have been deleted meanwhile, or the disk is full
            log.warning("could not store the turn of session %s: %s", turn.session.id, exc)
            result = exc
        finally:
            self._writes(turn.session.id, -1)
            try:
                loop.call_soon_threadsafe(_resolve, turn.saved, result)
            except RuntimeError:  # the caller's loop is gone: nobody waits for it
                pass

    async def follow_up(self, caller: Caller, turn: Turn) -> tuple[dict, Turn] | None:
        """The server-side tool loop: when a stored reply calls one of the chat's MCP tools, run the
        call with the caller's identity and start the turn that answers from its result (stored as
        the call's result). None when there is nothing to run, or after --mcp-max-steps calls."""
        if turn.saved is not None:
            await turn.saved
        calls = turn.tool_calls or []
        if not calls or not turn.session.mcp_servers or turn.step >= self.services.settings.mcp_max_steps:
            return None
        tool = self.services.mcp.tool(turn.session.mcp_servers, calls[0]["function"]["name"])
        if tool is None:  # a function of the chat's own tools: the user answers it
            return None
        result = await self.services.mcp.call(tool, calls[0]["function"]["arguments"], caller.user)
        meta = {"mcp_server": result.server, "mcp_tool": result.tool, **({"mcp_error": True} if result.error else {})}
        following = await self.send(caller, turn.session.id, result.text or "(no output)", result_meta=meta)
        following.step = turn.step + 1
        return {"call": calls[0], "result": result}, following

    async def _loaded_backend(self, model: str):
        pool = self.services.pool
        backend = pool.backend(model)
        if backend is None or pool.status(model)["state"] != "ready":
            await asyncio.get_running_loop().run_in_executor(None, pool.load, model)
            backend = pool.backend(model)
        return backend

    def last_user_index(self, user: str, session_id: str) -> tuple[int, str]:
        messages = self.store.messages(user, session_id)
        for index in range(len(messages) - 1, -1, -1):
            if messages[index].role == "user":
                return index, messages[index].content
        raise InvalidRequestError("this session has no message to regenerate", param="session_id")

    # ------------------------------------------------------------------ export
    def export_markdown(self, user: str, session_id: str) -> str:
        session = self.store.get(user, session_id)
        lines = [f"# {session.title}", "", f"Model: {session.model or self.services.pool.default_model}", ""]
        if session.system_prompt:
            lines += ["**System:** " + session.system_prompt, ""]
        for message in self.store.messages(user, session_id):
            lines += [f"## {message.role.capitalize()}", "", message.content, ""]
            for source in message.meta.get("sources", []):
                lines.append(f"- source: {source['source']}")
        return "\n".join(lines).rstrip() + "\n"


def _check_calls(tools: list[dict], choice: str) -> None:
    """With tool_choice required, the grammar of a call of any tool must be within its bounds (400)."""
    if tools:
        chat_format.ToolPlan([t["function"] for t in tools], choice).output_format()


def _open_call(history: list[StoredMessage]) -> dict | None:
    """The call the next user message answers: the last reply's, if it was a tool call."""
    if history and history[-1].role == "assistant" and history[-1].meta.get("tool_calls"):
        return history[-1].meta["tool_calls"][0]
    return None


def _as_message(m: StoredMessage) -> Message:
    """A stored message as the model sees it: a reply that called a tool as that call, and the
    user's answer to it as the tool's result."""
    if m.role == "assistant" and m.meta.get("tool_calls"):
        return Message("assistant", "", tuple(ToolCall(c["id"], c["function"]["name"], c["function"]["arguments"])
                                              for c in m.meta["tool_calls"]))
    if m.role == "user" and m.meta.get("tool_call_id"):
        return Message("tool", m.content, tool_call_id=m.meta["tool_call_id"])
    return Message(m.role, m.content)


def _resolve(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)
