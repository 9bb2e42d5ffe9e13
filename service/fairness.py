"""Fair sharing of each model between callers: no caller holds more than its share while others wait.

A caller is a valid key's owner, a signed browser id, else the client's address (`fair_key`). Each
model's batch slots are a lane of a `FairGate`. A request takes a slot at once when one is free and
its caller is under its share; otherwise it waits in its caller's own queue. When a slot frees, the
waiting caller with the fewest requests running goes next (ties: in turn, round robin), so a caller
with a long backlog delays a newcomer by at most one request, never by the whole backlog.

Per caller (`Share`): at most `running` requests in the model at once, and never more than 3/4 of
the slots (a running stream cannot be preempted, so others must always find a slot free); at most
`queued` waiting (more: 429 naming the setting). All callers together wait at most `queue_size`
per lane (more: 503, `QueueFullError`), each at most its queue timeout. Each of `n` choices and
each batch item is one request. An uncapped share (the trusted local owner) may use every slot.

A generation that must wait gets its handle at once, as a backend's own queue gives it: cancelling
the handle leaves the queue, the queue timeout ends it with `QueueTimeoutError`, and once admitted
the backend's events flow through it. Every admitted request gives its slot back exactly once:
when its backend handle ends, or when its start failed. Other work (embeddings) waits for its turn
with `acquire` and gives it back with `release`. `RoundRobin`, the per-caller queues, also orders
the indexing of uploaded files. Knows nothing about HTTP or Gradio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from llm_pool.errors import GenerationError, QueueFullError, QueueTimeoutError, RateLimitedError, ShoalError
from llm_pool.stream import Finished, GenerationHandle, GenerationRequest, Usage

from .identity import Caller

T = TypeVar("T")
log = logging.getLogger("shoal.fairness")
QUEUED, GRANTED, GONE = "queued", "granted", "gone"


def fair_key(caller: Caller) -> str:
    """Whom a request counts for: a key's owner or a signed browser id, else the client's address."""
    if caller.how in ("key", "browser") and caller.user:
        return caller.user
    return caller.rate_key


class CallerQueueFullError(RateLimitedError):
    """One caller has as many requests waiting as it may (429): others' requests still get in."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message, retry_after)
        self.code = "caller_queue_full"


@dataclass(frozen=True)
class Share:
    """What one caller may hold in one lane: `running` at once (0: no cap but the slots) and
    `queued` waiting (0: no cap but the lane's queue). `flag` names the queued cap's setting."""

    running: int = 0
    queued: int = 0
    flag: str = "--max-queued-per-caller"


class RoundRobin(Generic[T]):
    """Per-key FIFO queues served in turn. Not thread-safe: its owner holds a lock."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[T]] = {}  # the dict's order is the order of turns
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def count(self, key: str) -> int:
        queue = self._queues.get(key)
        return len(queue) if queue else 0

    def push(self, key: str, item: T) -> None:
        self._queues.setdefault(key, deque()).append(item)
        self._size += 1

    def remove(self, key: str, item: T) -> bool:
        queue = self._queues.get(key)
        if not queue or item not in queue:
            return False
        queue.remove(item)
        self._size -= 1
        if not queue:
            del self._queues[key]
        return True

    def pop(self, eligible: Callable[[str], bool] = lambda _key: True,
            rank: Callable[[str], int] = lambda _key: 0) -> tuple[str, T] | None:
        """The next item of the eligible key with the lowest rank (ties: whose turn it is); that key
        then goes to the back of the turns. None when no eligible key has items."""
        best, best_rank = None, 0
        for key in self._queues:
            if eligible(key):
                value = rank(key)
                if best is None or value < best_rank:
                    best, best_rank = key, value
        if best is None:
            return None
        queue = self._queues.pop(best)
        item = queue.popleft()
        self._size -= 1
        if queue:
            self._queues[best] = queue
        return best, item


@dataclass(eq=False)
class _Ticket:
    lane: str
    caller: str
    loop: asyncio.AbstractEventLoop
    state: str = QUEUED
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self) -> None:
        """From any thread: the waiting coroutine looks at its state again."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(self.changed.set)


@dataclass
class _Lane:
    running: Counter[str] = field(default_factory=Counter)
    total: int = 0
    caps: dict[str, int] = field(default_factory=dict)  # running cap of each caller with requests waiting
    queue: RoundRobin[_Ticket] = field(default_factory=RoundRobin)


class FairGate:
    """The slots of each lane (a model), shared between callers."""

    def __init__(self, slots: int, queue_size: int, queue_timeout: float, *, what: str = "model"):
        self.slots = max(1, slots)
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.what = what
        self._lock = threading.Lock()
        self._lanes: dict[str, _Lane] = {}
        self._tasks: set[asyncio.Task] = set()

    def cap(self, share: Share) -> int:
        """The running cap a share gets here (0: none): at most 3/4 of the slots, at least one."""
        if not share.running:
            return 0
        return min(share.running, max(1, self.slots * 3 // 4))

    # ------------------------------------------------------------------ figures
    def waiting(self, lane: str) -> int:
        with self._lock:
            found = self._lanes.get(lane)
            return len(found.queue) if found else 0

    def busy(self) -> int:
        """Requests running or waiting in every lane."""
        with self._lock:
            return sum(lane.total + len(lane.queue) for lane in self._lanes.values())

    # ------------------------------------------------------------------ generations
    async def admit(self, lane: str, caller: str, share: Share,
                    start: Callable[[], Awaitable[GenerationHandle]],
                    request: GenerationRequest) -> GenerationHandle:
        """`start()` now if there is room, else a handle that starts it when its turn comes."""
        ticket = self._enter(lane, caller, share)
        if ticket.state == GRANTED:
            return await self._start(ticket, start)
        handle = _QueuedHandle(request, lane, ticket.wake)
        task = asyncio.ensure_future(self._serve(ticket, handle, start,
                                                 request.queue_timeout or self.queue_timeout))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return handle

    async def _start(self, ticket: _Ticket, start: Callable[[], Awaitable[GenerationHandle]]) -> GenerationHandle:
        task = asyncio.ensure_future(start())
        try:
            handle = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda done: self._abandon(ticket, done))
            raise
        except BaseException:
            self.release(ticket)
            raise
        handle.on_done(lambda _handle: self.release(ticket))
        return handle

    def _abandon(self, ticket: _Ticket, task: asyncio.Future) -> None:
        """The caller left while its request was starting: stop it; its slot frees when it ends."""
        if task.cancelled() or task.exception() is not None:
            self.release(ticket)
            return
        handle = task.result()
        handle.cancel()
        handle.on_done(lambda _handle: self.release(ticket))

    async def _serve(self, ticket: _Ticket, outer: _QueuedHandle,
                     start: Callable[[], Awaitable[GenerationHandle]], timeout: float) -> None:
        outcome = await self._wait(ticket, timeout, lambda: outer.cancelled)
        if outcome == "timeout":
            outer.fail(QueueTimeoutError(ticket.lane, time.monotonic() - outer.created))
            return
        if outcome != GRANTED or outer.cancelled:
            self.release(ticket)  # nothing when it never got a slot
            waited = time.monotonic() - outer.created
            outer.push(Finished("cancelled", Usage(0, 0), "", outer.model, duration=waited, queued=waited))
            return
        try:
            inner = await start()
        except BaseException as exc:
            self.release(ticket)
            if isinstance(exc, ShoalError):
                outer.fail(exc)
            elif isinstance(exc, Exception):
                log.exception("request %s could not start", outer.id)
                outer.fail(GenerationError("the request could not start; see the server log"))
            else:
                raise
            return
        inner.on_done(lambda _handle: self.release(ticket))
        outer.follow(inner)
        waited = inner.created - outer.created
        try:
            async for event in inner:
                outer.push(_later(event, waited))
        except asyncio.CancelledError:
            inner.cancel()
            raise

    # ------------------------------------------------------------------ other work
    async def acquire(self, lane: str, caller: str, share: Share, timeout: float | None = None) -> _Ticket:
        """Wait for a turn in `lane` (QueueTimeoutError after the queue timeout); `release` it after."""
        ticket = self._enter(lane, caller, share)
        if ticket.state == GRANTED:
            return ticket
        started = time.monotonic()
        if await self._wait(ticket, timeout or self.queue_timeout) != GRANTED:
            raise QueueTimeoutError(lane, time.monotonic() - started)
        return ticket

    def release(self, ticket: _Ticket) -> None:
        """Give a granted slot back and let the next caller in; a second call does nothing."""
        with self._lock:
            if ticket.state != GRANTED:
                return
            ticket.state = GONE
            lane = self._lanes[ticket.lane]
            lane.running[ticket.caller] -= 1
            if lane.running[ticket.caller] <= 0:
                del lane.running[ticket.caller]
            lane.total -= 1
            self._dispatch(lane)

    # ------------------------------------------------------------------ the queue
    def _enter(self, lane_key: str, caller: str, share: Share) -> _Ticket:
        ticket = _Ticket(lane_key, caller, asyncio.get_running_loop())
        with self._lock:
            lane = self._lanes.setdefault(lane_key, _Lane())
            lane.caps[caller] = self.cap(share)
            lane.queue.push(caller, ticket)
            self._dispatch(lane)
            if ticket.state == QUEUED:
                self._check_room(lane, ticket, share)
        return ticket

    def _check_room(self, lane: _Lane, ticket: _Ticket, share: Share) -> None:
        """A request that must wait: refused if its caller's queue, or the lane's, is full."""
        mine = lane.queue.count(ticket.caller) - 1
        others = len(lane.queue) - 1
        if share.queued and mine >= share.queued:
            self._leave(lane, ticket)
            running = lane.running[ticket.caller]
            raise CallerQueueFullError(
                f"You have {mine} requests waiting for {self.what} '{ticket.lane}' and {running} running; "
                f"the limit is {share.queued} waiting per caller ({share.flag}), so that other callers get "
                "their turn. Retry when one of yours has finished.")
        if others >= self.queue_size:
            self._leave(lane, ticket)
            raise QueueFullError(ticket.lane, others, 1.0)

    def _dispatch(self, lane: _Lane) -> None:
        """Fill free slots: the waiting caller with the fewest running first (under the lock)."""
        def eligible(caller: str) -> bool:
            cap = lane.caps.get(caller, 0)
            return not cap or lane.running[caller] < cap

        while lane.total < self.slots:
            picked = lane.queue.pop(eligible, rank=lambda caller: lane.running[caller])
            if picked is None:
                return
            caller, ticket = picked
            lane.running[caller] += 1
            lane.total += 1
            ticket.state = GRANTED
            if not lane.queue.count(caller):
                lane.caps.pop(caller, None)
            ticket.wake()

    def _leave(self, lane: _Lane, ticket: _Ticket) -> None:
        """Out of the queue without a slot (under the lock)."""
        lane.queue.remove(ticket.caller, ticket)
        ticket.state = GONE
        if not lane.queue.count(ticket.caller):
            lane.caps.pop(ticket.caller, None)

    async def _wait(self, ticket: _Ticket, timeout: float, cancelled: Callable[[], bool] = lambda: False) -> str:
        """Until the ticket is granted ("granted"), its caller gives up ("cancelled") or its time
        runs out ("timeout"); a cancelled coroutine leaves the queue (or frees its new slot)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                ticket.changed.clear()
                with self._lock:
                    if ticket.state == GRANTED:
                        return GRANTED
                    left = deadline - time.monotonic()
                    if cancelled() or left <= 0:
                        self._leave(self._lanes[ticket.lane], ticket)
                        return "cancelled" if cancelled() else "timeout"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ticket.changed.wait(), left)
        except asyncio.CancelledError:
            with self._lock:
                if ticket.state == QUEUED:
                    self._leave(self._lanes[ticket.lane], ticket)
            self.release(ticket)
            raise


class _QueuedHandle(GenerationHandle):
    """The handle of a request waiting for its turn; once admitted, it carries the backend's events."""

    def __init__(self, request: GenerationRequest, model: str, wake: Callable[[], None]):
        super().__init__(request, model=model)
        self._wake = wake
        self._inner: GenerationHandle | None = None

    def follow(self, inner: GenerationHandle) -> None:
        self._inner = inner
        if self.cancelled:
            inner.cancel()

    def cancel(self) -> None:
        super().cancel()
        inner = self._inner
        if inner is not None:
            inner.cancel()
        else:
            self._wake()  # out of the queue now, not at its turn


def _later(event, waited: float):
    """The backend's figures, counting the time the request waited for its turn before it."""
    if not isinstance(event, Finished) or waited <= 0:
        return event
    return replace(event, ttft=None if event.ttft is None else event.ttft + waited,
                   duration=event.duration + waited, queued=event.queued + waited)
