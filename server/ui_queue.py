"""Messages a user sends while a reply streams: queued per user and chat, shown above the message
box (each can be taken back to the box to edit, or removed) and sent in order when the reply ends,
as Open WebUI does. Nothing typed is dropped: a message that is refused goes back to the message
box, and a queue left when a reply is stopped or fails stays, shown, until the next Enter sends it.

A chat is "busy" while one event streams its turns; that event sends the queued messages one
after another. Taking the next message and leaving the chat idle happen in one step (under the
lock), so a message queued as the last turn ends is either sent by that event or finds the chat
idle and starts a new one: never both, never neither.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

Key = tuple[str, str | None]  # (user, chat id); None: a chat not created yet


@dataclass(frozen=True)
class Queued:
    text: str
    replace_from: int | None = None  # an edit: the index of the message it replaces


class TurnQueue:
    LIMIT = 20  # queued messages per chat (the 21st is refused with a toast)

    def __init__(self):
        self._lock = threading.Lock()
        self._items: dict[Key, list[Queued]] = {}
        self._busy: set[Key] = set()

    def add(self, key: Key, item: Queued) -> bool:
        with self._lock:
            items = self._items.setdefault(key, [])
            if len(items) >= self.LIMIT:
                return False
            items.append(item)
            return True

    def busy(self, key: Key) -> bool:
        with self._lock:
            return key in self._busy

    def begin(self, key: Key) -> bool:
        """Take the chat for one streaming event (False: another one sends its queue)."""
        with self._lock:
            if key in self._busy:
                return False
            self._busy.add(key)
            return True

    def next(self, key: Key) -> Queued | None:
        """The next message to send, or None, and then the chat is idle (in the same step)."""
        with self._lock:
            items = self._items.get(key)
            if items:
                return items.pop(0)
            self._items.pop(key, None)
            self._busy.discard(key)
            return None

    def release(self, key: Key) -> None:
        """The streaming event ended early (stopped, failed): the chat is idle; what is queued
        stays queued (shown; the next Enter sends it)."""
        with self._lock:
            self._busy.discard(key)

    def move(self, old: Key, new: Key) -> None:
        """The chat was created by its first message: what was queued for it follows it."""
        with self._lock:
            moved = self._items.pop(old, [])
            if moved:
                self._items.setdefault(new, [])[:0] = moved
            if old in self._busy:
                self._busy.discard(old)
                self._busy.add(new)

    def texts(self, key: Key) -> list[str]:
        with self._lock:
            return [item.text for item in self._items.get(key, [])]

    def take(self, key: Key, index: int) -> Queued | None:
        with self._lock:
            items = self._items.get(key, [])
            return items.pop(index) if 0 <= index < len(items) else None
