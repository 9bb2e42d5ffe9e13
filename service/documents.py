"""Files in a session and the session's memory: upload, parse, chunk, embed, retrieve, remove.

`add` stores the bytes under a server-chosen name and answers at once; a small worker pool then
parses the file in a sandboxed process (time and memory bound), chunks it, embeds the chunks and
adds them to the session's index, updating the file's status and progress as it goes (queued,
parsing, indexing, ready, or failed with a reason). Removing a file drops its passages from the
index at once. Finished chat turns are embedded too, so turns that fall out of the model's window
can still be retrieved when relevant. Knows nothing about HTTP or Gradio.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from llm_pool.errors import ConflictError, InvalidParamsError, PayloadTooLargeError
from memory.chunking import Chunk, chunk_document
from memory.context import Passage
from memory.embeddings import Embedder
from memory.index import SessionIndex
from memory.store import SessionStore
from parsing import ParseError, ParseLimits, parse_isolated

log = logging.getLogger("shoal.documents")
PENDING = ("queued", "parsing", "indexing")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]+")


class DocumentsNotReadyError(ConflictError):
    def __init__(self, pending: list[dict]):
        names = ", ".join(f"{r['name']} ({r['status']} {int(r['progress'] * 100)}%)" for r in pending)
        super().__init__(f"Still reading {names}; ask again when it is ready so the answer can use it.",
                         code="documents_not_ready")
        self.retry_after = 5.0


def display_name(name: str) -> str:
    """The name to show: no folders, no control characters, at most 200 characters."""
    base = _UNSAFE.sub("_", (name or "").replace("\\", "/").rsplit("/", 1)[-1]).strip(" .")
    return (base or "upload")[:200]


class DocumentService:
    def __init__(self, store: SessionStore, folder: Path, embedder: Embedder, *, max_bytes: int,
                 limits: ParseLimits = ParseLimits(), workers: int = 2, top_k: int = 4, threshold: float = 0.2):
        self.store = store
        self.folder = folder
        self.embedder = embedder
        self.max_bytes = max_bytes
        self.limits = limits
        self.top_k = top_k
        self.threshold = threshold
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="documents")
        self._indexes: OrderedDict[str, SessionIndex] = OrderedDict()
        self._lock = threading.Lock()
        for user, session_id, record in store.unfinished_files():  # a restart interrupted these
            self._pool.submit(self._process, user, session_id, record["id"], record["name"])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _index(self, session_id: str) -> SessionIndex:
        with self._lock:
            index = self._indexes.get(session_id)
            if index is None:
                index = self._indexes[session_id] = SessionIndex(self.folder / "index" / session_id)
                while len(self._indexes) > 64:
                    self._indexes.popitem(last=False)
            self._indexes.move_to_end(session_id)
            return index

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
        record = {"id": uuid.uuid4().hex, "name": display_name(name), "size": len(data), "status": "queued",
                  "progress": 0.0, "reason": None, "created": time.time(), "chunks": 0, "kind": None,
                  "language": None, "pages": None}
        path = self._raw_path(session_id, record["id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.store.add_file(user, session_id, record)
        self._pool.submit(self._process, user, session_id, record["id"], record["name"])
        return record

    def list(self, user: str, session_id: str) -> list[dict[str, Any]]:
        return self.store.files(user, session_id)

    def get(self, user: str, session_id: str, file_id: str) -> dict[str, Any]:
        return self.store.file(user, session_id, file_id)

    def remove(self, user: str, session_id: str, file_id: str) -> dict[str, Any]:
        record = self.store.remove_file(user, session_id, file_id)
        self._index(session_id).remove(file_id=file_id)
        self._raw_path(session_id, file_id).unlink(missing_ok=True)
        return record

    def delete_session(self, session_id: str) -> None:
        self._index(session_id).destroy()
        with self._lock:
            self._indexes.pop(session_id, None)
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
            document = parse_isolated(name, data, self.limits)
            chunks = chunk_document(document, file_id, name)
            if not chunks:
                raise ParseError("no text to index in this file")
            if update(status="indexing", progress=0.3, kind=document.kind, language=document.language,
                      pages=document.pages) is None:
                return
            vectors = []
            for start in range(0, len(chunks), 64):
                vectors.append(self.embedder.embed([c.text for c in chunks[start:start + 64]]))
                if update(progress=0.3 + 0.65 * min(1.0, (start + 64) / len(chunks))) is None:
                    return
            import numpy as np
            index = self._index(session_id)
            if self.store.update_file(session_id, file_id) is None:
                return  # removed while we embedded: keep nothing
            index.add(chunks, np.vstack(vectors))
            if update(status="ready", progress=1.0, chunks=len(chunks)) is None:
                index.remove(file_id=file_id)  # removed in the last moment
        except ParseError as exc:
            update(status="failed", progress=1.0, reason=exc.reason)
        except FileNotFoundError:
            update(status="failed", progress=1.0, reason="the uploaded bytes are missing")
        except Exception as exc:  # never let one file take the worker down
            log.exception("indexing %s failed", name)
            update(status="failed", progress=1.0, reason=f"indexing failed: {exc}")

    # ------------------------------------------------------------------ memory
    def remember_turn(self, session_id: str, turn: int, question: str, answer: str) -> None:
        """Embed a finished turn (in the background) so it can be recalled later."""
        def work():
            try:
                text = f"User: {question}\nAssistant: {answer}"
                index = self._index(session_id)
                index.remove(turns_from=turn)  # a regenerated turn replaces the old one
                index.add([Chunk(text, "", "", kind="turn", turn=turn)], self.embedder.embed([text]))
            except Exception:
                log.exception("could not remember a turn of session %s", session_id)
        self._pool.submit(work)

    def retrieve(self, user: str, session_id: str, query: str, *, exclude_turns_from: int | None = None,
                 k: int | None = None) -> list[Passage]:
        self.store.get(user, session_id)
        index = self._index(session_id)
        if not index.chunks:
            return []
        vector = self.embedder.embed([query])[0]
        hits = index.search(vector, k or self.top_k, self.threshold, exclude_turns_from)
        return [Passage(c.text, c.source(), score,
                        {"file": c.file_name or None, "file_id": c.file_id or None, "page": c.page,
                         "lines": [c.first_line, c.last_line] if c.first_line is not None else None,
                         "kind": c.kind}) for c, score in hits]
