"""Stored Responses API conversations, kept as the user's chat sessions.

A stored response belongs to a session: the first response of a conversation starts a new chat;
`previous_response_id` continues the chat of that response from the point where it ended (if the
chat has moved on since, e.g. two answers to one response, the history up to that point is
copied into a new chat: a branch); `conversation` names a chat (its id) and continues it at its
end. Each exchange (the new input items and the answer) is appended in one transaction, so a
response id always maps to a history that existed, survives a restart, and is visible in the UI
and the sessions API as an ordinary chat. Deleting the chat deletes its responses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llm_pool import Finished, Message
from llm_pool.errors import ConflictError
from llm_pool.reasoning import ThoughtMarks, split
from memory.store import SessionStore, StoredMessage

from .chat import ChatService, _as_message


@dataclass
class Opening:
    session_id: str | None = None  # None: a new chat
    history: list[StoredMessage] = field(default_factory=list)
    after: int | None = 0  # how many messages the exchange follows (None: the chat's end, whatever it is)

    def messages(self) -> list[Message]:
        return [_as_message(m) for m in self.history]


class ResponsesService:
    def __init__(self, store: SessionStore, chat: ChatService):
        self.store = store
        self.chat = chat

    def opening(self, user: str, previous_id: str | None, conversation: str | None) -> Opening:
        if previous_id is not None:
            record = self.store.response(user, previous_id)
            history = self.store.messages(user, record["session_id"])[:record["count"]]
            return Opening(record["session_id"], history, record["count"])
        if conversation is not None:
            return Opening(conversation, self.store.messages(user, conversation), None)
        return Opening()

    def get(self, user: str, response_id: str) -> dict[str, Any]:
        record = self.store.response(user, response_id)
        return {**record["response"], "conversation": {"id": record["session_id"]}}

    def delete(self, user: str, response_id: str) -> None:
        self.store.delete_response(user, response_id)

    def input_items(self, user: str, response_id: str) -> list[dict[str, Any]]:
        """The input items of a stored response, as it was sent (oldest first)."""
        return list(self.store.response(user, response_id).get("input") or [])

    def save(self, user: str, opening: Opening, new: list[StoredMessage], response: dict[str, Any],
             model: str, input_items: list[dict[str, Any]] | None = None) -> str:
        """Store the exchange; returns the chat's id (a new one for a new conversation or a branch)."""
        self.chat.quotas.check_messages(len(opening.history) + len(new))
        session_id = opening.session_id
        if session_id is not None:
            after = opening.after if opening.after is not None else self.store.get(user, session_id).message_count
            try:
                self.store.add_response(user, session_id, new, response, after=after, input_items=input_items)
                return session_id
            except ConflictError:
                pass  # the chat moved on after that response: branch off it
        session = self.chat.create(user, title="New chat", model=model)
        if opening.history:
            self.store.append(user, session.id, opening.history)
        self.store.add_response(user, session.id, new, response, after=len(opening.history),
                                input_items=input_items)
        return session.id


def answer_messages(final: Finished, calls: list[dict] | None, thoughts: ThoughtMarks | None = None) -> StoredMessage:
    """The answer as the chat stores it (a call as the UI's chats store one; the thoughts of a model
    that thinks in the meta, as `reasoning`, so that later turns do not show them to the model)."""
    thought, text = split(final.text, thoughts)
    meta: dict[str, Any] = {"model": final.model, "finish_reason": "tool_calls" if calls else final.reason,
                            "usage": {"prompt_tokens": final.usage.prompt_tokens,
                                      "completion_tokens": final.usage.completion_tokens,
                                      "cached_tokens": final.usage.cached_tokens,
                                      "disk_tokens": final.usage.disk_tokens}}
    if calls:
        meta["tool_calls"] = calls
    if thought:
        meta["reasoning"] = thought
    return StoredMessage("assistant", text, meta=meta)
