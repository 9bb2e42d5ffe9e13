"""Named Gradio endpoints for `gradio_client`: chat in a session, sessions, models.

Owners as for the REST routes: sessions are a user's (the API key's owner; with keys off, the
machine's owner on loopback), so a notebook sees the sessions it made through either door; loading
and unloading models is an admin's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import gradio as gr

from llm_pool import ShoalError, TextDelta
from llm_pool.stream import Failed
from service import Services

from .ui_common import admin_check, api_caller


def register(services: Services) -> None:
    chat, pool = services.chat, services.pool

    def guard(func):
        try:
            return func()
        except ShoalError as exc:
            raise gr.Error(exc.message) from None

    def list_sessions(request: gr.Request) -> list[dict]:
        """Your chat sessions, most recently used first."""
        return [s.public() for s in chat.list(api_caller(services, request).user)]

    def create_session(title: str = "New chat", model: str | None = None, system_prompt: str = "",
                       request: gr.Request = None) -> dict:
        """Start a session; returns it with its id."""
        user = api_caller(services, request).user
        return guard(lambda: chat.create(user, title=title, model=model or None,
                                         system_prompt=system_prompt).public())

    def rename_session(session_id: str, title: str, request: gr.Request) -> dict:
        """Give a session a new title."""
        user = api_caller(services, request).user
        return guard(lambda: chat.update(user, session_id, title=title).public())

    def delete_session(session_id: str, request: gr.Request) -> str:
        """Delete a session and everything in it."""
        user = api_caller(services, request).user
        guard(lambda: chat.delete(user, session_id))
        return session_id

    def session_messages(session_id: str, request: gr.Request) -> list[dict]:
        """A session's messages, oldest first."""
        user = api_caller(services, request).user
        return guard(lambda: [{"role": m.role, "content": m.content, "meta": m.meta}
                              for m in chat.messages(user, session_id)])

    async def chat_turn(session_id: str, message: str, request: gr.Request) -> AsyncIterator[str]:
        """Send a message in a session; yields the reply as it grows (the last value is all of it)."""
        caller = api_caller(services, request)
        try:
            turn = await chat.send(caller, session_id, message)
        except ShoalError as exc:
            raise gr.Error(exc.message) from None
        text = ""
        try:
            async for event in turn.handle:
                if isinstance(event, TextDelta):
                    text += event.text
                    yield text
                elif isinstance(event, Failed):
                    raise gr.Error(event.error.message)
        finally:
            turn.handle.cancel()
        await turn.saved
        yield text

    def list_models() -> list[dict]:
        """Every model with its state, version and memory."""
        return [{k: m[k] for k in ("name", "version", "kind", "state", "progress", "error", "resident_bytes",
                                   "pinned", "in_flight")} for m in pool.models()]

    def load_model(name: str, request: gr.Request) -> dict:
        """Load a model now (waits until it is ready). Admins only."""
        admin_check(services, request)
        return guard(lambda: _short(pool.load(name)))

    def unload_model(name: str, request: gr.Request) -> dict:
        """Unload a model once its requests have finished. Admins only."""
        admin_check(services, request)
        return guard(lambda: _short(pool.unload(name)))

    for func, name in ((list_sessions, "list_sessions"), (create_session, "create_session"),
                       (rename_session, "rename_session"), (delete_session, "delete_session"),
                       (session_messages, "session_messages"), (chat_turn, "chat"),
                       (list_models, "list_models"), (load_model, "load_model"), (unload_model, "unload_model")):
        gr.api(func, api_name=name, concurrency_limit=None)


def _short(status: dict) -> dict:
    return {k: status[k] for k in ("name", "version", "state", "resident_bytes", "error")}
