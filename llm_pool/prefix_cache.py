"""KV states of finished sequences, kept so the next prompt that starts the same way skips them.

A chat's next turn repeats the whole conversation so far; its KV was computed last turn. The
cache keeps finished rows (token ids + per-layer keys/values), least recently used first out,
within a byte budget. `lookup` finds the entry sharing the longest common prefix with a new prompt
and returns that many positions of KV (always leaving at least one prompt token to compute, since
the model needs a last position to predict from).

Entries belong to a scope (a user, or an explicit `cache_salt` group): a lookup only sees entries
of its own scope, so one user's cached prefix never shortens another user's prefill, and neither
`cached_tokens` nor time to first token tells anyone what someone else sent. A request without a
scope neither stores nor reuses anything.

With a disk tier (`kv_disk.ModelKv`, set by the backend), a finished turn of a chat (a request
with a `cache_key`) is also written to disk, and a lookup that finds a longer prefix of that chat
and scope on disk than in memory reads it from there (after a restart, an unload or an eviction).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import torch

from .kv import KV


class PrefixCache:
    def __init__(self, capacity_bytes: int, bytes_per_token: int, max_entries: int = 256):
        self.capacity = capacity_bytes
        self.bytes_per_token = bytes_per_token
        self.max_entries = max_entries
        self._entries: OrderedDict[int, tuple[str, torch.Tensor, KV]] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()
        self.bytes = 0
        self.disk = None  # kv_disk.ModelKv: chats' prefixes on disk too

    @property
    def keeps(self) -> bool:
        """Whether finished sequences are kept anywhere (memory or disk)."""
        return bool(self.capacity) or self.disk is not None

    def store(self, scope: str | None, ids: list[int], kv: KV, chat: str | None = None) -> None:
        """Keep a finished sequence's KV (the engine hands over a copy)."""
        if self.disk is not None and self.disk.wants(scope, chat, len(ids)):
            self.disk.save_tensors(scope, chat, ids, kv)
        size = len(ids) * self.bytes_per_token
        if scope is None or size > self.capacity:
            return
        key_ids = torch.tensor(ids, dtype=torch.long)
        with self._lock:
            # an entry that is a prefix of the new one is now redundant
            for key, (old_scope, old_ids, _) in list(self._entries.items()):
                if old_scope == scope and len(old_ids) <= len(key_ids) \
                        and torch.equal(old_ids, key_ids[: len(old_ids)]):
                    self._drop(key)
            while self._entries and (self.bytes + size > self.capacity
                                     or len(self._entries) >= self.max_entries):
                self._drop(next(iter(self._entries)))
            self._entries[self._next] = (scope, key_ids, kv)
            self._next += 1
            self.bytes += size

    def _drop(self, key: int) -> None:
        _, ids, _ = self._entries.pop(key)
        self.bytes -= len(ids) * self.bytes_per_token

    def lookup(self, scope: str | None, prompt_ids: list[int], min_tokens: int, chat: str | None = None,
               device=None) -> tuple[int, KV, int] | None:
        """(length, kv cropped to length, how many of them came from disk) of the best prefix
        shared with an entry of the same scope (or, on disk, of the same chat and scope), or None
        if under min_tokens."""
        hit = self._lookup_memory(scope, prompt_ids, min_tokens)
        if self.disk is None:
            return hit
        found = self.disk.find(scope, chat, prompt_ids)
        if found is None or found[1] < min_tokens or (hit is not None and found[1] <= hit[0] + min_tokens):
            if found is None and hit is None and chat is not None and scope is not None:
                self.disk.disk.miss()
            return hit
        entry, length = found
        started = time.monotonic()
        kv = self.disk.load_tensors(entry, length, device or "cpu")
        if kv is None:
            return hit
        self.disk.disk.used(entry, length, time.monotonic() - started)
        return length, kv, length

    def _lookup_memory(self, scope: str | None, prompt_ids: list[int], min_tokens: int) -> tuple[int, KV, int] | None:
        if scope is None or not self._entries or len(prompt_ids) <= min_tokens:
            return None
        prompt = torch.tensor(prompt_ids, dtype=torch.long)
        best_key, best_len = None, 0
        with self._lock:
            for key, (entry_scope, ids, _) in self._entries.items():
                if entry_scope != scope:
                    continue
                n = min(len(ids), len(prompt) - 1)
                same = (ids[:n] == prompt[:n]).long()
                length = int(same.cumprod(0).sum()) if n else 0
                if length > best_len:
                    best_key, best_len = key, length
            if best_key is None or best_len < min_tokens:
                return None
            self._entries.move_to_end(best_key)
            _, _, kv = self._entries[best_key]
        return best_len, [(k[:, :, :best_len], v[:, :, :best_len]) for k, v in kv], 0

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0
