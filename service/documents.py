"""Files in a session and the session's memory: upload, parse, chunk, embed, retrieve, remove.

`add` stores the bytes under a server-chosen name and answers at once; a small worker pool then
parses the file in a sandboxed process (time and memory bound), chunks it by its structure, embeds
the chunks, and stores the passages in the session store's database in the same transaction that
marks the file ready, updating the file's status and progress as it goes (queued, parsing,
indexing, ready, or failed with a reason). Removing a file or a session removes its passages in
the transaction that removes its record. Finished chat turns are embedded too, so turns that fall
out of the model's window can still be retrieved when relevant. Retrieval is hybrid (meaning and
words; memory/index.py). Reading and embedding a file run at a lower CPU priority (`index_niceness`), so chats running
beside it keep their pace. The workers take users in turn, and one user at most all workers but
one, so one user's big uploads never keep another's small file queued. Knows nothing about HTTP or
Gradio.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from llm_pool.errors import ConflictError, InvalidParamsError, PayloadTooLargeError
from memory import index as passages
from memory.chunking import Chunk, chunk_document
from memory.context import Passage
from memory.embeddings import Embedder
from memory.index import Retrieval, Searcher
from memory.store import SessionStore
from parsing import ParseError, ParseLimits, parse_isolated

from .fairness import RoundRobin
from .quotas import Quotas, disk_full

log = logging.getLogger("shoal.documents")
PENDING = ("queued", "parsing", "indexing")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]+")


class DocumentsNotReadyError(ConflictError):
    def __init__(self, pending: list[dict]):
        names = ", ".join(f"{r['name']} ({r['status']} {int(r['progress'] * 100)}%)" for r in pending)
        super().__init__(f"Still reading {names}; ask again when it is ready so the answer can use it.",
                         code="documents_not_ready")
        self.retry_after = 5.0


def _background_priority(niceness: int) -> None:
    """Indexing threads (and the torch threads they start, which inherit it) run at a lower CPU
    priority than the engine, so a large file does not slow running chats (Linux: per thread)."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux: the default priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)


def display_name(name: str) -> str:
    """The name to show: no folders, no control characters, at most 200 characters."""
    base = _UNSAFE.sub("_", (name or "").replace("\\", "/").rsplit("/", 1)[-1]).strip(" .")
    return (base or "upload")[:200]


class DocumentService:
    def __init__(self, store: SessionStore, folder: Path, embedder: Embedder, *, max_bytes: int,
                 limits: ParseLimits = ParseLimits(), workers: int = 2, retrieval: Retrieval = Retrieval(),
                 embed_batch: int = 16, busy: Callable[[], bool] | None = None, yield_seconds: float = 1.0,
                 quotas: Quotas | None = None):
        self.store = store
        self.folder = folder
        self.embedder = embedder
        self.max_bytes = max_bytes
        self.limits = limits
        self.retrieval = retrieval
        self.embed_batch = embed_batch
        self.busy = busy  # are chats generating? then indexing steps aside (see _yield_to_chats)
        self.yield_seconds = yield_seconds
        self.quotas = quotas or Quotas()  # files, bytes and uploads per minute per user; the disk's floor
        self._adding = threading.Lock()  # counting a user's files and storing one: one step
        self.searcher = Searcher(lambda: store.sql)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="documents",
                                        initializer=_background_priority, initargs=(limits.niceness,))
        self._workers = workers
        self._waiting: RoundRobin[tuple[str, str, str]] = RoundRobin()  # files to read, per user
        self._reading: Counter[str] = Counter()  # files being read, per user
        self._turns = threading.Lock()
        self._migrate()
        for user, session_id, record in store.unfinished_files():  # a restart interrupted these
            # (with replicas sharing one store, a file another replica is reading is its own: its
            # bytes are on that replica's disk, not here)
            if self._raw_path(session_id, record["id"]).exists():
                self._enqueue(user, session_id, record["id"], record["name"])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _migrate(self) -> None:
        """Passages of an older version (index/<session>/vectors.npy + chunks.json) move into the store."""
        old = self.folder / "index"
        if not old.is_dir():
            return
        import numpy as np
        for folder in sorted(old.iterdir()):
            try:
                chunks = [Chunk(**c) for c in json.loads((folder / "chunks.json").read_text())]
                vectors = np.load(folder / "vectors.npy")
                if self.store.exists(folder.name) and chunks:
                    self.store.transaction(lambda sql, f=folder, c=chunks, v=vectors: passages.insert(
                        sql, f.name, c, v) if not passages.count(sql, f.name) else None)
            except (OSError, ValueError, TypeError) as exc:
                log.warning("could not move the old index of session %s: %s", folder.name, exc)
                continue
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)

    def _raw_path(self, session_id: str, file_id: str) -> Path:
        return self.folder / "files" / session_id / file_id

    # ------------------------------------------------------------------ files
    def add(self, user: str, session_id: str, name: str, data: bytes) -> dict[str, Any]:
        self.store.get(user, session_id)  # not found for other users' sessions
        if len(data) > self.max_bytes:
            raise PayloadTooLargeError(f"the file is {len(data) / 1e6:.1f} MB; the limit is "
                                       f"{self.max_bytes / 1e6:.0f} MB", param="file")
        if not data:
            raise InvalidParamsError("the file is empty", param="file")
        self.quotas.admit_upload(user)
        record = {"id": uuid.uuid4().hex, "name": display_name(name), "size": len(data), "status": "queued",
                  "progress": 0.0, "reason": None, "created": time.time(), "chunks": 0, "kind": None,
                  "language": None, "pages": None}
        path = self._raw_path(session_id, record["id"])
        with self._adding:
            self.quotas.check_files(*self._usage(user), len(data))
            self.quotas.check_disk(self.folder, len(data))
            self._write(path, data)
            try:
                self.store.add_file(user, session_id, record)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        self._enqueue(user, session_id, record["id"], record["name"])
        return record

    def _enqueue(self, user: str, session_id: str, file_id: str, name: str) -> None:
        with self._turns:
            self._waiting.push(user, (session_id, file_id, name))
            self._start_next()

    def _start_next(self) -> None:
        """Start waiting files while workers are free: users in turn, the one reading fewest first,
        and one user at most all workers but one (a file being read cannot be paused, so a
        worker stays free for the next user's file). Under `_turns`."""
        per_user = max(1, self._workers - 1)
        while sum(self._reading.values()) < self._workers:
            picked = self._waiting.pop(lambda user: self._reading[user] < per_user,
                                       rank=lambda user: self._reading[user])
            if picked is None:
                return
            user, job = picked
            self._reading[user] += 1
            self._pool.submit(self._read_in_turn, user, *job)

    def _read_in_turn(self, user: str, session_id: str, file_id: str, name: str) -> None:
        try:
            self._process(user, session_id, file_id, name)
        finally:
            with self._turns:
                self._reading[user] -= 1
                if self._reading[user] <= 0:
                    del self._reading[user]
                self._start_next()

    def _usage(self, user: str) -> tuple[int, int]:
        """The files the user keeps over all their sessions, and their bytes."""
        records = [r for session in self.store.list(user) for r in self.store.files(user, session.id)]
        return len(records), sum(r.get("size", 0) for r in records)

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        """The upload's bytes, whole or not at all: a full disk is a 507 and leaves no partial file."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        except OSError as exc:
            path.unlink(missing_ok=True)
            full = disk_full(exc)
            if full is None:
                raise
            raise full from None

    def list(self, user: str, session_id: str) -> list[dict[str, Any]]:
        return self.store.files(user, session_id)

    def get(self, user: str, session_id: str, file_id: str) -> dict[str, Any]:
        return self.store.file(user, session_id, file_id)

    def remove(self, user: str, session_id: str, file_id: str) -> dict[str, Any]:
        record = self.store.remove_file(user, session_id, file_id)  # its passages go in that transaction
        self._raw_path(session_id, file_id).unlink(missing_ok=True)
        return record

    def delete_session(self, session_id: str) -> None:
        """After the store deleted the session (and its passages in that transaction): its bytes."""
        self.searcher.forget(session_id)
        shutil.rmtree(self.folder / "files" / session_id, ignore_errors=True)

    def pending(self, user: str, session_id: str) -> list[dict[str, Any]]:
        return [r for r in self.store.files(user, session_id) if r["status"] in PENDING]

    def _process(self, user: str, session_id: str, file_id: str, name: str) -> None:
        def update(**changes):
            return self.store.update_file(session_id, file_id, **changes)

        try:
            if update(status="parsing", progress=0.1) is None:
                return  # removed before we started
            data = self._raw_path(session_id, file_id).read_bytes()
            document = parse_isolated(name, data, self.limits, busy=self.busy, yield_seconds=self.yield_seconds)
            chunks = chunk_document(document, file_id, name)
            if not chunks:
                raise ParseError("no text to index in this file")
            if update(status="indexing", progress=0.3, kind=document.kind, language=document.language,
                      pages=document.pages) is None:
                return
            vectors = []
            start = 0
            while start < len(chunks):
                step = self._yield_to_chats()
                vectors.append(self.embedder.embed([c.index_text() for c in chunks[start:start + step]],
                                                   background=True))
                start += step
                if update(progress=0.3 + 0.65 * min(1.0, start / len(chunks))) is None:
                    return
            import numpy as np
            matrix = np.vstack(vectors)

            def commit(sql):  # passages and "ready" in one transaction, unless the file went meanwhile
                if self.store.update_file(session_id, file_id, status="ready", progress=1.0,
                                          chunks=len(chunks)) is not None:
                    passages.delete(sql, session_id, file_id=file_id)  # a restarted run replaces its own
                    passages.insert(sql, session_id, chunks, matrix)
            self.store.transaction(commit)
        except ParseError as exc:
            update(status="failed", progress=1.0, reason=exc.reason)
        except FileNotFoundError:
            update(status="failed", progress=1.0, reason="the uploaded bytes are missing")
        except Exception as exc:  # never let one file take the worker down
            log.exception("indexing %s failed", name)
            update(status="failed", progress=1.0, reason=f"indexing failed: {exc}")

    def _yield_to_chats(self) -> int:
        """Before an embedding batch: while chats are generating, wait for a pause (at most
        `yield_seconds`) and then embed a small batch, so a running stream loses at most one small
        batch's time per `yield_seconds` (on two cores, llama.cpp's threads stall at every barrier
        while anything else runs; CPU priority alone does not help). Returns the batch size."""
        if self.busy is None or not self.busy():
            return self.embed_batch
        deadline = time.monotonic() + self.yield_seconds
        while time.monotonic() < deadline:
            time.sleep(0.05)
            if not self.busy():
                return self.embed_batch
        return max(1, self.embed_batch // 4)

    # ------------------------------------------------------------------ memory
    def remember_turn(self, session_id: str, turn: int, question: str, answer: str) -> None:
        """Embed a finished turn (in the background) so it can be recalled later."""
        self.remember_turns(session_id, turn, [(turn, question, answer)])

    def remember_turns(self, session_id: str, start: int, turns: list[tuple[int, str, str]]) -> None:
        """The remembered turns from message `start` on replaced by `turns` ((message index,
        question, answer) each), in the background: a regenerated turn replaces the old one; a
        version chosen, a turn deleted or restored brings the chat's own turns back."""
        def work():
            try:
                texts = [f"User: {question}\nAssistant: {answer}" for _, question, answer in turns]
                vectors = self.embedder.embed(texts, background=True) if texts else None

                def commit(sql):
                    if not self.store.exists(session_id):
                        return  # deleted meanwhile
                    passages.delete(sql, session_id, turns_from=start)
                    if texts:
                        passages.insert(sql, session_id, [Chunk(text, "", "", kind="turn", turn=index)
                                                          for text, (index, _, _) in zip(texts, turns, strict=True)],
                                        vectors)
                self.store.transaction(commit)
                self.searcher.forget(session_id)  # (rows replaced may give the same count and last id)
            except Exception:
                log.exception("could not remember the turns of session %s", session_id)
        self._pool.submit(work)

    def retrieve(self, user: str, session_id: str, query: str, *, exclude_turns_from: int | None = None,
                 k: int | None = None) -> list[Passage]:
        self.store.get(user, session_id)  # not found for other users' sessions
        if not passages.count(self.store.sql, session_id):
            return []
        vector = self.embedder.embed([query])[0]
        hits = self.searcher.search(session_id, query, vector, self.retrieval, k=k,
                                    exclude_turns_from=exclude_turns_from)
        return [Passage(h.chunk.text, h.chunk.source(), h.similarity,
                        {"file": h.chunk.file_name or None, "file_id": h.chunk.file_id or None, "page": h.chunk.page,
                         "lines": [h.chunk.first_line, h.chunk.last_line] if h.chunk.first_line is not None else None,
                         "section": h.chunk.context, "kind": h.chunk.kind}) for h in hits]
