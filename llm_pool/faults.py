"""A switch for fault-injection tests: make a named step raise, a given number of times.

Production code calls `faults.check("engine.step")` at a few points (an engine step, a callback,
a load half-way, a store write); it costs one dict lookup while nothing is armed. Tests arm a point
with `faults.arm("engine.step", times=1)` and prove that every request still ends, slots and
in-flight counts return to zero, and the next request works.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class InjectedFault(RuntimeError):
    """Raised by an armed fault point."""


_lock = threading.Lock()
_armed: dict[str, tuple[int, Callable[[], bool] | None]] = {}


def arm(point: str, times: int = 1, where: Callable[[], bool] | None = None) -> None:
    """`where`: only calls for which it answers true count (e.g. not a background thread's
    write that happens to run during the test)."""
    with _lock:
        _armed[point] = (times, where)


def disarm_all() -> None:
    with _lock:
        _armed.clear()


def check(point: str) -> None:
    if not _armed:
        return
    with _lock:
        left, where = _armed.get(point, (0, None))
        if left <= 0 or (where is not None and not where()):
            return
        _armed[point] = (left - 1, where)
    raise InjectedFault(f"injected fault at {point}")
