"""Each chat's KV cache kept on disk, so that reopening a long chat costs no prefill.

When a chat turn ends, the engine writes the KV of the whole conversation so far (the prompt and
the answer) to a file: llama.cpp through its server's slot save (`--slot-save-path`, a folder of
its own here), transformers as safetensors (tensors only, never pickle). When a later turn of
that chat arrives and the in-memory cache does not hold its prefix (the model was unloaded,
evicted, swapped back, or Shoal restarted), the longest saved prefix of *that chat and that
owner* is read back before the prompt, and only the new tokens are computed.

An entry is keyed by the model version's fingerprint (its key, its weights file and the engine's
KV format: a new version or new weights never read an old file), the owner's cache scope, the chat
(a session id) and the exact token ids it holds (kept in the index, matched token by token, with
a hash for the record). Nothing is ever restored across scopes or chats, so neither `usage` nor
timing tells one user what another sent. Each file's SHA-256 is checked before it is used: a
truncated or altered file is deleted and the prompt is read as usual.

The index is a SQLite file beside the files (so it survives a restart); the files are kept
within a byte budget, least recently used chat first out. Writes run on a thread of their own,
after the reply has ended. No torch here: the llama.cpp engine uses this without it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
import uuid
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("shoal.kv_disk")


@dataclass
class Entry:
    id: int
    fingerprint: str
    model: str
    scope: str
    chat: str
    file: str  # its name inside the model's folder
    tokens: tuple[int, ...]  # the token ids whose KV the file holds, in order
    digest: str  # SHA-256 of the file
    size: int
    used: float


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def _token_bytes(tokens) -> bytes:
    return array("i", tokens).tobytes()


def _tokens_of(blob: bytes) -> tuple[int, ...]:
    values = array("i")
    values.frombytes(blob)
    return tuple(values)


class KvDisk:
    """The store: one folder per model fingerprint, an index, a budget. Thread-safe."""

    def __init__(self, root: Path, budget_bytes: int, min_tokens: int = 256):
        self.root = Path(root)
        self.budget = budget_bytes
        self.min_tokens = min_tokens  # shorter chats are read again faster than a file is managed
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.root / "index.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS entries (id INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL, "
                         "model TEXT NOT NULL, scope TEXT NOT NULL, chat TEXT NOT NULL, file TEXT NOT NULL, "
                         "tokens BLOB NOT NULL, prefix_hash TEXT NOT NULL, digest TEXT NOT NULL, "
                         "size INTEGER NOT NULL, used REAL NOT NULL)")
        self._entries: dict[int, Entry] = {}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-disk-write")
        self._pending = 0
        self._pending_done = threading.Condition()
        self.counts = {"restores": 0, "restored_tokens": 0, "restore_seconds": 0.0, "misses": 0,
                       "writes": 0, "written_bytes": 0, "write_seconds": 0.0, "evictions": 0, "rejected": 0}
        self._load()

    # ------------------------------------------------------------------ the index
    def _load(self) -> None:
        with self._lock:
            for row in self._db.execute("SELECT id, fingerprint, model, scope, chat, file, tokens, digest, size, used "
                                        "FROM entries"):
                entry = Entry(row[0], row[1], row[2], row[3], row[4], row[5], _tokens_of(row[6]), row[7], row[8],
                              row[9])
                if self.path(entry).is_file():
                    self._entries[entry.id] = entry
                else:
                    self._db.execute("DELETE FROM entries WHERE id = ?", (entry.id,))
            known = {(e.fingerprint, e.file) for e in self._entries.values()}
            for folder in self.root.iterdir():  # files a crash left without an index row
                if folder.is_dir():
                    for file in folder.iterdir():
                        if (folder.name, file.name) not in known:
                            file.unlink(missing_ok=True)

    def path(self, entry: Entry) -> Path:
        return self.root / entry.fingerprint / entry.file

    @property
    def bytes(self) -> int:
        return sum(e.size for e in self._entries.values())

    def for_model(self, key: str, identity: str) -> ModelKv:
        """The view for one loaded model version. Files of the same key with another identity
        (other weights, another engine or KV format) can never be read again: deleted now."""
        fingerprint = hashlib.sha256(f"{key}\0{identity}".encode()).hexdigest()[:20]
        with self._lock:
            for entry in [e for e in self._entries.values() if e.model == key and e.fingerprint != fingerprint]:
                self._drop(entry)
        folder = self.root / fingerprint
        folder.mkdir(exist_ok=True)
        return ModelKv(self, key, fingerprint, folder)

    def find(self, fingerprint: str, scope: str, chat: str, ids: list[int]) -> tuple[Entry, int] | None:
        """The entry of this chat and owner sharing the longest prefix with `ids` (at most all
        but the last id: the model needs a position to predict from), and that length."""
        best, best_len = None, 0
        with self._lock:
            for entry in self._entries.values():
                if entry.fingerprint == fingerprint and entry.scope == scope and entry.chat == chat:
                    length = min(common_prefix(entry.tokens, ids), len(ids) - 1)
                    if length > best_len:
                        best, best_len = entry, length
        return (best, best_len) if best is not None else None

    def add(self, model: str, fingerprint: str, scope: str, chat: str, tokens: list[int], file: str) -> Entry | None:
        """Record a file just written (its digest taken now); older entries of the chat that are
        prefixes of it go, then the least recently used chats until the budget holds."""
        path = self.root / fingerprint / file
        try:
            size, digest = path.stat().st_size, file_digest(path)
        except OSError:
            return None
        tokens = tuple(tokens)
        with self._lock:
            now = time.time()
            cursor = self._db.execute(
                "INSERT INTO entries (fingerprint, model, scope, chat, file, tokens, prefix_hash, digest, size, used) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (fingerprint, model, scope, chat, file, _token_bytes(tokens),
                 hashlib.sha256(_token_bytes(tokens)).hexdigest(), digest, size, now))
            entry = Entry(cursor.lastrowid, fingerprint, model, scope, chat, file, tokens, digest, size, now)
            for old in list(self._entries.values()):
                if (old.fingerprint, old.scope, old.chat) == (fingerprint, scope, chat) \
                        and old.tokens == tokens[:len(old.tokens)]:
                    self._drop(old)
            self._entries[entry.id] = entry
            self.counts["writes"] += 1
            self.counts["written_bytes"] += size
            while self.bytes > self.budget and self._entries:
                self._drop(min(self._entries.values(), key=lambda e: e.used))
                self.counts["evictions"] += 1
            return self._entries.get(entry.id)

    def check(self, entry: Entry) -> bool:
        """Whether the file is still the one recorded (else it is deleted with its entry)."""
        try:
            good = file_digest(self.path(entry)) == entry.digest
        except OSError:
            good = False
        if not good:
            log.warning("kv cache file %s failed its checksum: ignored and deleted", entry.file)
            with self._lock:
                self.counts["rejected"] += 1
                self._drop(entry)
        return good

    def used(self, entry: Entry, restored: int, seconds: float) -> None:
        with self._lock:
            entry.used = time.time()
            self._db.execute("UPDATE entries SET used = ? WHERE id = ?", (entry.used, entry.id))
            self.counts["restores"] += 1
            self.counts["restored_tokens"] += restored
            self.counts["restore_seconds"] += seconds

    def miss(self) -> None:
        with self._lock:
            self.counts["misses"] += 1

    def forget(self, *, chat: str | None = None, scope: str | None = None) -> int:
        """Delete the files of a chat, or of everything an owner's scope holds."""
        with self._lock:
            gone = [e for e in self._entries.values()
                    if (chat is not None and e.chat == chat) or (scope is not None and e.scope == scope)]
            for entry in gone:
                self._drop(entry)
        return len(gone)

    def _drop(self, entry: Entry) -> None:
        self._entries.pop(entry.id, None)
        self._db.execute("DELETE FROM entries WHERE id = ?", (entry.id,))
        self.path(entry).unlink(missing_ok=True)

    def expect(self) -> None:
        """A write is on its way (an engine saving a slot): `flush` waits for it too."""
        with self._pending_done:
            self._pending += 1

    def settle(self) -> None:
        with self._pending_done:
            self._pending -= 1
            self._pending_done.notify_all()

    def write_later(self, fn, *args) -> None:
        """Run a write off the engine's path (in order, one at a time)."""
        self.expect()

        def run():
            try:
                fn(*args)
            except Exception:  # a failed write only means the next reopen reads the prompt
                log.exception("writing a KV cache file failed")
            finally:
                self.settle()
        self._writer.submit(run)

    def flush(self, timeout: float = 30) -> None:
        """Wait for the writes on their way (a turn's file is written after its reply ends)."""
        with self._pending_done:
            self._pending_done.wait_for(lambda: self._pending == 0, timeout)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counts, "files": len(self._entries), "bytes": self.bytes, "budget_bytes": self.budget}

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        with self._lock:
            self._db.close()


@dataclass
class ModelKv:
    """One model version's part of the store: its folder and its entries."""
    disk: KvDisk
    model: str
    fingerprint: str
    folder: Path

    @property
    def min_tokens(self) -> int:
        return self.disk.min_tokens

    def new_file(self, suffix: str) -> str:
        return f"{uuid.uuid4().hex}{suffix}"

    def find(self, scope: str | None, chat: str | None, ids: list[int]) -> tuple[Entry, int] | None:
        if scope is None or chat is None or len(ids) <= self.min_tokens:
            return None
        return self.disk.find(self.fingerprint, scope, chat, ids)

    def wants(self, scope: str | None, chat: str | None, length: int) -> bool:
        """Whether a finished turn of this length should be written."""
        return scope is not None and chat is not None and length >= self.min_tokens and self.disk.budget > 0

    def add(self, scope: str, chat: str, tokens: list[int], file: str) -> Entry | None:
        return self.disk.add(self.model, self.fingerprint, scope, chat, tokens, file)

    def path(self, entry: Entry) -> Path:
        return self.disk.path(entry)

    # ---------------------------------------------------------------- transformers' tensors
    def save_tensors(self, scope: str, chat: str, tokens: list[int], kv) -> None:
        """Queue a write of a prefix's KV (per layer keys and values [1, heads, length, dim]) as
        safetensors; the tensors must not change afterwards (the engine hands over copies)."""
        self.disk.write_later(self._write_tensors, scope, chat, list(tokens), kv)

    def _write_tensors(self, scope: str, chat: str, tokens: list[int], kv) -> None:
        from safetensors.torch import save_file
        started = time.monotonic()
        name = self.new_file(".safetensors")
        partial = self.folder / f".{name}.partial"
        tensors = {}
        for layer, (keys, values) in enumerate(kv):
            # copies: safetensors refuses tensors that share storage (the engine's are views of one)
            tensors[f"k{layer}"] = keys.detach().to("cpu", copy=True).contiguous()
            tensors[f"v{layer}"] = values.detach().to("cpu", copy=True).contiguous()
        save_file(tensors, str(partial), metadata={"tokens": str(len(tokens))})
        partial.rename(self.folder / name)
        self.add(scope, chat, tokens, name)
        with self.disk._lock:
            self.disk.counts["write_seconds"] += time.monotonic() - started

    def load_tensors(self, entry: Entry, length: int, device) -> list | None:
        """The first `length` positions of an entry's KV, or None when its file is not the one
        recorded (deleted) or cannot be read."""
        if not self.disk.check(entry):
            return None
        from safetensors.torch import load_file
        try:
            tensors = load_file(str(self.path(entry)), device=str(device))
        except Exception:
            log.warning("kv cache file %s cannot be read: ignored", entry.file)
            return None
        layers = len(tensors) // 2
        return [(tensors[f"k{i}"][:, :, :length], tensors[f"v{i}"][:, :, :length]) for i in range(layers)]


__all__ = ["Entry", "KvDisk", "ModelKv", "common_prefix"]
