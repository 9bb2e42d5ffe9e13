"""The chat UI's handlers: sessions (open, new, rename, delete, export, import), turns (send,
stop, regenerate, edit), completion and model actions. Each one names the user it acts for, so
a browser only ever sees its own sessions."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import gradio as gr
from pydantic import TypeAdapter, ValidationError

from llm_pool import Finished, GenerationParams, GenerationRequest, ShoalError, TextDelta
from llm_pool.constraints import OutputFormat
from llm_pool.errors import InvalidParamsError
from llm_pool.stream import Failed
from memory.store import Session
from service import Services

from .gradio_guard import discard
from .tool_calls import ToolDef, session_tools
from .ui_common import (
    StreamedReply,
    admin_check,
    chat_view,
    figures,
    files_table,
    model_line,
    model_table,
    params_from,
    request_caller,
    stored_figures,
    ui_caller,
    ui_user,
)
from .ui_queue import Key, Queued, TurnQueue

DEFAULTS = {  # small chat models answer best cool and a little discouraged from repeating
    "temperature": 0.3,
    "top_p": 0.9,
    "top_k": 0,
    "max_new_tokens": 256,
    "repetition_penalty": 1.1,
    "seed": -1,
    "stop": [],
}


EDITING = ("Editing a message: send it to go on from there as a new version of the chat (the one it replaces "
           "is kept: ‹ › under the message switches back).")
ACTION = re.compile(r"^(ver|regen|edit|del)-([0-9]{1,6})(?:-([0-9]{1,3}))?$")


def _error(exc: Exception) -> gr.Error:
    return gr.Error(getattr(exc, "message", None) or str(exc))


class ChatHandlers:
    def __init__(self, services: Services, default_model: str | None):
        self.services = services
        self.chat = services.chat
        self.default_model = default_model
        self._reading: dict[str, float] = {}  # chat id -> when a file of it was last seen being read
        self.queue = TurnQueue()  # messages sent while a reply streams (ui_queue)
        self._viewing: dict[str, str | None] = {}  # a page (Gradio session hash) -> the chat it shows
        self._notes: dict[str, str] = {}  # a page -> a toast its message box's last event left for the drain
        # Stop: the reply streaming in a chat (its handle), and chats whose user pressed Stop: the
        # turn is cancelled on the server and its event ends as usual (Gradio's own `cancels`
        # sometimes left "Error" marks over the chat, the box and the figures)
        self._running: dict[tuple[str, str], Any] = {}
        self._stopped: set[tuple[str, str]] = set()
        self._synced: dict[str, tuple] = {}  # a page -> (its chat, message count, chat list) at its last tick

    # ------------------------------------------------------------------ views
    def _radio(self, user: str, current: str | None) -> gr.Radio:
        items = self.chat.list(user)
        return gr.Radio(choices=[(s.title, s.id) for s in items], value=current)

    def _view(self, user: str, session: Session | None) -> list[Any]:
        if session is None:
            values = {**DEFAULTS}
            return [
                None,
                self._radio(user, None),
                [],
                "",
                "",
                self.default_model,
                "",
                *self._param_values(values),
                0,
                "",
                "auto",
                [],
            ]
        messages, forks = self.chat.thread(user, session.id)
        values = {**DEFAULTS, **session.params}
        last = next((m for m in reversed(messages) if m.role == "assistant"), None)
        return [
            session.id,
            self._radio(user, session.id),
            chat_view(messages, forks),
            session.title,
            stored_figures(last) if last else "",
            session.model or self.default_model,
            session.system_prompt,
            *self._param_values(values),
            session.context_policy.get("max_history_messages") or 0,
            json.dumps(session.tools, indent=1) if session.tools else "",
            session.tool_choice,
            list(session.mcp_servers),
        ]

    @staticmethod
    def _param_values(values: dict) -> list[Any]:
        seed = values.get("seed")
        return [
            values["temperature"],
            values["top_p"],
            values["top_k"],
            values["max_new_tokens"],
            values["repetition_penalty"],
            -1 if seed is None else seed,
            "|".join(values.get("stop") or []),
        ]

    @staticmethod
    def _settings(
        model, system, temperature, top_p, top_k, max_new, repetition, seed, stop, history_limit
    ) -> dict:
        limit = int(history_limit or 0)
        if limit < 0:
            raise InvalidParamsError("History to keep: must be 0 (all that fit) or more",
                                     param="max_history_messages")
        params = params_from(temperature, top_p, top_k, max_new, repetition, seed, stop)
        return {
            "model": model,
            "system_prompt": system or "",
            "params": params,
            "context_policy": {"max_history_messages": limit} if limit else {},
        }

    # ------------------------------------------------------------------ sessions
    def start(self, browser_id: str | None, request: gr.Request):
        """A browser without a valid signed id (new, forged or altered) gets a new one: a new user.
        The Models tab's controls are shown to admins only; the model's line and the pool's table
        show the state as it is now."""
        identity = self.services.identity
        if identity.browser_id(browser_id) is None:
            browser_id = identity.new_browser_token()
        caller = ui_caller(self.services, browser_id, request)
        sessions = self.chat.list(caller.user)
        current = sessions[0] if sessions else None
        asked = self._chat_in_url(request)  # the page's ?chat=<id>: that chat, if it is this user's
        if asked is not None:
            mine = next((s for s in sessions if s.id == asked), None)
            if mine is None:  # another user's, or none at all: said alike, and the default view
                gr.Warning("That chat is not one of yours")
            current = mine or current
        view = self._view(caller.user, current)
        # the model's state now, not as it was when the page was built (before it had loaded)
        return [browser_id, *view, gr.Row(visible=caller.admin), model_line(self.services, view[5]),
                model_table(self.services)]

    @staticmethod
    def _chat_in_url(request: gr.Request | None) -> str | None:
        params = getattr(request, "query_params", None) if request is not None else None
        asked = params.get("chat") if params else None
        return asked.strip() if isinstance(asked, str) and asked.strip() else None

    def open(self, browser_id, session_id, request: gr.Request):
        user = ui_user(self.services, browser_id, request)
        try:
            return self._view(user, self.chat.get(user, session_id))
        except ShoalError as exc:
            raise _error(exc) from None

    def search(self, browser_id, query, request: gr.Request):
        """The chat list, only this user's chats whose title or any message contains `query`
        (case-insensitive); empty: all of them. The open chat stays open. None: the box was
        emptied by another event, whose list stands."""
        if query is None:
            return gr.skip()
        user = ui_user(self.services, browser_id, request)
        try:
            found = self.chat.search(user, query or "")
        except ShoalError as exc:
            raise _error(exc) from None
        return gr.Radio(choices=[(s.title, s.id) for s in found])

    def new(
        self,
        browser_id,
        same_settings,
        model,
        system,
        temperature,
        top_p,
        top_k,
        max_new,
        repetition,
        seed,
        stop,
        history_limit,
        request: gr.Request,
    ):
        """A new chat starts from the defaults (model, no system prompt, default parameters) unless the
        user ticked "same settings as this chat": nothing is carried over silently."""
        user = ui_user(self.services, browser_id, request)
        settings = {"model": self.default_model}
        if same_settings:
            try:
                settings = self._settings(model, system, temperature, top_p, top_k, max_new, repetition, seed,
                                          stop, history_limit)
            except ShoalError as exc:
                gr.Warning(f"{exc.message}: the new chat starts from the defaults")
        try:
            session = self.chat.create(user, **settings)
        except ShoalError as exc:
            raise _error(exc) from None
        return self._view(user, session)

    def save_settings(
        self,
        browser_id,
        session_id,
        model,
        system,
        temperature,
        top_p,
        top_k,
        max_new,
        repetition,
        seed,
        stop,
        history_limit,
        request: gr.Request,
    ):
        user = ui_user(self.services, browser_id, request)
        try:
            values = self._settings(
                model, system, temperature, top_p, top_k, max_new, repetition, seed, stop, history_limit
            )
        except ShoalError as exc:  # named once, as a toast; the chat keeps its saved settings
            gr.Warning(f"{exc.message} (not saved)")
            return gr.skip()
        if session_id:
            try:
                self.chat.update(user, session_id, **values)
            except ShoalError as exc:
                raise _error(exc) from None
        return model_line(self.services, values["model"])

    def save_tools(self, browser_id, session_id, tools_text, tool_choice, mcp_servers, request: gr.Request):
        user = ui_user(self.services, browser_id, request)
        values = self._tools(tools_text, tool_choice, mcp_servers)
        if session_id:
            try:
                self.chat.update(user, session_id, **values)
            except ShoalError as exc:
                raise _error(exc) from None
        return gr.Markdown()

    @staticmethod
    def _tools(tools_text: str | None, tool_choice: str | None, mcp_servers: list[str] | None = None) -> dict:
        """The tools box as checked OpenAI tool objects (gr.Error naming what is wrong)."""
        tools: list = []
        if tools_text and tools_text.strip():
            try:
                tools = json.loads(tools_text)
            except ValueError as exc:
                raise gr.Error(f"Tools: not valid JSON ({exc})") from None
            if isinstance(tools, dict):
                tools = [tools]
            try:
                tools = session_tools(TypeAdapter(list[ToolDef]).validate_python(tools))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise gr.Error(f"Tools: {where}: {first['msg']}") from None
            except ShoalError as exc:
                raise _error(exc) from None
        return {"tools": tools, "tool_choice": tool_choice or "auto", "mcp_servers": list(mcp_servers or [])}

    def rename(self, browser_id, session_id, title, request: gr.Request):
        user = ui_user(self.services, browser_id, request)
        if not session_id:
            raise gr.Error("Open a chat first.")
        try:
            self.chat.update(user, session_id, title=title)
        except ShoalError as exc:
            raise _error(exc) from None
        return self._radio(user, session_id)

    def delete(self, browser_id, session_id, request: gr.Request):
        user = ui_user(self.services, browser_id, request)
        if session_id:
            try:
                self.chat.delete(user, session_id)
            except ShoalError as exc:
                raise _error(exc) from None
        remaining = self.chat.list(user)
        return self._view(user, remaining[0] if remaining else None)

    def clear(self, browser_id, session_id, request: gr.Request):
        """The chat's trash icon: its messages are deleted (store and the model's context), not hidden."""
        user = ui_user(self.services, browser_id, request)
        if session_id:
            try:
                self.chat.clear(user, session_id)
            except ShoalError as exc:
                raise _error(exc) from None
            gr.Info("The chat's messages were deleted (Undo brings them back).")
            return [], "", gr.Button(visible=True)
        return [], "", gr.skip()

    def purge(self, browser_id, session_id, days, request: gr.Request):
        user = ui_user(self.services, browser_id, request)
        gone = self.chat.delete_many(user, older_than=time.time() - float(days or 0) * 86400)
        gr.Info(f"Deleted {len(gone)} chat(s).")
        remaining = self.chat.list(user)
        current = next((s for s in remaining if s.id == session_id), remaining[0] if remaining else None)
        return self._view(user, current)

    def export(self, browser_id, session_id, request: gr.Request):
        user = ui_user(self.services, browser_id, request)
        if not session_id:
            raise gr.Error("Open a chat first.")
        try:
            data = self.chat.export(user, session_id)
            markdown = self.chat.export_markdown(user, session_id)
        except ShoalError as exc:
            raise _error(exc) from None
        folder = _export_folder()
        stem = "".join(c if c.isalnum() else "-" for c in data["session"]["title"])[:40].strip("-") or "chat"
        md_path, json_path = folder / f"{stem}.md", folder / f"{stem}.json"
        md_path.write_text(markdown)
        json_path.write_text(json.dumps(data, indent=2, ensure_ascii=False))
        return gr.File(value=[str(md_path), str(json_path)], visible=True)

    def import_file(self, browser_id, file, request: gr.Request):
        user = ui_user(self.services, browser_id, request)
        try:
            path = Path(file if isinstance(file, str) else file.name)
            try:
                data = json.loads(path.read_text())
            finally:
                discard(path)
            session = self.chat.import_session(user, data)
        except (ValueError, UnicodeDecodeError):
            raise gr.Error("That file is not a JSON export of a Shoal chat.") from None
        except ShoalError as exc:
            raise _error(exc) from None
        gr.Info(f"Imported “{session.title}”.")
        return self._view(user, session)

    # ------------------------------------------------------------------ turns
    @staticmethod
    def _output_format(json_mode: bool, schema_text: str | None) -> OutputFormat | None:
        """The "JSON output" toggle: the reply is constrained to JSON (of the schema, if one is given)."""
        if not json_mode:
            return None
        schema = None
        if schema_text and schema_text.strip():
            try:
                schema = json.loads(schema_text)
            except ValueError as exc:
                raise gr.Error(f"JSON schema: not valid JSON ({exc})") from None
        try:
            return OutputFormat.json(schema, param="json_schema")
        except ShoalError as exc:
            raise _error(exc) from None

    async def regenerate(self, browser_id, session_id, request: gr.Request):
        caller = ui_caller(self.services, browser_id, request)
        user = caller.user
        if not session_id:
            raise gr.Error("Open a chat first.")
        if self.queue.busy((user, session_id)):
            gr.Warning("A reply is streaming in this chat: Stop it, or wait for it, to regenerate.")
            yield tuple(gr.skip() for _ in range(7))
            return
        try:
            index, text = await asyncio.to_thread(self.chat.last_user_index, user, session_id)
        except ShoalError as exc:
            raise _error(exc) from None
        self._stopped.discard((user, session_id))
        async for update in self._run(caller, session_id, text, index):
            yield update
        self._in_step(user, session_id, request.session_hash, False, baseline=True)  # drawn by this page

    async def continue_(self, browser_id, session_id, request: gr.Request):
        """Continue: the last reply, cut by Stop or its token limit, goes on from where it ended."""
        caller = ui_caller(self.services, browser_id, request)
        user = caller.user
        nothing = tuple(gr.skip() for _ in range(7))
        if not session_id or self.queue.busy((user, session_id)):
            gr.Warning("Open a chat whose last reply was cut short (and let a streaming reply end).")
            yield nothing
            return
        history = await asyncio.to_thread(self.chat.messages, user, session_id)
        last = history[-1] if history else None
        if last is None or last.role != "assistant" or last.meta.get("finish_reason") not in ("cancelled", "length"):
            gr.Warning("Nothing to continue: the last reply was not cut short.")
            yield nothing
            return
        self._stopped.discard((user, session_id))
        async for update in self._run(caller, session_id, history[-2].content, len(history) - 2,
                                      carried=last.content):
            yield update
        self._in_step(user, session_id, request.session_hash, False, baseline=True)

    def stop(self, browser_id, session_id, request: gr.Request):
        """Stop: the reply streaming in this page's chat is cancelled on the server; its event then
        ends as any reply does, drawing the cut reply as stored, with its figures. Messages queued
        behind it stay queued (the next Enter sends them)."""
        user = ui_user(self.services, browser_id, request)
        key = self._key(user, session_id, request)
        if not key[1]:
            return
        self._stopped.add(key)
        if len(self._stopped) > 10_000:
            self._stopped.pop()
        handle = self._running.get(key)
        if handle is not None:
            handle.cancel()

    async def _drawn(self, user: str, session_id: str | None) -> list[dict]:
        """The chat as stored, with its messages' actions and versions."""
        if not session_id:
            return []
        return chat_view(*await asyncio.to_thread(self.chat.thread, user, session_id))

    async def message_action(self, browser_id, session_id, action, request: gr.Request):
        """A link under a message (ui_common.message_actions): "ver-<at>-<n>" goes on with version
        n from message `at`; "regen-<i>" writes reply i again, "edit-<i>" puts message i in the box
        (sent, it starts a new version), "del-<i>" deletes its turn (the Undo button brings it back)."""
        caller = ui_caller(self.services, browser_id, request)
        user = caller.user
        skip = gr.skip()
        nothing = tuple(skip for _ in range(8))
        found = ACTION.match(action or "") if isinstance(action, str) else None
        if not session_id or found is None:
            yield nothing
            return
        what, index, n = found.group(1), int(found.group(2)), found.group(3)
        if self.queue.busy((user, session_id)):
            gr.Warning("A reply is streaming in this chat: Stop it, or wait for it, first.")
            yield nothing
            return
        try:
            messages = await asyncio.to_thread(self.chat.messages, user, session_id)
            if what == "ver" and n is not None:
                await asyncio.to_thread(self.chat.select_version, user, session_id, index, int(n))
                yield await self._drawn(user, session_id), skip, "", skip, skip, skip, skip, gr.Button(visible=False)
            elif what == "del":
                await asyncio.to_thread(self.chat.delete_turn, user, session_id, index)
                yield (await self._drawn(user, session_id), skip, "", await asyncio.to_thread(self._radio, user,
                       session_id), skip, None, "", gr.Button(visible=True))
            elif what == "edit" and index < len(messages) and messages[index].role == "user":
                yield skip, messages[index].content, skip, skip, skip, index, EDITING, skip
            elif what == "regen" and index < len(messages) and messages[index].role == "assistant":
                start, _ = self.chat.turn_bounds(messages, index)
                self._stopped.discard((user, session_id))
                async for update in self._run(caller, session_id, messages[start].content, start):
                    yield *update, gr.Button(visible=False)
                self._in_step(user, session_id, request.session_hash, False, baseline=True)
            else:
                yield nothing
        except ShoalError as exc:  # a toast: not an error mark over the chat
            gr.Warning(getattr(exc, "message", None) or str(exc))
            yield nothing

    async def undo_delete(self, browser_id, session_id, request: gr.Request):
        """The Undo button after a delete: the messages are back (if the chat is as the delete left it)."""
        user = ui_user(self.services, browser_id, request)
        if not session_id:
            return gr.skip(), gr.Button(visible=False)
        try:
            await asyncio.to_thread(self.chat.restore, user, session_id)
        except ShoalError as exc:
            gr.Warning(str(exc))
            return gr.skip(), gr.Button(visible=False)
        return await self._drawn(user, session_id), gr.Button(visible=False)

    def edit_last(self, browser_id, session_id, request: gr.Request):
        user = ui_user(self.services, browser_id, request)
        if not session_id:
            raise gr.Error("Open a chat first.")
        try:
            index, text = self.chat.last_user_index(user, session_id)
        except ShoalError as exc:
            raise _error(exc) from None
        return text, index, EDITING

    async def _run(self, caller, session_id, text, replace_from, output_format=None, typed=False, give_back=False,
                   carried: str = ""):
        """`typed`: the text is what the user wrote in the message box (emptied now); with it or
        `give_back` (a queued message), if the turn is refused (a quota, a version only an admin
        may load) the text goes back there, so nothing typed is lost."""
        user = caller.user
        history, forks = await asyncio.to_thread(self.chat.thread, user, session_id)
        if replace_from is not None:
            history = history[:replace_from]
        view = chat_view(history, {at: f for at, f in forks.items() if at < len(history)})
        view += [{"role": "user", "content": text}, {"role": "assistant", "content": carried}]
        radio = await asyncio.to_thread(self._radio, user, session_id)
        # the box is emptied once, of the text just sent; what the user types while the reply streams
        # is theirs (a draft is never wiped by the stream's updates)
        keep = gr.skip()
        yield view, "" if typed else keep, "", radio, session_id, None, ""
        running = (user, session_id)
        try:
            if carried:
                turn = await self.chat.continue_reply(caller, session_id)
            else:
                turn = await self.chat.send(caller, session_id, text, replace_from=replace_from,
                                            output_format=output_format)
        except ShoalError as exc:
            back = typed or give_back
            editing = EDITING if back and replace_from is not None else ""
            yield (await self._drawn(user, session_id), text if back else keep, "", radio, session_id,
                   replace_from if back else None, editing)
            raise _error(exc) from None
        note = ""
        while turn is not None:
            reply = StreamedReply(view, turn.handle.request.thoughts)
            self._running[running] = turn.handle
            if running in self._stopped:  # Stop pressed before the reply started
                turn.handle.cancel()
            try:
                async for event in turn.handle:
                    if isinstance(event, TextDelta):
                        reply.add(event.text)
                        yield view, keep, "", radio, session_id, None, ""
                    elif isinstance(event, Finished):
                        reply.end()
                        note = figures(event)
                    elif isinstance(event, Failed):
                        raise _error(event.error)
            finally:
                turn.handle.cancel()
                if self._running.get(running) is turn.handle:
                    self._running.pop(running, None)
            if running in self._stopped:  # no tool call runs after Stop; the cut reply is drawn as stored
                if turn.saved is not None:
                    await turn.saved
                break
            try:  # a call of one of the chat's MCP tools: Shoal runs it and the model answers from its result
                following = await self.chat.follow_up(caller, turn)
            except ShoalError as exc:
                raise _error(exc) from None
            turn = following[1] if following else None
            if turn is not None:
                view = chat_view(*await asyncio.to_thread(self.chat.thread, user, session_id))
                result = following[0]["result"]
                view += [{"role": "assistant", "content": result.text,
                          "metadata": {"title": f"↩ Result of {result.tool}{' (failed)' if result.error else ''}"}},
                         {"role": "assistant", "content": ""}]
                yield view, keep, "", radio, session_id, None, ""
        yield (
            await self._drawn(user, session_id),
            keep,
            note,
            await asyncio.to_thread(self._radio, user, session_id),
            session_id,
            None,
            "",
        )

    # ------------------------------------------------------------------ the queue (ui_queue)
    def watching(self, fn, at: int = 0):
        """`fn` (a handler that returns a chat's view) also records which chat this page shows,
        so a reply streaming in another chat stops drawing over it (`drain`)."""
        @functools.wraps(fn)
        def run(*args, **kwargs):
            result = fn(*args, **kwargs)
            request = next((a for a in (*args, *kwargs.values()) if isinstance(a, gr.Request)), None)
            if request is not None and isinstance(result, (list, tuple)) and request.session_hash:
                self._shows(request.session_hash, result[at])
                with contextlib.suppress(ShoalError, gr.Error):  # what the page shows now: the tick's baseline
                    browser = result[0] if at else args[0]
                    self._in_step(ui_user(self.services, browser, request), result[at], request.session_hash,
                                  False, baseline=True)
            return result
        return run

    def _shows(self, page: str, session_id: str | None) -> None:
        self._viewing.pop(page, None)
        self._viewing[page] = session_id
        if len(self._viewing) > 10_000:  # pages long closed go first
            self._viewing.pop(next(iter(self._viewing)))

    def _key(self, user: str, session_id: str | None, request: gr.Request) -> Key:
        # a chat whose first message created it: its id may not have reached this page's state yet
        return user, session_id or self._viewing.get(request.session_hash)

    def queue_view(self, key: Key) -> tuple:
        texts = self.queue.texts(key)
        choices = [(f"{i + 1}. {t if len(t) <= 80 else t[:79] + '…'}", i) for i, t in enumerate(texts)]
        return gr.Row(visible=bool(texts)), gr.Dropdown(choices=choices, value=0 if texts else None)

    def accept(self, browser_id, session_id, text, edit_index, request: gr.Request):
        """Enter or Send: the message joins the chat's queue and the box is emptied; the event that
        follows (`drain`) sends it, or, while a reply streams, that reply's event sends it next."""
        user = ui_user(self.services, browser_id, request)
        key = self._key(user, session_id, request)
        if key[1] and not self.queue.busy(key):
            self._stopped.discard(key)  # a Stop pressed earlier does not cut this new turn
        text = (text or "").strip()
        nothing = tuple(gr.skip() for _ in range(5))
        # (a toast needs the queue: this event has none, the drain that follows shows it)
        if not text:
            if not self.queue.texts(key):  # a toast, not an error over the chat, the list and the box
                self._notes[request.session_hash] = "Write a message first."
            return nothing  # (with messages queued and no reply streaming, the drain sends them)
        if edit_index is not None and self.queue.busy(key):
            self._notes[request.session_hash] = "A reply is streaming: send the edit when it ends (or Stop it)."
            return nothing
        if not self.queue.add(key, Queued(text, edit_index)):
            self._notes[request.session_hash] = f"{TurnQueue.LIMIT} messages are queued already: wait for the replies."
            return nothing
        return "", None, "", *self.queue_view(key)

    async def drain(self, browser_id, session_id, text, edit_index, model, system, temperature, top_p, top_k,
                    max_new, repetition, seed, stop, history_limit, json_mode, json_schema, tools_text,
                    tool_choice, mcp_servers, request: gr.Request):
        """Send the chat's queued messages one after another, streaming each reply; while this page
        shows another chat the replies go on (and are stored) without drawing over it."""
        caller = ui_caller(self.services, browser_id, request)
        user, page = caller.user, request.session_hash
        key = self._key(user, session_id, request)
        note = self._notes.pop(page, None)
        if note:
            gr.Warning(note)
        if not self.queue.begin(key):  # a reply streams in this chat: it sends the queue when it ends
            yield tuple(gr.skip() for _ in range(9))
            return
        finished = False
        try:
            output_format = self._output_format(json_mode, json_schema)
            try:
                values = self._settings(
                    model, system, temperature, top_p, top_k, max_new, repetition, seed, stop, history_limit
                ) | self._tools(tools_text, tool_choice, mcp_servers)
            except (ShoalError, gr.Error) as exc:  # named once, as a toast; the message stays queued, shown
                gr.Warning(f"{exc.message}: correct it, then press Enter to send what is queued")
                yield tuple(gr.skip() for _ in range(7)) + self.queue_view(key)
                return
            sid = key[1]
            if sid:  # the page sends in this chat: it shows it (until it opens another)
                self._shows(page, sid)
            try:  # store writes run in a thread: this handler runs on the event loop
                if sid:
                    await asyncio.to_thread(self.chat.update, user, sid, **values)
                elif self.queue.texts(key):
                    sid = (await asyncio.to_thread(lambda: self.chat.create(user, **values))).id
                    self.queue.move(key, (user, sid))
                    key = (user, sid)
                    self._shows(page, sid)
            except ShoalError as exc:
                raise _error(exc) from None
            sent, redrawn = False, False
            while (item := self.queue.next(key)) is not None:
                sent = True
                await self._say_if_files_pending(user, sid)
                # a refused message goes back to the box (the queue after it stays, shown)
                async for update in self._run(caller, sid, item.text, item.replace_from, output_format,
                                              give_back=True):
                    shown = self._viewing.get(page, sid)
                    if shown == sid:
                        redrawn = False
                        yield (*update, *self.queue_view(key))
                    elif not redrawn:
                        # the page opened another chat: an update of this one sent just before may
                        # reach the page after that chat was drawn, so this stream draws it once more
                        redrawn = True
                        yield await self._other_chat(user, shown)
                if key in self._stopped:  # Stop: what is queued stays, shown; the next Enter sends it
                    self._stopped.discard(key)
                    if self._viewing.get(page, sid) == sid:
                        self._in_step(user, sid, page, False, baseline=True)
                    yield tuple(gr.skip() for _ in range(7)) + self.queue_view(key)
                    return
            finished = True  # next() left the chat idle
            if sent and self._viewing.get(page, sid) == sid:
                self._in_step(user, sid, page, False, baseline=True)
            if not sent:  # nothing was queued (an empty Enter): nothing changes
                yield tuple(gr.skip() for _ in range(9))
        finally:
            if not finished:  # stopped or failed: what is queued stays, shown; the next Enter sends it
                self.queue.release(key)

    async def _other_chat(self, user: str, session_id: str | None) -> tuple:
        """The outputs of a turn, drawing the chat the page opened meanwhile."""
        try:
            messages, forks = (await asyncio.to_thread(self.chat.thread, user, session_id) if session_id
                               else ([], {}))
            radio = await asyncio.to_thread(self._radio, user, session_id)
        except ShoalError:  # deleted meanwhile: its page draws what it shows now
            return tuple(gr.skip() for _ in range(9))
        last = next((m for m in reversed(messages) if m.role == "assistant"), None)
        keep = gr.skip()
        return (chat_view(messages, forks), keep, stored_figures(last) if last else "", radio, session_id, keep, keep,
                *self.queue_view((user, session_id)))

    async def _say_if_files_pending(self, user: str, session_id: str) -> None:
        """Asked while a file of the chat is still being read: said at once (the answer waits for
        it, up to the chat service's wait, so that it can use the file)."""
        documents = self.services.documents
        if documents is None:
            return
        pending = await asyncio.to_thread(documents.pending, user, session_id)
        if pending:
            names = ", ".join(f"{r['name']} ({r['status']} {int(r['progress'] * 100)}%)" for r in pending)
            gr.Info(f"Still reading {names}: your message waits for it (up to {self.chat.wait_for_files:g} s) "
                    "so that the answer can use it; “Ask now” goes on without it.")

    def ask_now(self, browser_id, session_id, request: gr.Request):
        """The message waiting for a file still being read goes on without it."""
        user = ui_user(self.services, browser_id, request)
        if session_id:
            with contextlib.suppress(ShoalError):
                self.chat.ask_now(user, session_id)
        return gr.Button(visible=False)

    def queue_remove(self, browser_id, session_id, index, request: gr.Request):
        user = ui_user(self.services, browser_id, request)
        key = self._key(user, session_id, request)
        if index is not None:
            self.queue.take(key, int(index))
        return self.queue_view(key)

    def queue_edit(self, browser_id, session_id, index, draft, request: gr.Request):
        """A queued message back in the box, to edit and send again (after any draft there)."""
        user = ui_user(self.services, browser_id, request)
        key = self._key(user, session_id, request)
        item = self.queue.take(key, int(index)) if index is not None else None
        if item is None:
            return gr.skip(), *self.queue_view(key)
        return (f"{draft}\n\n{item.text}" if (draft or "").strip() else item.text), *self.queue_view(key)

    def queue_shown(self, browser_id, session_id, request: gr.Request):
        user = ui_user(self.services, browser_id, request)
        return self.queue_view(self._key(user, session_id, request))

    # ------------------------------------------------------------------ files
    def files_view(self, browser_id, session_id, request: gr.Request):
        if not session_id or not browser_id and not self.services.settings.api_keys:
            return "", gr.Dropdown(choices=[], value=None)
        user = ui_user(self.services, browser_id, request)
        try:
            records = self.services.documents.list(user, session_id)
        except ShoalError:
            return "", gr.Dropdown(choices=[], value=None)
        return files_table(records), gr.Dropdown(choices=[(r["name"], r["id"]) for r in records])

    def upload(self, browser_id, session_id, files, model, system, temperature, top_p, top_k, max_new,
               repetition, seed, stop, history_limit, request: gr.Request):
        user = ui_user(self.services, browser_id, request)
        if not files:
            return session_id, gr.Radio(), *self.files_view(browser_id, session_id, request), None
        try:
            if not session_id:
                session_id = self.chat.create(user, **self._settings(model, system, temperature, top_p, top_k,
                                                                     max_new, repetition, seed, stop,
                                                                     history_limit)).id
        except ShoalError as exc:
            raise _error(exc) from None
        paths = [Path(file if isinstance(file, str) else file.name) for file in files]
        try:
            for path in paths:
                try:
                    self.services.documents.add(user, session_id, path.name, path.read_bytes())
                except ShoalError as exc:  # shown; the files added before it and the new chat are kept
                    gr.Warning(f"{path.name}: {exc.message}", duration=None)
                    break
        finally:
            for path in paths:  # the chat keeps its own copy: Gradio's goes now, not at --upload-ttl
                discard(path)
        return (session_id, self._radio(user, session_id), *self.files_view(browser_id, session_id, request),
                None)

    def remove_file(self, browser_id, session_id, file_id, request: gr.Request):
        user = ui_user(self.services, browser_id, request)
        if not session_id or not file_id:
            raise gr.Error("Pick a file to remove.")
        try:
            self.services.documents.remove(user, session_id, file_id)
        except ShoalError as exc:
            raise _error(exc) from None
        return self.files_view(browser_id, session_id, request)

    def tick(self, browser_id, session_id, model, searching, comp_model, request: gr.Request):
        """Every few seconds: the model's state, the pool table, files still being read, and what
        another tab of this user changed (the open chat's messages, the chat list)."""
        files_html, pick = gr.HTML(), gr.Dropdown()
        chat, radio = gr.skip(), gr.skip()
        waiting = False  # a message of this (the user's own) chat waits for its files
        try:
            chat, radio = self._in_step(ui_user(self.services, browser_id, request), session_id,
                                        request.session_hash, bool((searching or "").strip()))
        except (ShoalError, gr.Error):
            pass
        if session_id:
            try:
                user = ui_user(self.services, browser_id, request)
                records = self.services.documents.list(user, session_id)
                waiting = self.chat.waits_for_files(session_id)
                now = time.monotonic()
                if any(r["status"] in ("queued", "parsing", "indexing") for r in records):
                    self._reading[session_id] = now
                # the tick after the last file finished shows it ready (the table is not left at 71%)
                if now - self._reading.get(session_id, -60.0) < 10 or \
                        time.time() - max((r["created"] for r in records), default=0) < 10:
                    files_html, pick = files_table(records), gr.Dropdown(
                        choices=[(r["name"], r["id"]) for r in records])
            except (ShoalError, gr.Error):
                pass
        asking = gr.Button(visible=waiting)
        return (model_line(self.services, model), model_table(self.services), files_html, pick, chat, radio, asking,
                model_line(self.services, comp_model))

    def _in_step(self, user: str, session_id: str | None, page: str, searching: bool,
                 baseline: bool = False) -> tuple:
        """Two tabs of one user stay in step: a turn stored, or a chat made, renamed or deleted in
        one shows in the other at its next tick (not while this chat streams: its page draws it)."""
        sessions = self.chat.list(user)
        listed = tuple((s.id, s.title) for s in sessions)
        # (a version chosen or a turn deleted may leave the count as it was: the time changes)
        count = next(((s.message_count, s.updated) for s in sessions if s.id == session_id), None)
        before = self._synced.pop(page, None)
        self._synced[page] = (session_id, count, listed)
        if len(self._synced) > 10_000:
            self._synced.pop(next(iter(self._synced)))
        if baseline or before is None or before[0] != session_id:  # drawn now, or this page opened another chat
            return gr.skip(), gr.skip()
        chat = radio = gr.skip()
        if count != before[1] and session_id and not self.queue.busy((user, session_id)):
            chat = chat_view(*self.chat.thread(user, session_id))
        elif count != before[1]:
            self._synced[page] = (session_id, before[1], listed)  # look again once the reply is stored
        if listed != before[2] and not searching:
            radio = gr.Radio(choices=[(title, sid) for sid, title in listed], value=session_id)
        return chat, radio

    # ------------------------------------------------------------------ completion and models
    async def complete(self, model, text, temperature, max_tokens, request: gr.Request):
        if not (text or "").strip():
            raise gr.Error("Write some text to continue.")
        try:
            params = GenerationParams.validated(
                temperature=temperature, max_new_tokens=int(max_tokens or 128)
            )
            handle = await self.services.submit(
                model, GenerationRequest(params, prompt=text), request_caller(self.services, request)
            )
        except ShoalError as exc:
            raise _error(exc) from None
        out = ""
        try:
            async for event in handle:
                if isinstance(event, TextDelta):
                    out += event.text
                    yield out, ""
                elif isinstance(event, Finished):
                    yield out, figures(event)
                elif isinstance(event, Failed):
                    raise _error(event.error)
        finally:
            handle.cancel()

    def model_action(self, action: str):
        pool = self.services.pool

        def run(name, request: gr.Request):
            admin_check(self.services, request)
            try:
                getattr(pool, action)(name)
            except ShoalError as exc:
                raise _error(exc) from None
            return f"{action.capitalize()}: **{name}** done.", model_table(self.services)

        run.__name__ = f"ui_{action}_model"  # the gradio_client endpoints own the plain names
        return run


EXPORT_SECONDS = 600


def _export_folder() -> Path:
    """A fresh folder for one export, under one root whose folders older than EXPORT_SECONDS are
    removed first: Gradio has copied them into its own (expiring) cache by then, so exporting again
    and again cannot grow the disk."""
    root = Path(tempfile.gettempdir()) / "shoal-exports"
    root.mkdir(mode=0o700, exist_ok=True)
    cutoff = time.time() - EXPORT_SECONDS
    for old in root.iterdir():
        with contextlib.suppress(OSError):  # another export may be removing it too
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old)
    return Path(tempfile.mkdtemp(prefix="export-", dir=root))
