"""The durable session store: sessions, their messages and settings, per user, on disk.

Backed by diskcache (SQLite in WAL mode) with values stored as JSON, never pickle. A turn (the
user's message and the assistant's reply) is appended in one transaction, so two writers on one
session never lose or interleave turns, and a `kill -9` between turns loses nothing that was
acknowledged. Every read and write names the user: a session of another user is "not found",
exactly like a session that does not exist. Knows nothing about models or HTTP.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llm_pool import faults
from llm_pool.errors import (
    ConflictError,
    InsufficientStorageError,
    InvalidParamsError,
    NotFoundError,
    ServiceUnavailableError,
)
from memory import index as passages
from memory import versions
from memory.backend import SCHEMA_VERSION, open_backend

log = logging.getLogger("shoal.store")

ID_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_TITLE = 200
MAX_QUERY = 200  # characters of a search over chats
UNDO_SECONDS = 600  # how long a delete of messages can be undone

# What search reads: each session's title and message text, casefolded (case-insensitive beyond
# ASCII), kept in the same transactions as the session and its messages.
SEARCH_SCHEMA = """
CREATE TABLE IF NOT EXISTS shoal_chat_text (
    session_id TEXT PRIMARY KEY,
    "user" TEXT NOT NULL,
    title TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS shoal_chat_text_user ON shoal_chat_text ("user");
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
    def __init__(self, directory: Path, url: str | None = None):
        """The store in `directory` (embedded SQLite), or on the PostgreSQL server of `url`
        (several replicas sharing it): memory/backend.py."""
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._kv = open_backend(directory, url)
        self.dialect = self._kv.dialect
        # The sessions' passages (memory/index.py) live in the same database, so removing a file
        # or a session removes its passages in the same transaction.
        with self._kv.transact():
            self._migrate()

    def close(self) -> None:
        self._kv.close()

    def _migrate(self) -> None:
        """Create or bring the schema up to this version (a store written by a newer Shoal is
        refused rather than misread)."""
        found = self._kv.get("meta:schema")
        if found is not None and found > SCHEMA_VERSION:
            raise RuntimeError(f"the session store was written by a newer Shoal (schema {found}; this one "
                               f"reads up to {SCHEMA_VERSION}): upgrade Shoal, or point it at another store")
        passages.create_schema(self._kv.sql, self.dialect)
        self._create_search_index()
        if found != SCHEMA_VERSION:
            self._kv.set("meta:schema", SCHEMA_VERSION)

    # ------------------------------------------------------------------ helpers
    @property
    def sql(self):
        """This thread's `execute` on the store's database: for reads, and for writes inside
        `transaction`."""
        return self._kv.sql

    def transaction(self, func):
        """Run `func(sql)` in one write transaction of the store (nested calls join it)."""
        return self._write(lambda: func(self._kv.sql))

    def _write(self, func):
        try:
            with self._kv.transact():
                faults.check("store.write")
                return func()
        except faults.InjectedFault as exc:
            raise StorageError(f"could not save ({exc}); nothing was changed", retry_after=5.0) from exc
        except Exception as exc:
            failure = self._kv.failure(exc)
            if failure == "full":  # the disk, not the store, is the problem
                raise InsufficientStorageError("the server's disk is full: nothing was changed (the chat "
                                               "is as it was)", code="insufficient_storage") from exc
            if failure == "unavailable":
                # (PostgreSQL's errors name its host: logged, not sent)
                shown = exc if self.dialect == "sqlite" else "the session database cannot be reached"
                if self.dialect != "sqlite":
                    log.warning("could not save: %s", exc)
                raise StorageError(f"could not save ({shown}); nothing was changed", retry_after=5.0) from exc
            raise

    def _session(self, user: str, session_id: str) -> Session:
        if not isinstance(session_id, str) or not ID_RE.match(session_id):
            raise SessionNotFoundError(str(session_id))
        data = self._kv.get(f"s:{session_id}")
        if data is None or data.get("user") != user:
            raise SessionNotFoundError(session_id)
        return Session(**data)

    def _create_search_index(self) -> None:
        """The search table; a store made before it existed has its sessions indexed once, here."""
        sql = self._kv.sql
        existed = self._kv.has_table("shoal_chat_text")
        for statement in SEARCH_SCHEMA.split(";"):
            if statement.strip():
                sql(statement)
        if existed:
            return
        for key in self._kv.keys("s:"):
            data = self._kv.get(key)
            if data:
                self._index_text(data["id"], data["user"], data["title"], self._kv.get(f"m:{data['id']}", []))

    def _index_text(self, session_id: str, user: str, title: str, messages: list[dict] | None = None) -> None:
        """Keep the session's searchable text (inside the caller's transaction); `messages`: the
        stored message list, None to change the title only."""
        if messages is None:
            self._kv.sql("UPDATE shoal_chat_text SET title = ? WHERE session_id = ?",
                         (title.casefold().replace("\x00", "\ufffd"), session_id))
            return
        # (a NUL would end the text for SQLite's LIKE: what follows it could not be found)
        body = "\n".join(str(m.get("content") or "") for m in messages).casefold().replace("\x00", "\ufffd")
        self._kv.sql('INSERT INTO shoal_chat_text (session_id, "user", title, body) VALUES (?, ?, ?, ?) '
                     'ON CONFLICT (session_id) DO UPDATE SET "user" = excluded."user", title = excluded.title, '
                     "body = excluded.body",
                      (session_id, user, title.casefold().replace("\x00", "\ufffd"), body))

    def _index(self, user: str) -> list[str]:
        return list(self._kv.get(f"u:{user}", []))

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
            self._kv.set(f"s:{session.id}", asdict(session))
            self._kv.set(f"m:{session.id}", [])
            self._kv.set(f"u:{user}", [session.id] + self._index(user))
            self._index_text(session.id, user, session.title, [])
        self._write(write)
        return session

    def list(self, user: str) -> list[Session]:
        sessions = []
        for session_id in self._index(user):
            data = self._kv.get(f"s:{session_id}")
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
        rows = self._kv.sql("SELECT session_id FROM shoal_chat_text WHERE \"user\" = ? AND "
                             "(title LIKE ? ESCAPE '\\' OR body LIKE ? ESCAPE '\\')", (user, pattern, pattern))
        found = {row[0] for row in rows.fetchall()}
        return [s for s in self.list(user) if s.id in found]

    def get(self, user: str, session_id: str) -> Session:
        return self._session(user, session_id)

    def exists(self, session_id: str) -> bool:
        """Whether the session is still there (for background work that outlived a request)."""
        return self._kv.get(f"s:{session_id}") is not None

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
            self._kv.set(f"s:{session_id}", asdict(session))
            if "title" in changes:
                self._index_text(session_id, user, session.title)
            return session
        return self._write(write)

    def delete(self, user: str, session_id: str) -> None:
        def write():
            self._session(user, session_id)
            self._kv.delete(f"s:{session_id}")
            self._kv.delete(f"m:{session_id}")
            self._kv.delete(f"v:{session_id}")
            self._kv.delete(f"x:{session_id}")
            self._kv.delete(f"f:{session_id}")
            for response_id in self._kv.get(f"rs:{session_id}", []):
                self._kv.delete(f"r:{response_id}")
            self._kv.delete(f"rs:{session_id}")
            passages.delete(self._kv.sql, session_id)
            self._kv.sql("DELETE FROM shoal_chat_text WHERE session_id = ?", (session_id,))
            self._kv.set(f"u:{user}", [s for s in self._index(user) if s != session_id])
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
        return [StoredMessage(**m) for m in self._kv.get(f"m:{session_id}", [])]

    def thread(self, user: str, session_id: str) -> tuple[list[StoredMessage], dict[int, tuple[int, int]]]:
        """The chat's messages (its chosen branch) and its forks: {position: (chosen version, count)}
        (a fork at a user's message: its edits; at a reply: its regenerates)."""
        self._session(user, session_id)
        return ([StoredMessage(**m) for m in self._kv.get(f"m:{session_id}", [])],
                versions.marks(self._kv.get(f"v:{session_id}", {})))

    def append(self, user: str, session_id: str, new: list[StoredMessage],
               truncate_to: int | None = None, *, fork: bool = True) -> Session:
        """Append messages atomically; `truncate_to` first replaces the history from that message
        on (regenerate, edit-and-resend): what it replaces is kept as a version of the chat
        (memory/versions.py) unless `fork` is False (a continued reply: it extends itself)."""
        def write():
            session = self._session(user, session_id)
            stored = self._kv.get(f"m:{session_id}", [])
            forks = self._kv.get(f"v:{session_id}", {})
            added = [asdict(m) for m in new]
            if truncate_to is None or truncate_to >= len(stored):
                stored = stored + added
            else:
                self._drop_responses(session_id, truncate_to)
                if fork:
                    stored, forks = versions.fork(stored, forks, truncate_to, added)
                else:
                    stored = stored[:truncate_to] + added  # (the versions of what it extends stay)
                    forks = {k: v for k, v in forks.items() if int(k) < len(stored)}
                self._kv.set(f"v:{session_id}", forks)
            return self._save_messages(user, session, stored)
        return self._write(write)

    def _save_messages(self, user: str, session: Session, stored: list[dict]) -> Session:
        """(Inside a transaction.) The chat's message list replaced by `stored`."""
        session.message_count = len(stored)
        session.updated = time.time()
        if session.title == "New chat":
            first = next((m["content"] for m in stored if m["role"] == "user"), "")
            if first:
                session.title = self._title(first[:60])
        self._kv.set(f"m:{session.id}", stored)
        self._kv.set(f"s:{session.id}", asdict(session))
        self._index_text(session.id, user, session.title, stored)
        return session

    def _drop_responses(self, session_id: str, at: int) -> None:
        """(Inside a transaction.) Stored API responses whose history reaches past message `at`
        described messages that are changed now: continuing them would show the model another
        conversation, so they go (their ids are then "not found")."""
        kept = []
        for response_id in self._kv.get(f"rs:{session_id}", []):
            record = self._kv.get(f"r:{response_id}")
            if record is not None and record["count"] > at:
                self._kv.delete(f"r:{response_id}")
            elif record is not None:
                kept.append(response_id)
        self._kv.set(f"rs:{session_id}", kept)

    # ------------------------------------------------------------------ versions, delete, undo
    def select_version(self, user: str, session_id: str, at: int, version: int) -> Session:
        """The chat goes on with version `version` of the messages from `at` on."""
        def write():
            session = self._session(user, session_id)
            stored = self._kv.get(f"m:{session_id}", [])
            forks = self._kv.get(f"v:{session_id}", {})
            try:
                chosen, forks = versions.select(stored, forks, at, version)
            except LookupError as exc:  # (IndexError too)
                raise NotFoundError(str(exc), param="version" if isinstance(exc, IndexError) else "index",
                                    code="version_not_found") from None
            if chosen is stored:
                return session
            self._drop_responses(session_id, at)
            self._kv.set(f"v:{session_id}", forks)
            return self._save_messages(user, session, chosen)
        return self._write(write)

    def versions(self, user: str, session_id: str, at: int) -> list[dict[str, Any]]:
        self._session(user, session_id)
        try:
            return versions.listed(self._kv.get(f"m:{session_id}", []), self._kv.get(f"v:{session_id}", {}), at)
        except LookupError as exc:
            raise NotFoundError(str(exc), param="index", code="version_not_found") from None

    @staticmethod
    def turn_bounds(messages: list[StoredMessage] | list[dict], index: int) -> tuple[int, int]:
        """[start, end) of the turn message `index` belongs to: the user's message, the reply, and
        any tool calls and results between them (a tool's result is a user message that belongs
        to the turn of the call)."""
        def role(i):
            m = messages[i]
            return (m["role"], m.get("meta") or {}) if isinstance(m, dict) else (m.role, m.meta)

        def opens(i):
            r, meta = role(i)
            return r == "user" and not meta.get("tool_call_id")

        if not 0 <= index < len(messages) or role(index)[0] == "system":
            raise NotFoundError(f"the chat has no message {index}", param="index", code="message_not_found")
        start = index
        while start > 0 and not opens(start):
            start -= 1
        end = index + 1
        while end < len(messages) and not opens(end):
            end += 1
        return start, end

    def delete_turn(self, user: str, session_id: str, index: int) -> tuple[Session, int]:
        """Delete the turn message `index` belongs to (and the versions inside it), for good; it can
        be undone (`restore`) for UNDO_SECONDS while the chat is unchanged. Returns (the session,
        where the deleted turn began)."""
        def write():
            session = self._session(user, session_id)
            stored = self._kv.get(f"m:{session_id}", [])
            forks = self._kv.get(f"v:{session_id}", {})
            start, end = self.turn_bounds(stored, index)
            after, after_forks = stored[:start] + stored[end:], versions.cut(forks, start, end)
            self._keep_undo(session_id, stored, forks, after, after_forks, start)
            self._drop_responses(session_id, start)
            passages.delete(self._kv.sql, session_id, turns_from=start)
            self._kv.set(f"v:{session_id}", after_forks)
            return self._save_messages(user, session, after), start
        return self._write(write)

    def restore(self, user: str, session_id: str) -> tuple[Session, int]:
        """Undo the last delete of messages (a turn, or all of them), while the chat is as the
        delete left it. Returns (the session, where the restored messages begin)."""
        def write():
            session = self._session(user, session_id)
            undo = self._kv.get(f"x:{session_id}")
            if undo is None or time.time() - undo["time"] > UNDO_SECONDS:
                raise NotFoundError("nothing to undo in this chat (a delete can be undone for "
                                    f"{UNDO_SECONDS // 60} minutes)", param="session_id", code="nothing_to_undo")
            now = (self._kv.get(f"m:{session_id}", []), self._kv.get(f"v:{session_id}", {}))
            if _digest(*now) != undo["after"]:
                raise ConflictError("the chat changed since the delete: it cannot be undone",
                                    param="session_id", code="chat_changed")
            self._kv.delete(f"x:{session_id}")
            self._kv.set(f"v:{session_id}", undo["forks"])
            return self._save_messages(user, session, undo["messages"]), undo["at"]
        return self._write(write)

    def _keep_undo(self, session_id: str, messages, forks, after, after_forks, at: int) -> None:
        self._kv.set(f"x:{session_id}", {"messages": messages, "forks": forks, "at": at, "time": time.time(),
                                         "after": _digest(after, after_forks)})

    def clear_messages(self, user: str, session_id: str) -> Session:
        """Delete every message of a chat, the turns retrieval remembers of them and the stored API
        responses that continued them, in one transaction; the chat, its settings and files stay."""
        def write():
            session = self._session(user, session_id)
            self._keep_undo(session_id, self._kv.get(f"m:{session_id}", []), self._kv.get(f"v:{session_id}", {}),
                            [], {}, 0)
            self._kv.set(f"v:{session_id}", {})
            session = self._save_messages(user, session, [])
            passages.delete(self._kv.sql, session_id, turns_from=0)
            for response_id in self._kv.get(f"rs:{session_id}", []):
                self._kv.delete(f"r:{response_id}")
            self._kv.set(f"rs:{session_id}", [])
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
            self._kv.set(f"r:{response['id']}", {"user": user, "session_id": session_id,
                                                 "count": session.message_count, "response": response,
                                                 "input": input_items or []})
            self._kv.set(f"rs:{session_id}", self._kv.get(f"rs:{session_id}", []) + [response["id"]])
            return session
        return self._write(write)

    def response(self, user: str, response_id: str) -> dict[str, Any]:
        """{"session_id", "count", "response"} of a stored response of this user (else not found)."""
        record = self._kv.get(f"r:{response_id}") if isinstance(response_id, str) and len(response_id) < 100 else None
        if record is None or record.get("user") != user or self._kv.get(f"s:{record['session_id']}") is None:
            raise NotFoundError(f"response '{str(response_id)[:100]}' not found", param="response_id",
                                code="response_not_found")
        return record

    def delete_response(self, user: str, response_id: str) -> None:
        def write():
            record = self.response(user, response_id)
            self._kv.delete(f"r:{response_id}")
            self._kv.set(f"rs:{record['session_id']}",
                         [r for r in self._kv.get(f"rs:{record['session_id']}", []) if r != response_id])
        self._write(write)

    # ------------------------------------------------------------------ uploaded files (records only)
    def files(self, user: str, session_id: str) -> list[dict[str, Any]]:
        self._session(user, session_id)
        return list(self._kv.get(f"f:{session_id}", []))

    def file(self, user: str, session_id: str, file_id: str) -> dict[str, Any]:
        for record in self.files(user, session_id):
            if record["id"] == file_id:
                return record
        raise FileNotFoundInSessionError(file_id)

    def add_file(self, user: str, session_id: str, record: dict[str, Any]) -> None:
        def write():
            self._session(user, session_id)
            self._kv.set(f"f:{session_id}", list(self._kv.get(f"f:{session_id}", [])) + [record])
        self._write(write)

    def update_file(self, session_id: str, file_id: str, **changes: Any) -> dict[str, Any] | None:
        """For the indexing worker: returns the updated record, or None if it is gone."""
        def write():
            records = list(self._kv.get(f"f:{session_id}", []))
            for record in records:
                if record["id"] == file_id:
                    record.update(changes)
                    self._kv.set(f"f:{session_id}", records)
                    return record
            return None
        return self._write(write)

    def remove_file(self, user: str, session_id: str, file_id: str) -> dict[str, Any]:
        def write():
            records = self.files(user, session_id)
            found = next((r for r in records if r["id"] == file_id), None)
            if found is None:
                raise FileNotFoundInSessionError(file_id)
            self._kv.set(f"f:{session_id}", [r for r in records if r["id"] != file_id])
            passages.delete(self._kv.sql, session_id, file_id=file_id)
            return found
        return self._write(write)

    def unfinished_files(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(user, session id, record) of files whose indexing a restart interrupted."""
        out = []
        for key in self._kv.keys("f:"):
            session = self._kv.get(f"s:{key[2:]}")
            for record in self._kv.get(key, []):
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
        problems = self._kv.check()
        indexed = {sid for (sid,) in self._kv.sql("SELECT session_id FROM shoal_chat_text").fetchall()}
        for key in self._kv.keys("s:"):
            sid = key[2:]
            data = self._kv.get(key)
            if sid not in indexed:
                problems.append(f"session {sid} is missing from the search index")
            indexed.discard(sid)
            if self._kv.get(f"m:{sid}") is None:
                problems.append(f"session {sid} has no message list")
            elif len(self._kv.get(f"m:{sid}")) != data.get("message_count"):
                problems.append(f"session {sid} message count mismatch")
        for sid, file_id in self._kv.sql("SELECT DISTINCT session_id, file_id FROM shoal_passages").fetchall():
            if self._kv.get(f"s:{sid}") is None:
                problems.append(f"passages of deleted session {sid}")
            elif file_id and file_id not in {r["id"] for r in self._kv.get(f"f:{sid}", [])}:
                problems.append(f"passages of removed file {file_id} in session {sid}")
        problems += [f"search text of deleted session {sid}" for sid in sorted(indexed)]
        return problems


def _digest(messages: list[dict], forks: dict) -> str:
    return hashlib.sha256(json.dumps([messages, forks], sort_keys=True).encode()).hexdigest()
