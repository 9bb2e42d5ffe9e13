"""The session store on its two backends, side by side in one run: the embedded SQLite store (the
default) and PostgreSQL (`--database-url`, replicas sharing one store), started here as the tests
start it (Debian's PostgreSQL 15 on loopback, fsync off). Per turn appended to one chat of up to
400 messages, and per read of that chat.

    .venv/bin/python -m bench.store_backends [--turns 200]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from memory.store import SessionStore, StoredMessage
from tests.conftest import PostgresProcess


def measure(store: SessionStore, turns: int) -> tuple[float, float]:
    sid = store.create("bench").id
    started = time.perf_counter()
    for i in range(turns):
        store.append("bench", sid, [StoredMessage("user", f"question {i} " * 20),
                                    StoredMessage("assistant", f"answer {i} " * 60)])
    append = (time.perf_counter() - started) / turns
    started = time.perf_counter()
    for _ in range(turns):
        store.messages("bench", sid)
    return append, (time.perf_counter() - started) / turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=200)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="shoal-bench-store-"))
    database = Path(tempfile.mkdtemp(prefix="shoal-bench-postgres-"))  # (a folder its user may enter)
    server = PostgresProcess(database)
    try:
        for name, url in (("sqlite", None), ("postgres", server.new_database())):
            store = SessionStore(folder / name, url)
            try:
                append, read = measure(store, args.turns)
            finally:
                store.close()
            print(f"{name:9} append a turn {append * 1000:6.1f} ms   read the chat {read * 1000:6.1f} ms")
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(database, ignore_errors=True)


if __name__ == "__main__":
    main()
