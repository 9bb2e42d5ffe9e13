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
    """The free slot whose KV this request may reuse the most of, if that is more than one step's
    prompt tokens (`batch`); else the lowest free slot, empty or the caller's own where one is
    free (reused only within the same scope: nothing of another scope is reused); a long prompt
    the highest.

    Low ids first: with a KV per slot, llama.cpp's attention at each step spans every slot
    between the lowest and the highest one in the batch (`llama_kv_cache::get_k`: streams s0..s1),
    so 16 streams spread over 32 slots cost as much as 32. Taking the least recently used slot
    instead (to keep other users' prefixes longer) measured 0.84x of a bare `llama-server -np 16`
    at 16 clients. llama-server also fills each step's batch with prompt tokens slot by slot in
    id order, so a long prompt on the highest id lets a short request's prompt go first."""
    scope = waiter.handle.request.cache_scope
    if len(waiter.ids) > batch:
        return max(free, key=lambda s: s.id), False
    mine = [s for s in free if s.scope == scope] if scope is not None else []
    if mine:
        best = max(mine, key=lambda s: (common_prefix(s.tokens, waiter.ids), s.used))
        if common_prefix(best.tokens, waiter.ids) > batch:  # a chat's history: worth its slot's id
            return best, True
    # the lowest slot that is empty or this caller's own (other callers' prefixes are kept while
    # there is room), else the lowest; a short reusable prefix is reused there
    chosen = min([s for s in free if not s.tokens] + mine or free, key=lambda s: s.id)
    return chosen, scope is not None and chosen.scope == scope and common_prefix(chosen.tokens, waiter.ids) > 0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
