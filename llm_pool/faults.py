"""A switch for fault-injection tests: make a named step raise, a given number of times.

Production code calls `faults.check("engine.step")` at a few points (an engine step, a callback,
a load half-way, a store write); it costs one dict lookup while nothing is armed. Tests arm a point
with `faults.arm("engine.step", times=1)` and prove that every request still ends, slots and
in-flight counts return to zero, and the next request works.
"""

from __future__ import annotations

import threading


class InjectedFault(RuntimeError):
    """Raised by an armed fault point."""


_lock = threading.Lock()
_armed: dict[str, int] = {}


def arm(point: str, times: int = 1) -> None:
    with _lock:
        _armed[point] = times


def disarm_all() -> None:
    with _lock:
        _armed.clear()


def check(point: str) -> None:
    if not _armed:
        return
    with _lock:
        left = _armed.get(point, 0)
        if left <= 0:
            return
        _armed[point] = left - 1
    raise InjectedFault(f"injected fault at {point}")
