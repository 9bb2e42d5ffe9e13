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


def pick_slot(free: list[Slot], waiter: Waiter, batch: int, busy: list[int] = ()) -> tuple[Slot, bool]:
    """The free slot whose KV this request may reuse the most of, if that is more than one step's
    prompt tokens (`batch`). Else a long prompt takes the highest free slot, and a short one, in
    order: a slot that does not widen the span of busy slot ids (`busy`), one that is empty or the
    caller's own (other callers' prefixes are kept while there is room), the caller's own with the
    longest shared prefix, the least recently used. Nothing of another scope is ever reused.

    The span: with a KV per slot, llama.cpp's attention at each step covers every slot between
    the lowest and the highest one in the batch (`llama_kv_cache::get_k`: streams s0..s1), so 16
    streams spread over 32 slots cost as much as 32 (least recently used slots alone measured
    0.84x of a bare `llama-server -np 16` at 16 clients). llama-server also fills each step's
    batch with prompt tokens slot by slot in id order, so a long prompt on the highest id lets a
    short request's prompt go first.

    (Last session this rule was reverted because a browser test's tools chat answered in plain
    text in CI; the cause was the test filling a field Gradio had not finished rendering, seen
    with the old rule too, and is mended in the test.)"""
    scope = waiter.handle.request.cache_scope

    def shared(slot: Slot) -> int:
        return common_prefix(slot.tokens, waiter.ids) if scope is not None and slot.scope == scope else 0

    mine = max(free, key=lambda s: (shared(s), s.used))
    if shared(mine) > batch:  # a chat's history: worth its slot wherever it is
        return mine, True
    if len(waiter.ids) > batch:
        highest = max(free, key=lambda s: s.id)
        return highest, shared(highest) > 0
    low, high = (min(busy), max(busy)) if busy else (None, None)

    def cost(slot: Slot) -> tuple:
        widen = 0 if low is None else max(0, slot.id - high) + max(0, low - slot.id)
        others = bool(slot.tokens) and not (scope is not None and slot.scope == scope)
        return widen, others, -shared(slot), slot.used, slot.id

    chosen = min(free, key=cost)
    return chosen, shared(chosen) > 0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
