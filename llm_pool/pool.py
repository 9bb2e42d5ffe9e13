"""The model pool: which model versions are resident, and who may use them.

Owns residency and nothing about prompts: it loads versions on demand (one load however many
requests wait for it), keeps them within a memory budget by evicting the least recently used
idle versions, never evicts a version that is serving, loading or pinned, and hot-swaps a name
from one version to another (load beside, flip the alias, drain, unload) without failing a
request. Every state change happens under one condition variable; slow work (preparing, loading,
unloading weights) happens outside it.

States of a version: unloaded -> loading -> ready -> unloading -> unloaded; a failed load leaves
`failed` with its error (and the rest of the pool as it was); the next request retries.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from . import faults
from .backends import Backend, BackendContext, create_backend, engine_for
from .catalog import Catalog, ModelSpec
from .errors import ConflictError, InsufficientMemoryError, ModelLoadError, ShoalError
from .stream import GenerationHandle, GenerationRequest

T = TypeVar("T")

log = logging.getLogger("shoal.pool")

UNLOADED, LOADING, READY, UNLOADING, FAILED = "unloaded", "loading", "ready", "unloading", "failed"


@dataclass(eq=False)
class _Entry:
    spec: ModelSpec
    state: str = UNLOADED
    progress: float = 0.0
    stage: str = ""
    error: str | None = None
    backend: Backend | None = None
    in_flight: int = 0
    pinned: bool = False
    drains: int = 0  # loads waiting for this busy model to go idle so they can evict it
    unload_requested: bool = False  # unload() waits for it to go idle, then unloads it
    last_used: float = 0.0
    loaded_at: float | None = None
    load_seconds: float | None = None
    served: int = 0
    reserved: int = 0  # bytes counted against the budget
    attempt: int = 0
    failure: ShoalError | None = None  # why the last load failed
    info: dict[str, Any] = field(default_factory=dict)
    keep_alive: float | None = None  # idle seconds before it is unloaded; None: until evicted

    def expires_at(self) -> float | None:
        """Wall-clock time at which this idle model will be unloaded (None: not counting down)."""
        if self.state != READY or self.keep_alive is None or self.in_flight or self.pinned:
            return None
        return time.time() + max(0.0, self.last_used + self.keep_alive - time.monotonic())

    def raise_failure(self) -> None:
        error = copy.copy(self.failure) if self.failure else None
        raise error or ModelLoadError(f"model '{self.spec.key}' failed to load")

    @property
    def draining(self) -> bool:
        """Takes no new requests: about to be evicted or unloaded."""
        return self.drains > 0 or self.unload_requested

    @property
    def lost(self) -> bool:
        """Loaded, but its engine stopped on its own (a crashed llama.cpp process)."""
        alive = getattr(self.backend, "alive", None)  # backends made outside Backend may lack it
        return self.state == READY and alive is not None and not alive()

    @property
    def serving(self) -> bool:
        return self.state == READY and not self.draining and not self.lost


KEEP = object()  # submit(keep_alive=KEEP): leave the model's keep-alive as it is


def _gb(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


class ModelPool:
    def __init__(self, catalog: Catalog, context: BackendContext, budget_bytes: int, *,
                 default_model: str | None = None, load_timeout: float = 300.0,
                 backend_factory=create_backend, state_path: Path | None = None):
        """`state_path`: where the operator's choices (active versions, pins) are kept, so a
        restart serves what was swapped to and keeps what was pinned."""
        self.catalog = catalog
        self.context = context
        self.budget = budget_bytes
        self.load_timeout = load_timeout
        self._factory = backend_factory
        self._cond = threading.Condition()
        self._entries: dict[str, _Entry] = {}
        self._alias: dict[str, str] = {}
        self._previous: dict[str, str] = {}
        self._fallbacks: dict[str, str] = {}  # name -> the version it waits for (engine not ready yet)
        self._protected: Counter[str] = Counter()  # versions a swap in progress must keep (per swap)
        self._state_path = state_path
        self._closed = False  # shut down: loads still on their way stop before building a model
        self._waiters = ThreadPoolExecutor(max_workers=64, thread_name_prefix="pool-wait")
        # a gate in front of submit (the service layer's fair share, with `waiting(key)`): the
        # requests waiting there count in each model's queue figures
        self.admission: Any = None
        names = catalog.names()
        if default_model:
            catalog.get(*_split(default_model))  # raises ModelNotFoundError for a bad default
        self.default_model = default_model or (names[0] if names else None)
        self._restore_state()
        threading.Thread(target=self._expire_idle, daemon=True, name="pool-keep-alive").start()

    # ------------------------------------------------------------------ names and versions
    def _entry_for(self, spec: ModelSpec) -> _Entry:
        entry = self._entries.get(spec.key)
        if entry is None:
            entry = self._entries[spec.key] = _Entry(spec, keep_alive=spec.idle_unload)
        return entry

    def _active_version(self, name: str) -> str:
        if name not in self._alias:
            self._alias[name] = self.catalog.get(name).version
        return self._alias[name]

    def resolve(self, ref: str | None) -> _Entry:
        """'name' (its active version) or 'name@version'; raises ModelNotFoundError."""
        ref = ref or self.default_model
        if not ref:
            raise ModelLoadError("no model is configured")
        name, version = _split(ref)
        with self._cond:
            spec = self.catalog.get(name, version or self._active_version(name))
            return self._entry_for(spec)

    def backend(self, ref: str | None) -> Backend | None:
        entry = self.resolve(ref)
        return entry.backend

    def spec(self, ref: str | None) -> ModelSpec:
        return self.resolve(ref).spec

    # ------------------------------------------------------------------ generation
    def submit(self, ref: str | None, request: GenerationRequest,
               timeout: float | None = None, keep_alive: Any = KEEP) -> GenerationHandle:
        """Start a generation, loading the model first if needed (waits at most `timeout`).
        `keep_alive` (seconds, None = forever) sets how long the model stays loaded once idle."""
        entry = self._acquire(ref, self.load_timeout if timeout is None else timeout, keep_alive)
        try:
            handle = entry.backend.submit(request)
        except BaseException:
            self._release(entry)
            raise
        handle.on_done(lambda _handle: self._release(entry))
        return handle

    def use(self, ref: str | None, work: Callable[[Backend], T], timeout: float | None = None,
            keep_alive: Any = KEEP) -> T:
        """Run `work` with the model's backend, loading it first if needed; the model counts as in
        use meanwhile (it is not evicted or swapped out from under `work`)."""
        entry = self._acquire(ref, self.load_timeout if timeout is None else timeout, keep_alive)
        try:
            return work(entry.backend)
        finally:
            self._release(entry)

    async def ause(self, ref: str | None, work: Callable[[Backend], T], timeout: float | None = None,
                   keep_alive: Any = KEEP) -> T:
        """`use` for event loops (off the loop)."""
        self.resolve(ref)
        return await asyncio.get_running_loop().run_in_executor(self._waiters, self.use, ref, work, timeout,
                                                                keep_alive)

    async def asubmit(self, ref: str | None, request: GenerationRequest,
                      timeout: float | None = None, keep_alive: Any = KEEP) -> GenerationHandle:
        """`submit` for event loops: everything that takes time (tokenizing the prompt, applying
        the chat template, waiting for a load) runs off the loop, so no request, however large,
        holds up the others."""
        self.resolve(ref)  # an unknown model is refused at once
        future = asyncio.get_running_loop().run_in_executor(
            self._waiters, self.submit, ref, request, timeout, keep_alive)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:  # the client left while the model loaded: cancel its handle
            future.add_done_callback(_cancel_result)
            raise

    def _acquire(self, ref: str | None, timeout: float, keep_alive: Any = KEEP) -> _Entry:
        deadline = time.monotonic() + timeout
        joined: int | None = None
        with self._cond:
            while True:
                entry = self.resolve(ref)
                if entry.serving:
                    entry.in_flight += 1
                    entry.served += 1
                    entry.last_used = time.monotonic()
                    if keep_alive is not KEEP:
                        entry.keep_alive = keep_alive
                    return entry
                remaining = deadline - time.monotonic()
                if entry.lost and entry.in_flight == 0:
                    self._drop_lost(entry)
                if entry.state == FAILED and joined == entry.attempt:
                    entry.raise_failure()
                if entry.state in (UNLOADED, FAILED):
                    self._begin_load(entry, memory_wait=max(0.0, remaining))
                if entry.state == LOADING:
                    joined = entry.attempt
                if remaining <= 0:
                    raise ModelLoadError(
                        f"model '{entry.spec.key}' was not ready within {timeout:.0f} s "
                        f"(state: {entry.state}{', ' + entry.stage if entry.stage else ''})",
                        code="model_not_ready")
                self._cond.wait(remaining)

    def _drop_lost(self, entry: _Entry) -> None:
        """Its engine died: clean up what is left (in a thread) so the next request loads it again."""
        log.warning("model %s: its engine stopped; unloading it, the next request loads it again",
                    entry.spec.key)
        entry.state, entry.error = UNLOADING, "the engine stopped; loading again on the next request"
        threading.Thread(target=self._unload_backend, args=(entry,), daemon=True,
                         name=f"drop-{entry.spec.key}").start()

    def _release(self, entry: _Entry) -> None:
        with self._cond:
            entry.in_flight -= 1
            entry.last_used = time.monotonic()
            self._cond.notify_all()

    # ------------------------------------------------------------------ loading
    def load(self, ref: str | None, timeout: float | None = None) -> dict[str, Any]:
        """Load now (evicting idle models if needed, never waiting for busy ones)."""
        entry = self.resolve(ref)
        self._wait_ready(entry, self.load_timeout if timeout is None else timeout, memory_wait=0.0)
        return self.describe(entry)

    def _wait_ready(self, entry: _Entry, timeout: float, memory_wait: float) -> None:
        deadline = time.monotonic() + timeout
        joined: int | None = None
        with self._cond:
            while entry.state != READY:
                if entry.state == FAILED and joined == entry.attempt:
                    entry.raise_failure()
                if entry.state in (UNLOADED, FAILED):
                    self._begin_load(entry, memory_wait)
                if entry.state == LOADING:
                    joined = entry.attempt
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ModelLoadError(f"model '{entry.spec.key}' was not ready within {timeout:.0f} s")
                self._cond.wait(remaining)

    def _begin_load(self, entry: _Entry, memory_wait: float) -> None:
        entry.state, entry.progress, entry.stage, entry.error = LOADING, 0.0, "starting", None
        entry.attempt += 1
        self._cond.notify_all()
        threading.Thread(target=self._load, args=(entry, memory_wait), daemon=True,
                         name=f"load-{entry.spec.key}").start()

    def _load(self, entry: _Entry, memory_wait: float) -> None:
        started = time.monotonic()
        backend: Backend | None = None

        def progress(fraction: float, stage: str) -> None:
            with self._cond:
                entry.progress, entry.stage = fraction, stage
                self._cond.notify_all()

        try:
            backend = self._factory(entry.spec, self.context)
            backend.prepare(progress)
            self._make_room(entry, backend.estimate_bytes(), time.monotonic() + memory_wait)
            if self._closed:
                raise ModelLoadError(f"model '{entry.spec.key}': the pool is shutting down")
            backend.load(progress)
            faults.check("pool.load")
            info, reserved = backend.info(), backend.memory_bytes()  # a backend that cannot say fails here
        except Exception as exc:
            error = exc if isinstance(exc, ShoalError) else ModelLoadError(
                f"model '{entry.spec.key}' failed to load: {exc}")
            log.warning("load of %s failed: %s", entry.spec.key, error.message)
            if backend is not None:
                _quietly(backend.unload)
            with self._cond:
                entry.state, entry.error, entry.stage, entry.failure = FAILED, error.message, "", error
                entry.reserved, entry.backend = 0, None
                self._cond.notify_all()
            return
        if self._closed:  # shut down while this model was being built: nobody will unload it later
            _quietly(backend.unload)
            with self._cond:
                entry.state, entry.reserved = UNLOADED, 0
                self._cond.notify_all()
            return
        with self._cond:
            entry.backend, entry.reserved = backend, reserved
            entry.state, entry.progress, entry.stage = READY, 1.0, ""
            entry.load_seconds = time.monotonic() - started
            entry.loaded_at = time.time()
            entry.last_used = time.monotonic()
            entry.info = info
            self._cond.notify_all()
        log.info("loaded %s in %.1f s (%s)", entry.spec.key, entry.load_seconds, _gb(entry.reserved))

    # ------------------------------------------------------------------ memory
    def _make_room(self, entry: _Entry, need: int, deadline: float) -> None:
        """Reserve `need` bytes for `entry`, evicting LRU idle versions; wait for busy ones
        (marked draining so they take no new requests) until `deadline`."""
        drained: list[_Entry] = []
        try:
            while True:
                with self._cond:
                    plan, victims = self._plan(entry, need)
                    if plan == "fit":
                        entry.reserved = need
                        return
                    if plan == "evict":
                        for victim in victims:
                            victim.state = UNLOADING
                        self._cond.notify_all()
                    else:
                        remaining = deadline - time.monotonic()
                        if self._closed:
                            raise ModelLoadError(f"model '{entry.spec.key}': the pool is shutting down")
                        if remaining <= 0:
                            raise InsufficientMemoryError(self._no_room(entry, need, busy=victims))
                        for victim in victims:
                            if victim not in drained:
                                victim.drains += 1
                                drained.append(victim)
                        self._cond.wait(min(remaining, 1.0))
                        continue
                for victim in victims:
                    log.info("evicting %s (idle, least recently used) for %s", victim.spec.key, entry.spec.key)
                    self._unload_backend(victim)
        finally:
            with self._cond:  # only what this load asked for: an unload() in progress stays
                for victim in drained:
                    victim.drains = max(0, victim.drains - 1)
                self._cond.notify_all()

    def _plan(self, entry: _Entry, need: int) -> tuple[str, list[_Entry]]:
        others = [e for e in self._entries.values() if e is not entry]
        used = sum(e.reserved for e in others)
        over = used + need - self.budget
        if over <= 0:
            return "fit", []
        movable = [e for e in others if e.state == READY and not e.pinned and not e.unload_requested
                   and self._protected[e.spec.key] == 0]
        idle = sorted((e for e in movable if e.in_flight == 0), key=lambda e: e.last_used)
        busy = sorted((e for e in movable if e.in_flight > 0), key=lambda e: e.last_used)
        leaving = sum(e.reserved for e in others if e.state == UNLOADING or e.unload_requested)
        if leaving + sum(e.reserved for e in idle + busy) < over:
            raise InsufficientMemoryError(self._no_room(entry, need))
        victims, freed = [], leaving
        for candidate in idle:
            if freed >= over:
                break
            victims.append(candidate)
            freed += candidate.reserved
        if victims:
            return "evict", victims
        if freed >= over:  # enough is on its way out already
            return "wait", []
        waiting_for = []
        for candidate in busy:
            if freed >= over:
                break
            waiting_for.append(candidate)
            freed += candidate.reserved
        return "wait", waiting_for

    def _no_room(self, entry: _Entry, need: int, busy: list[_Entry] | None = None) -> str:
        held = [e for e in self._entries.values() if e is not entry and e.reserved]
        why = ", ".join(f"{e.spec.key} ({_gb(e.reserved)}, {_holding(e)})" for e in held) or "nothing"
        tail = " Busy models did not become idle in time." if busy else ""
        return (f"Not enough memory to load '{entry.spec.key}': it needs {_gb(need)}, the budget is "
                f"{_gb(self.budget)} and {why} cannot be evicted now.{tail} Unpin or unload a model, "
                "or raise --memory-budget.")

    def _unload_backend(self, entry: _Entry) -> None:
        backend = entry.backend
        if backend is not None:
            _quietly(backend.unload)
        with self._cond:
            entry.state, entry.backend, entry.reserved = UNLOADED, None, 0
            entry.progress, entry.stage, entry.unload_requested = 0.0, "", False
            self._cond.notify_all()

    # ------------------------------------------------------------------ management
    def unload(self, ref: str | None, timeout: float = 30.0) -> dict[str, Any]:
        """Unload once in-flight requests finish (new ones wait and reload it on demand)."""
        entry = self.resolve(ref)
        with self._cond:
            if entry.pinned:
                raise ConflictError(f"model '{entry.spec.key}' is pinned; unpin it first")
            if entry.state == LOADING:
                raise ConflictError(f"model '{entry.spec.key}' is loading; unload it when it is ready")
            if entry.state != READY or entry.unload_requested:
                return self.describe(entry, locked=True)
            entry.unload_requested = True
            if not self._cond.wait_for(lambda: entry.in_flight == 0, timeout):
                entry.unload_requested = False
                self._cond.notify_all()
                raise ConflictError(f"model '{entry.spec.key}' is still serving {entry.in_flight} "
                                    f"requests after {timeout:.0f} s; try again later")
            entry.state = UNLOADING
        self._unload_backend(entry)
        return self.describe(entry)

    def set_keep_alive(self, ref: str | None, seconds: float | None) -> dict[str, Any]:
        """How long the model stays loaded once idle (None: until evicted or unloaded)."""
        entry = self.resolve(ref)
        with self._cond:
            entry.keep_alive = seconds
            entry.last_used = time.monotonic()
            self._cond.notify_all()
            return self.describe(entry, locked=True)

    def _expire_idle(self) -> None:
        """Unloads each model whose keep-alive ran out while idle (never a pinned or busy one)."""
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                due = [e for e in self._entries.values()
                       if e.state == READY and e.keep_alive is not None and not e.in_flight and not e.pinned
                       and not e.draining and now - e.last_used >= e.keep_alive]
                if not due:
                    self._cond.wait(0.5)
                    continue
            for entry in due:
                log.info("model %s: idle for its keep-alive (%.0f s); unloading it", entry.spec.key,
                         entry.keep_alive)
                try:
                    self.unload(entry.spec.key, timeout=0.1)
                except ShoalError:
                    pass  # a request came in meanwhile: it counts down again when idle

    def pin(self, ref: str | None) -> dict[str, Any]:
        entry = self.resolve(ref)
        with self._cond:
            was, entry.pinned = entry.pinned, True
        try:
            status = self.load(ref)
        except ShoalError:
            with self._cond:
                entry.pinned = was  # a failed pin leaves an earlier pin in place
            raise
        self._save_state()
        return status

    def unpin(self, ref: str | None) -> dict[str, Any]:
        entry = self.resolve(ref)
        with self._cond:
            entry.pinned = False
            self._cond.notify_all()
        self._save_state()
        return self.describe(entry)

    def swap(self, name: str, version: str, timeout: float | None = None) -> dict[str, Any]:
        """Point `name` at `version`: load it beside the current one, flip, drain, unload the old."""
        target = self._entry_for_locked(self.catalog.get(name, version))
        with self._cond:
            old = self._entry_for(self.catalog.get(name, self._active_version(name)))
            if old is target:
                return self.describe(target, locked=True)
            self._protected[old.spec.key] += 1
        try:
            self._wait_ready(target, self.load_timeout if timeout is None else timeout,
                             memory_wait=self.load_timeout if timeout is None else timeout)
            with self._cond:
                self._fallbacks.pop(name, None)  # the operator's choice ends a stand-in
                self._previous[name] = old.spec.version
                self._alias[name] = version
                self._cond.notify_all()
            log.info("model %s now points to version %s (was %s)", name, version, old.spec.version)
            self._save_state()
        finally:
            with self._cond:
                self._protected[old.spec.key] -= 1
                if self._protected[old.spec.key] <= 0:
                    del self._protected[old.spec.key]
        threading.Thread(target=self._retire, args=(old,), daemon=True).start()
        return self.describe(target)

    def rollback(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        with self._cond:
            previous = self._previous.get(name)
        if previous is None:
            raise ConflictError(f"model '{name}' has not been swapped; nothing to roll back to")
        return self.swap(name, previous, timeout)

    def serve_meanwhile(self, name: str, version: str) -> None:
        """Serve `name` from `version` until `end_meanwhile` (not saved: e.g. the transformers
        version while llama.cpp builds for the catalog's version)."""
        with self._cond:
            intended = self._active_version(name)
            self.catalog.get(name, version)
            if intended != version:
                self._fallbacks[name] = intended
                self._alias[name] = version
                self._cond.notify_all()

    def end_meanwhile(self, name: str, timeout: float | None = None) -> dict[str, Any] | None:
        """Swap `name` to the version `serve_meanwhile` stood in for, unless the operator moved it."""
        with self._cond:
            intended = self._fallbacks.pop(name, None)
            previous = self._previous.get(name)
        if intended is None:
            return None
        status = self.swap(name, intended, timeout)
        with self._cond:  # a stand-in is no version to roll back to
            if previous is None:
                self._previous.pop(name, None)
            else:
                self._previous[name] = previous
        self._save_state()
        return status

    def _retire(self, old: _Entry) -> None:
        """After a swap: unload the old version once nothing uses it (unless it is active again)."""
        with self._cond:
            self._cond.wait_for(lambda: old.in_flight == 0)
            still_wanted = self._alias.get(old.spec.name) == old.spec.version
            if still_wanted or old.pinned or old.state != READY:
                return
            old.state = UNLOADING
        self._unload_backend(old)

    # ------------------------------------------------------------------ the operator's choices
    def pinned_models(self) -> list[str]:
        with self._cond:
            return [key for key, entry in self._entries.items() if entry.pinned]

    def _save_state(self) -> None:
        if self._state_path is None:
            return
        with self._cond:
            active = {**self._alias, **self._fallbacks}  # a stand-in is not the operator's choice
            state = {"active": active, "previous": dict(self._previous),
                     "pinned": [key for key, entry in self._entries.items() if entry.pinned]}
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self._state_path)

    def _restore_state(self) -> None:
        if self._state_path is None or not self._state_path.exists():
            return
        try:
            state = json.loads(self._state_path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("ignoring the pool state in %s: %s", self._state_path, exc)
            return
        known = {spec.key for spec in self.catalog.all()}
        for name, version in (state.get("active") or {}).items():
            if f"{name}@{version}" in known:
                self._alias[name] = version
            else:
                log.warning("model %s: version %s is no longer in the catalog; serving its default", name, version)
        for name, version in (state.get("previous") or {}).items():
            if f"{name}@{version}" in known:
                self._previous[name] = version
        for key in state.get("pinned") or []:
            if key in known:
                self._entry_for(self.catalog.get(*key.split("@", 1))).pinned = True

    def _entry_for_locked(self, spec: ModelSpec) -> _Entry:
        with self._cond:
            return self._entry_for(spec)

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            entries = [e for e in self._entries.values() if e.backend is not None]
            for entry in entries:
                entry.state = UNLOADING
        for entry in entries:
            self._unload_backend(entry)
        self._waiters.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ status
    def describe(self, entry: _Entry, locked: bool = False) -> dict[str, Any]:
        if not locked:
            with self._cond:
                return self.describe(entry, locked=True)
        spec = entry.spec
        info = entry.backend.info() if entry.backend else entry.info
        return {
            "name": spec.name, "version": spec.version, "id": spec.key,
            "engine": info.get("engine") or engine_for(spec, self.context.device),
            "active": self._alias.get(spec.name, self.catalog.get(spec.name).version) == spec.version,
            "state": entry.state, "progress": round(entry.progress, 3), "stage": entry.stage,
            "error": entry.error, "pinned": entry.pinned, "in_flight": entry.in_flight,
            "resident_bytes": entry.reserved if entry.state in (READY, UNLOADING) else 0,
            "load_seconds": round(entry.load_seconds, 2) if entry.load_seconds else None,
            "loaded_at": entry.loaded_at, "requests_served": entry.served,
            "kind": spec.kind, "source": spec.source, "location": spec.location,
            "description": spec.description,
            "dtype": info.get("dtype", spec.dtype), "device": info.get("device", spec.device),
            "parameters": info.get("parameters"),
            "context_length": info.get("context_length") or spec.context_length,
            "queue": self._queue_stats(entry),
            "remote": spec.is_remote, "latency_ms": info.get("latency_ms"), "replicas": info.get("replicas"),
            "keep_alive": entry.keep_alive,
            # how tools reach the model (chat_format): known once its template is loaded
            "tool_format": ("template" if entry.backend.tool_template else "generic")
            if entry.backend and entry.state == READY and spec.kind == "chat" else None,
            # whether it thinks in <think> blocks, and the switches its template reads (reasoning.py)
            "reasoning": entry.backend.reasoning.describe()
            if entry.backend and entry.state == READY and spec.kind == "chat" else None,
            "expires_at": round(expires) if (expires := entry.expires_at()) is not None else None,
        }

    def _queue_stats(self, entry: _Entry) -> dict[str, Any]:
        stats = dict(entry.backend.load_stats()) if entry.backend else {}
        if stats and self.admission is not None:
            stats["waiting"] = stats.get("waiting", 0) + self.admission.waiting(entry.spec.key)
        return stats

    def status(self, ref: str | None) -> dict[str, Any]:
        return self.describe(self.resolve(ref))

    def models(self) -> list[dict[str, Any]]:
        """One item per model name: its active version's status plus every version's."""
        out = []
        for name in self.catalog.names():
            versions = [self.describe(self._entry_for_locked(spec)) for spec in self.catalog.versions(name)]
            active = next((v for v in versions if v["active"]), versions[0])
            out.append({**active, "versions": versions,
                        "active_version": active["version"]})
        return out

    def resident_bytes(self) -> int:
        with self._cond:
            return sum(e.reserved for e in self._entries.values())

    def in_flight(self) -> int:
        with self._cond:
            return sum(e.in_flight for e in self._entries.values())

    def generating(self) -> int:
        """Requests in flight on generation models (what indexing steps aside for)."""
        with self._cond:
            return sum(e.in_flight for e in self._entries.values() if e.spec.kind != "embedding")

    def ready_count(self) -> int:
        with self._cond:
            return sum(1 for e in self._entries.values() if e.state == READY)


def _holding(entry: _Entry) -> str:
    if entry.pinned:
        return "pinned"
    if entry.state != READY:
        return entry.state
    return "busy" if entry.in_flight else "idle"


def _split(ref: str) -> tuple[str, str | None]:
    name, _, version = ref.partition("@")
    return name, version or None


def _cancel_result(future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().cancel()


def _quietly(func) -> None:
    try:
        func()
    except Exception:  # unloading must not stop the pool from reaching a clean state
        log.exception("error while unloading")
