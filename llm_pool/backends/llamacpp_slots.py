"""Shoal's slot scheduler for a llama-server: which of the server's slots a request goes to.

A slot remembers whose prompt its KV holds (`scope`): a request may reuse it only from the same
cache scope (a user, or an agreed `cache_salt`), so no caller can see, time or infer another's
prompt. llama-server fills each step's batch with prompt tokens slot by slot in id order, so where
the slot is a free choice a long prompt takes the highest id and a short one the lowest.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..stream import GenerationHandle


@dataclass
class Slot:
    id: int
    busy: bool = False
    scope: str | None = None  # whose prompt the slot's KV holds; None: nobody may reuse it
    tokens: list[int] = field(default_factory=list)  # what it holds (prompt + generated)
    used: float = 0.0


@dataclass
class Waiter:
    handle: GenerationHandle
    ids: list[int]
    wanted: int
    submitted: float
    future: asyncio.Future | None = None


def pick_slot(free: list[Slot], waiter: Waiter, batch: int) -> tuple[Slot, bool]:
    """The free slot whose KV this request may reuse the most of; else an empty one; else the
    least recently used (its KV is recomputed: nothing of another scope is reused).

    llama-server fills each step's batch with prompt tokens slot by slot in id order, so where
    the slot is a free choice a long prompt takes the highest id and a short one the lowest:
    a short request's prompt goes into the next step instead of waiting behind a long one.
    (Measured and not kept yet: llama.cpp's attention at each step spans every slot between the
    lowest and highest busy one, so least-recently-used choices spread 16 streams over 32 slots;
    packing them measured 0.84x -> 0.93x of a bare `llama-server -np 16`, but both packing rules
    tried broke other behaviour in the full suite; see issue 25's note.)"""
    scope = waiter.handle.request.cache_scope
    if scope is not None:
        mine = [s for s in free if s.scope == scope]
        if mine:
            best = max(mine, key=lambda s: (common_prefix(s.tokens, waiter.ids), s.used))
            if common_prefix(best.tokens, waiter.ids) > 0:
                return best, True
    long = len(waiter.ids) > batch
    empty = [s for s in free if not s.tokens]
    if empty:
        return (empty[-1] if long else empty[0]), False
    if long:
        return max(free, key=lambda s: s.id), False
    return min(free, key=lambda s: s.used), False


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
