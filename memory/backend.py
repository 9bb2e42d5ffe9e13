"""Where the session store keeps its data: an embedded SQLite file (one machine, the default) or
a PostgreSQL server (several Shoal replicas sharing one store, `--database-url`).

The store (memory/store.py) sees one small interface, the same on both: JSON values under string
keys (`get`, `set`, `delete`, `keys`), SQL for its tables (passages, postings, search text:
`sql(statement, args)` with `?` placeholders, results read at once), and write transactions
(`transact()`, nested calls join the outer one). Write transactions are serialized, on SQLite by
its write lock (BEGIN IMMEDIATE), on PostgreSQL by a transaction-scoped advisory lock, so a
read-modify-write of a chat's message list never loses another writer's turn, whichever replica
made it. Values are stored as JSON text (never pickle); on PostgreSQL in a `json` column (its
text as written, key order kept).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from llm_pool.errors import ServiceUnavailableError

log = logging.getLogger("shoal.store")

SCHEMA_VERSION = 2  # 1: sessions, messages, files, passages; 2: + search text, versions, undo
WRITE_LOCK = 0x5E0A1  # PostgreSQL advisory lock that serializes the store's write transactions


class Rows:
    """A statement's result, read whole (so no cursor outlives its connection)."""

    def __init__(self, rows: list[tuple], rowcount: int):
        self._rows, self.rowcount = rows, rowcount

    def fetchone(self) -> tuple | None:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[tuple]:
        return list(self._rows)

    def __iter__(self) -> Iterator[tuple]:
        return iter(self._rows)


class Backend(Protocol):
    dialect: str  # "sqlite" | "postgres"

    def get(self, key: str, default: Any = None) -> Any: ...
    def set(self, key: str, value: Any) -> None: ...
    def delete(self, key: str) -> None: ...
    def keys(self, prefix: str) -> list[str]: ...
    def sql(self, statement: str, args: Sequence[Any] = ()) -> Any: ...
    def transact(self) -> contextlib.AbstractContextManager: ...
    def has_table(self, name: str) -> bool: ...
    def failure(self, exc: BaseException) -> str | None: ...
    def check(self) -> list[str]: ...
    def close(self) -> None: ...


def open_backend(directory: Path, url: str | None = None) -> Backend:
    if url:
        return PostgresBackend(url)
    return SqliteBackend(directory)


class SqliteBackend:
    """diskcache over SQLite in WAL mode, JSON values; synchronous=FULL, so a written turn survives
    a crash of the process or of the machine. Every value stays inside SQLite (disk_min_file_size):
    diskcache keeps big values in side files that its nested transactions delete before the outer
    COMMIT and leave behind half-written on ENOSPC."""

    dialect = "sqlite"

    def __init__(self, directory: Path):
        import diskcache
        directory.mkdir(parents=True, exist_ok=True)
        self._db = diskcache.Cache(str(directory), disk=diskcache.JSONDisk, eviction_policy="none",
                                   size_limit=2**62, sqlite_synchronous=2, disk_min_file_size=2**30)

    def get(self, key: str, default: Any = None) -> Any:
        return self._db.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self._db.set(key, value)

    def delete(self, key: str) -> None:
        self._db.delete(key)

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self._db.iterkeys() if isinstance(k, str) and k.startswith(prefix)]

    def sql(self, statement: str, args: Sequence[Any] = ()) -> Any:
        return self._db._sql(statement, args)

    def transact(self):
        return self._db.transact()

    def has_table(self, name: str) -> bool:
        return self._db._sql("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() \
            is not None

    def failure(self, exc: BaseException) -> str | None:
        """"full" (the disk), "unavailable" (try again) or None (not the store's)."""
        if isinstance(exc, sqlite3.OperationalError):
            return "full" if "full" in str(exc) else "unavailable"
        if isinstance(exc, OSError):
            return "full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "unavailable"
        return None

    def check(self) -> list[str]:
        return ["sqlite integrity check reported problems"] if self._db.check() else []

    def close(self) -> None:
        self._db.close()


class PostgresBackend:
    """PostgreSQL through psycopg 3 and a small connection pool. A write transaction holds one
    connection (per thread) from `transact()` to its end; reads outside one borrow a connection
    per statement (autocommit: they see what is committed)."""

    dialect = "postgres"

    def __init__(self, url: str, max_connections: int = 16):
        import psycopg
        from psycopg_pool import ConnectionPool
        self._psycopg = psycopg
        # each connection is checked as it is lent (a restart or failover of the database leaves
        # dead ones behind); a database that cannot be reached fails a request within 5 s (503)
        self._pool = ConnectionPool(url, min_size=1, max_size=max_connections, open=True, timeout=5,
                                    kwargs={"autocommit": True, "connect_timeout": 3}, name="shoal-store",
                                    check=ConnectionPool.check_connection)
        self._local = threading.local()
        with self.transact():
            self.sql("CREATE TABLE IF NOT EXISTS shoal_kv (key TEXT PRIMARY KEY, value JSON NOT NULL)")

    @contextlib.contextmanager
    def transact(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:  # nested: joins the outer transaction
            yield
            return
        with self._pool.connection() as conn:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                self._local.conn = conn
                try:
                    yield
                finally:
                    self._local.conn = None

    def sql(self, statement: str, args: Sequence[Any] = ()) -> Rows:
        text = statement.replace("?", "%s")
        values = tuple(_text(a) for a in args)
        conn = getattr(self._local, "conn", None)
        if conn is not None:  # (a failure inside a transaction is the store's _write's to report)
            return self._run(conn, text, values)
        try:
            with self._pool.connection() as conn:
                return self._run(conn, text, values)
        except Exception as exc:
            if self.failure(exc) is None:
                raise
            log.warning("the session database cannot be reached: %s", exc)
            raise ServiceUnavailableError("the session database cannot be reached; try again shortly",
                                          code="store_unavailable", retry_after=5.0) from None

    @staticmethod
    def _run(conn, text: str, values: tuple) -> Rows:
        cursor = conn.execute(text, values)
        rows = cursor.fetchall() if cursor.description is not None else []
        return Rows(rows, cursor.rowcount)

    def get(self, key: str, default: Any = None) -> Any:
        row = self.sql("SELECT value FROM shoal_kv WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def set(self, key: str, value: Any) -> None:
        from psycopg.types.json import Json
        self.sql("INSERT INTO shoal_kv (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = "
                 "excluded.value", (key, Json(value, dumps=_dumps)))

    def delete(self, key: str) -> None:
        self.sql("DELETE FROM shoal_kv WHERE key = ?", (key,))

    def keys(self, prefix: str) -> list[str]:
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return [r[0] for r in self.sql("SELECT key FROM shoal_kv WHERE key LIKE ? ESCAPE '\\'", (escaped + "%",))]

    def has_table(self, name: str) -> bool:
        return self.sql("SELECT to_regclass(?)", (name,)).fetchone()[0] is not None

    def failure(self, exc: BaseException) -> str | None:
        errors = self._psycopg.errors
        if isinstance(exc, (errors.DiskFull, errors.OutOfMemory)):
            return "full"
        if isinstance(exc, (self._psycopg.OperationalError, self._psycopg.InterfaceError)) or \
                type(exc).__name__ == "PoolTimeout":
            return "unavailable"
        return None

    def check(self) -> list[str]:
        return []

    def close(self) -> None:
        self._pool.close()


def _dumps(value: Any) -> str:
    return json.dumps(_clean(value), ensure_ascii=False)


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict):
        return {_text(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _text(value: Any) -> Any:
    """PostgreSQL's text (and json) holds no NUL character: stored as U+FFFD (SQLite keeps it)."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value
