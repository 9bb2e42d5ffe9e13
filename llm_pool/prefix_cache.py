"""KV states of finished sequences, kept so the next prompt that starts the same way skips them.

A chat's next turn repeats the whole conversation so far; its KV was computed last turn. The
cache keeps finished rows (token ids + per-layer keys/values), least recently used first out,
within a byte budget. `lookup` finds the entry sharing the longest common prefix with a new prompt
and returns that many positions of KV (always leaving at least one prompt token to compute, since
the model needs a last position to predict from).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]


class PrefixCache:
    def __init__(self, capacity_bytes: int, bytes_per_token: int, max_entries: int = 256):
        self.capacity = capacity_bytes
        self.bytes_per_token = bytes_per_token
        self.max_entries = max_entries
        self._entries: OrderedDict[int, tuple[torch.Tensor, KV]] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()
        self.bytes = 0

    def store(self, ids: list[int], kv: KV) -> None:
        size = len(ids) * self.bytes_per_token
        if size > self.capacity:
            return
        key_ids = torch.tensor(ids, dtype=torch.long)
        with self._lock:
            # an entry that is a prefix of the new one is now redundant
            for key, (old_ids, _) in list(self._entries.items()):
                if len(old_ids) <= len(key_ids) and torch.equal(old_ids, key_ids[: len(old_ids)]):
                    self._drop(key)
            while self._entries and (self.bytes + size > self.capacity
                                     or len(self._entries) >= self.max_entries):
                self._drop(next(iter(self._entries)))
            self._entries[self._next] = (key_ids, kv)
            self._next += 1
            self.bytes += size

    def _drop(self, key: int) -> None:
        ids, _ = self._entries.pop(key)
        self.bytes -= len(ids) * self.bytes_per_token

    def lookup(self, prompt_ids: list[int], min_tokens: int) -> tuple[int, KV] | None:
        """(length, kv cropped to length) of the best shared prefix, or None if under min_tokens."""
        if not self._entries or len(prompt_ids) <= min_tokens:
            return None
        prompt = torch.tensor(prompt_ids, dtype=torch.long)
        best_key, best_len = None, 0
        with self._lock:
            for key, (ids, _) in self._entries.items():
                n = min(len(ids), len(prompt) - 1)
                same = (ids[:n] == prompt[:n]).long()
                length = int(same.cumprod(0).sum()) if n else 0
                if length > best_len:
                    best_key, best_len = key, length
            if best_key is None or best_len < min_tokens:
                return None
            self._entries.move_to_end(best_key)
            _, kv = self._entries[best_key]
        return best_len, [(k[:, :, :best_len], v[:, :, :best_len]) for k, v in kv]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0
