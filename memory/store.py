"""The durable session store: sessions, their messages and settings, per user, on disk.

Backed by diskcache (SQLite in WAL mode) with values stored as JSON, never pickle. A turn (the
user's message and the assistant's reply) is appended in one transaction, so two writers on one
session never lose or interleave turns, and a `kill -9` between turns loses nothing that was
acknowledged. Every read and write names the user: a session of another user is "not found",
exactly like a session that does not exist. Knows nothing about models or HTTP.
"""

from __future__ import annotations

import errno
import re
import sqlite3
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import diskcache

from llm_pool import faults
from llm_pool.errors import (
    ConflictError,
    InsufficientStorageError,
    InvalidParamsError,
    NotFoundError,
    ServiceUnavailableError,
)
from memory import index as passages

ID_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_TITLE = 200
MAX_QUERY = 200  # characters of a search over chats

# What search reads: each session's title and message text, casefolded (case-insensitive beyond
# ASCII), kept in the same transactions as the session and its messages.
SEARCH_SCHEMA = """
CREATE TABLE IF NOT EXISTS shoal_chat_text (
    session_id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    title TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS shoal_chat_text_user ON shoal_chat_text (user);
"""


class SessionNotFoundError(NotFoundError):
    def __init__(self, session_id: str):
        shown = session_id if ID_RE.match(str(session_id)) else "(invalid id)"
        super().__init__(f"session {shown} not found", param="session_id", code="session_not_found")


class FileNotFoundInSessionError(NotFoundError):
    def __init__(self, file_id: str):
        shown = file_id if ID_RE.match(str(file_id)) else "(invalid id)"
        super().__init__(f"file {shown} not found in this session", param="file_id", code="file_not_found")


class StorageError(ServiceUnavailableError):
    """The disk refused a write (full, read-only): nothing was half-written."""


@dataclass
class StoredMessage:
    role: str  # system | user | assistant
    content: str
    created: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)  # model, usage, timings, sources, finish_reason

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoredMessage:
        if data.get("role") not in ("system", "user", "assistant") or not isinstance(data.get("content"), str):
            raise InvalidParamsError("each message needs a role (system, user or assistant) and text content",
                                     param="messages")
        return cls(data["role"], data["content"], float(data.get("created") or time.time()),
                   dict(data.get("meta") or {}))


@dataclass
class Session:
    id: str
    user: str
    title: str
    model: str | None = None
    system_prompt: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    context_policy: dict[str, Any] = field(default_factory=dict)  # e.g. {"max_history_turns": 20}
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI tool objects the model may call
    tool_choice: str = "auto"  # auto | required: on the user's turns (after a tool's result: auto)
    mcp_servers: list[str] = field(default_factory=list)  # MCP servers whose tools this chat may call
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    message_count: int = 0

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("user")
        return data


class SessionStore:
    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        # JSON (never pickle) for keys and values; synchronous=FULL so a written turn survives
        # a crash of the process or of the machine. Every value stays inside SQLite
        # (disk_min_file_size): diskcache keeps big values in side files that its nested
        # transactions delete before the outer COMMIT and leave behind half-written on ENOSPC,
        # so a crash or a full disk mid-turn could lose or leak a long history.
        self._db = diskcache.Cache(str(directory), disk=diskcache.JSONDisk, eviction_policy="none",
                                   size_limit=2**62, sqlite_synchronous=2, disk_min_file_size=2**30)
        # The sessions' passages (memory/index.py) live in the same database, so removing a file
        # or a session removes its passages in the same transaction.
        with self._db.transact():
            passages.create_schema(self._db._sql)
            self._create_search_index()

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ helpers
    @property
    def sql(self):
        """This thread's `execute` on the store's database: for reads, and for writes inside
        `transaction`."""
        return self._db._sql

    def transaction(self, func):
        """Run `func(sql)` in one write transaction of the store (nested calls join it)."""
        return self._write(lambda: func(self._db._sql))

    def _write(self, func):
        try:
            with self._db.transact():
                faults.check("store.write")
                return func()
        except faults.InjectedFault as exc:
            raise StorageError(f"could not save ({exc}); nothing was changed", retry_after=5.0) from exc
        except sqlite3.OperationalError as exc:
            if "full" in str(exc):  # SQLITE_FULL: the disk, not the store, is the problem
                raise InsufficientStorageError("the server's disk is full: nothing was changed (the chat "
                                               "is as it was)", code="insufficient_storage") from exc
            raise StorageError(f"could not save: {exc}; nothing was changed", retry_after=5.0) from exc
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientStorageError("the server's disk is full: nothing was changed (the chat "
                                               "is as it was)", code="insufficient_storage") from exc
            raise StorageError(f"could not save ({exc.strerror}); nothing was changed", retry_after=5.0) from exc

    def _session(self, user: str, session_id: str) -> Session:
        if not isinstance(session_id, str) or not ID_RE.match(session_id):
            raise SessionNotFoundError(str(session_id))
        data = self._db.get(f"s:{session_id}")
        if data is None or data.get("user") != user:
            raise SessionNotFoundError(session_id)
        return Session(**data)

    def _create_search_index(self) -> None:
        """The search table; a store made before it existed has its sessions indexed once, here."""
        sql = self._db._sql
        existed = sql("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'shoal_chat_text'").fetchone()
        for statement in SEARCH_SCHEMA.split(";"):
            if statement.strip():
                sql(statement)
        if existed:
            return
        for key in list(self._db.iterkeys()):
            if isinstance(key, str) and key.startswith("s:"):
                data = self._db.get(key)
                if data:
                    self._index_text(data["id"], data["user"], data["title"], self._db.get(f"m:{data['id']}", []))

    def _index_text(self, session_id: str, user: str, title: str, messages: list[dict] | None = None) -> None:
        """Keep the session's searchable text (inside the caller's transaction); `messages`: the
        stored message list, None to change the title only."""
        if messages is None:
            self._db._sql("UPDATE shoal_chat_text SET title = ? WHERE session_id = ?", (title.casefold(), session_id))
            return
        body = "\n".join(str(m.get("content") or "") for m in messages).casefold()
        self._db._sql("INSERT OR REPLACE INTO shoal_chat_text (session_id, user, title, body) VALUES (?, ?, ?, ?)",
                      (session_id, user, title.casefold(), body))

    def _index(self, user: str) -> list[str]:
        return list(self._db.get(f"u:{user}", []))

    @staticmethod
    def _title(title: Any) -> str:
        if not isinstance(title, str):
            raise InvalidParamsError("title must be text", param="title")
        title = " ".join(title.split())[:MAX_TITLE]
        return title or "New chat"

    # ------------------------------------------------------------------ sessions
    def create(self, user: str, title: str = "New chat", **fields: Any) -> Session:
        session = Session(id=uuid.uuid4().hex, user=user, title=self._title(title), **fields)

        def write():
            self._db.set(f"s:{session.id}", asdict(session))
            self._db.set(f"m:{session.id}", [])
            self._db.set(f"u:{user}", [session.id] + self._index(user))
            self._index_text(session.id, user, session.title, [])
        self._write(write)
        return session

    def list(self, user: str) -> list[Session]:
        sessions = []
        for session_id in self._index(user):
            data = self._db.get(f"s:{session_id}")
            if data and data.get("user") == user:
                sessions.append(Session(**data))
        return sorted(sessions, key=lambda s: s.updated, reverse=True)

    def search(self, user: str, query: str) -> list[Session]:
        """The user's sessions whose title or any message contains `query` (case-insensitive), most
        recently used first; an empty query: all of them. Only this user's sessions are searched."""
        if not isinstance(query, str):
            raise InvalidParamsError("the search must be text", param="q")
        if len(query) > MAX_QUERY:
            raise InvalidParamsError(f"the search is longer than {MAX_QUERY} characters", param="q")
        needle = query.strip().casefold()
        if not needle:
            return self.list(user)
        escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{escaped}%"
        rows = self._db._sql("SELECT session_id FROM shoal_chat_text WHERE user = ? AND "
                             "(title LIKE ? ESCAPE '\\' OR body LIKE ? ESCAPE '\\')", (user, pattern, pattern))
        found = {row[0] for row in rows.fetchall()}
        return [s for s in self.list(user) if s.id in found]

    def get(self, user: str, session_id: str) -> Session:
        return self._session(user, session_id)

    def update(self, user: str, session_id: str, **changes: Any) -> Session:
        allowed = {"title", "model", "system_prompt", "params", "context_policy", "tools", "tool_choice",
                   "mcp_servers"}
        unknown = set(changes) - allowed
        if unknown:
            raise InvalidParamsError(f"cannot change '{sorted(unknown)[0]}'", param=sorted(unknown)[0])
        if "title" in changes:
            changes["title"] = self._title(changes["title"])

        def write():
            session = self._session(user, session_id)
            for key, value in changes.items():
                setattr(session, key, value)
            session.updated = time.time()
            self._db.set(f"s:{session_id}", asdict(session))
            if "title" in changes:
                self._index_text(session_id, user, session.title)
            return session
        return self._write(write)

    def delete(self, user: str, session_id: str) -> None:
        def write():
            self._session(user, session_id)
            self._db.delete(f"s:{session_id}")
            self._db.delete(f"m:{session_id}")
            self._db.delete(f"f:{session_id}")
            for response_id in self._db.get(f"rs:{session_id}", []):
                self._db.delete(f"r:{response_id}")
            self._db.delete(f"rs:{session_id}")
            passages.delete(self._db._sql, session_id)
            self._db._sql("DELETE FROM shoal_chat_text WHERE session_id = ?", (session_id,))
            self._db.set(f"u:{user}", [s for s in self._index(user) if s != session_id])
        self._write(write)

    def delete_many(self, user: str, *, older_than: float | None = None,
                    ids: list[str] | None = None) -> list[str]:
        """Delete the user's sessions last updated before `older_than`, or those in `ids`."""
        doomed = [s.id for s in self.list(user)
                  if (older_than is not None and s.updated < older_than) or (ids and s.id in ids)]
        for session_id in doomed:
            self.delete(user, session_id)
        return doomed

    # ------------------------------------------------------------------ messages
    def messages(self, user: str, session_id: str) -> list[StoredMessage]:
        self._session(user, session_id)
        return [StoredMessage(**m) for m in self._db.get(f"m:{session_id}", [])]

    def append(self, user: str, session_id: str, new: list[StoredMessage],
               truncate_to: int | None = None) -> Session:
        """Append messages atomically; `truncate_to` first cuts the history to that many messages
        (regenerate, edit-and-resend)."""
        def write():
            session = self._session(user, session_id)
            stored = self._db.get(f"m:{session_id}", [])
            if truncate_to is not None:
                stored = stored[:truncate_to]
            stored += [asdict(m) for m in new]
            session.message_count = len(stored)
            session.updated = time.time()
            if session.title == "New chat":
                first = next((m["content"] for m in stored if m["role"] == "user"), "")
                if first:
                    session.title = self._title(first[:60])
            self._db.set(f"m:{session_id}", stored)
            self._db.set(f"s:{session_id}", asdict(session))
            self._index_text(session_id, user, session.title, stored)
            return session
        return self._write(write)

    def clear_messages(self, user: str, session_id: str) -> Session:
        """Delete every message of a chat, the turns retrieval remembers of them and the stored API
        responses that continued them, in one transaction; the chat, its settings and files stay."""
        def write():
            session = self.append(user, session_id, [], truncate_to=0)
            passages.delete(self._db._sql, session_id, turns_from=0)
            for response_id in self._db.get(f"rs:{session_id}", []):
                self._db.delete(f"r:{response_id}")
            self._db.set(f"rs:{session_id}", [])
            return session
        return self._write(write)

    # ------------------------------------------------------------------ stored API responses
    def add_response(self, user: str, session_id: str, new: list[StoredMessage], response: dict[str, Any],
                     *, after: int, input_items: list[dict[str, Any]] | None = None) -> Session:
        """Append a Responses API exchange to the session in one transaction, and keep the response
        (its id maps to this session and to the history up to its end). `after`: how many
        messages the exchange follows; a session that has grown since is refused (the caller forks)."""
        def write():
            session = self._session(user, session_id)
            if session.message_count != after:
                raise ConflictError("the conversation moved on meanwhile", code="conversation_moved")
            session = self.append(user, session_id, new)
            self._db.set(f"r:{response['id']}", {"user": user, "session_id": session_id,
                                                 "count": session.message_count, "response": response,
                                                 "input": input_items or []})
            self._db.set(f"rs:{session_id}", self._db.get(f"rs:{session_id}", []) + [response["id"]])
            return session
        return self._write(write)

    def response(self, user: str, response_id: str) -> dict[str, Any]:
        """{"session_id", "count", "response"} of a stored response of this user (else not found)."""
        record = self._db.get(f"r:{response_id}") if isinstance(response_id, str) and len(response_id) < 100 else None
        if record is None or record.get("user") != user or self._db.get(f"s:{record['session_id']}") is None:
            raise NotFoundError(f"response '{str(response_id)[:100]}' not found", param="response_id",
                                code="response_not_found")
        return record

    def delete_response(self, user: str, response_id: str) -> None:
        def write():
            record = self.response(user, response_id)
            self._db.delete(f"r:{response_id}")
            self._db.set(f"rs:{record['session_id']}",
                         [r for r in self._db.get(f"rs:{record['session_id']}", []) if r != response_id])
        self._write(write)

    # ------------------------------------------------------------------ uploaded files (records only)
    def files(self, user: str, session_id: str) -> list[dict[str, Any]]:
        self._session(user, session_id)
        return list(self._db.get(f"f:{session_id}", []))

    def file(self, user: str, session_id: str, file_id: str) -> dict[str, Any]:
        for record in self.files(user, session_id):
            if record["id"] == file_id:
                return record
        raise FileNotFoundInSessionError(file_id)

    def add_file(self, user: str, session_id: str, record: dict[str, Any]) -> None:
        def write():
            self._session(user, session_id)
            self._db.set(f"f:{session_id}", list(self._db.get(f"f:{session_id}", [])) + [record])
        self._write(write)

    def update_file(self, session_id: str, file_id: str, **changes: Any) -> dict[str, Any] | None:
        """For the indexing worker: returns the updated record, or None if it is gone."""
        def write():
            records = list(self._db.get(f"f:{session_id}", []))
            for record in records:
                if record["id"] == file_id:
                    record.update(changes)
                    self._db.set(f"f:{session_id}", records)
                    return record
            return None
        return self._write(write)

    def remove_file(self, user: str, session_id: str, file_id: str) -> dict[str, Any]:
        def write():
            records = self.files(user, session_id)
            found = next((r for r in records if r["id"] == file_id), None)
            if found is None:
                raise FileNotFoundInSessionError(file_id)
            self._db.set(f"f:{session_id}", [r for r in records if r["id"] != file_id])
            passages.delete(self._db._sql, session_id, file_id=file_id)
            return found
        return self._write(write)

    def unfinished_files(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(user, session id, record) of files whose indexing a restart interrupted."""
        out = []
        for key in list(self._db.iterkeys()):
            if isinstance(key, str) and key.startswith("f:"):
                session = self._db.get(f"s:{key[2:]}")
                for record in self._db.get(key, []):
                    if session and record.get("status") in ("queued", "parsing", "indexing"):
                        out.append((session["user"], key[2:], record))
        return out

    # ------------------------------------------------------------------ export / import
    def export(self, user: str, session_id: str) -> dict[str, Any]:
        session = self._session(user, session_id)
        return {"format": "shoal-session/1", "session": session.public(),
                "messages": [asdict(m) for m in self.messages(user, session_id)]}

    def import_session(self, user: str, data: Any) -> Session:
        if not isinstance(data, dict) or data.get("format") != "shoal-session/1":
            raise InvalidParamsError("not a Shoal session export (format shoal-session/1)", param="file")
        meta = data.get("session") or {}
        messages = [StoredMessage.from_dict(m) for m in data.get("messages") or []]
        session = self.create(user, title=str(meta.get("title") or "Imported chat"),
                              model=meta.get("model"), system_prompt=str(meta.get("system_prompt") or ""),
                              params=dict(meta.get("params") or {}),
                              context_policy=dict(meta.get("context_policy") or {}))
        if messages:
            session = self.append(user, session.id, messages)
        return session

    def check(self) -> list[str]:
        """Consistency problems (empty list when the store is sound)."""
        problems = []
        if self._db.check():
            problems.append("sqlite integrity check reported problems")
        indexed = {sid for (sid,) in self._db._sql("SELECT session_id FROM shoal_chat_text").fetchall()}
        for key in self._db.iterkeys():
            if isinstance(key, str) and key.startswith("s:"):
                sid = key[2:]
                data = self._db.get(key)
                if sid not in indexed:
                    problems.append(f"session {sid} is missing from the search index")
                indexed.discard(sid)
                if self._db.get(f"m:{sid}") is None:
                    problems.append(f"session {sid} has no message list")
                elif len(self._db.get(f"m:{sid}")) != data.get("message_count"):
                    problems.append(f"session {sid} message count mismatch")
        for sid, file_id in self._db._sql("SELECT DISTINCT session_id, file_id FROM shoal_passages").fetchall():
            if self._db.get(f"s:{sid}") is None:
                problems.append(f"passages of deleted session {sid}")
            elif file_id and file_id not in {r["id"] for r in self._db.get(f"f:{sid}", [])}:
                problems.append(f"passages of removed file {file_id} in session {sid}")
        problems += [f"search text of deleted session {sid}" for sid in sorted(indexed)]
        return problems
