"""Incremental detokenization with stop sequences.

`TextAssembler` turns tokens, one at a time, into text that is safe to show: it never emits half a
UTF-8 character, and it holds back text that might be the beginning of a stop sequence until it
knows. When a stop sequence appears, the text is cut just before it. It knows a tokenizer's
`decode` and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]


class TextAssembler:
    def __init__(self, decode: Decode, stop: Sequence[str] = ()):
        self._decode = decode
        self._stop = tuple(stop)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # all text decoded so far (cut at a stop sequence once stopped)
        self._emitted = 0  # characters of `text` handed out
        self.stopped = False
        self.matched: str | None = None  # the stop sequence that stopped it

    def add(self, token_id: int) -> str:
        """Feed one token; return the new text that may be shown now (possibly empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        self.text += full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._release()

    def _release(self) -> str:
        if self._stop:
            start = max(0, self._emitted - self._longest_stop)
            hits = [(i, s) for s in self._stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                at, self.matched = min(hits, key=lambda hit: hit[0])
                self.text = self.text[:at]
                self.stopped = True
                return self.flush()
        safe = len(self.text) - self._held_back()
        out = self.text[self._emitted:safe]
        self._emitted = max(self._emitted, safe)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that starts some stop sequence."""
        tail = self.text[-self._longest_stop:] if self._longest_stop else ""
        for size in range(len(tail), 0, -1):
            if any(s.startswith(tail[-size:]) for s in self._stop):
                return size
        return 0

    def flush(self) -> str:
        """Everything not yet emitted (at the end of generation)."""
        out = self.text[self._emitted:]
        self._emitted = len(self.text)
        return out
