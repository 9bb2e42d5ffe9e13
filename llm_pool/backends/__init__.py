"""Backends: what the pool holds for each model version, behind one small interface.

A backend is built from a `ModelSpec`, prepared (files found, converted, checked: the slow part that
needs no memory budget), loaded (weights resident, engine running), asked to `submit` requests and
finally unloaded. `LocalBackend` runs transformers in this process; remote backends (OpenAI or
TGI protocol servers) attach to servers elsewhere. Tests may add fakes through `register_backend`,
the same door the real ones use.
"""

from __future__ import annotations

from collections.abc import Callable

from ..catalog import ModelSpec
from .base import Backend, BackendContext

_FACTORIES: dict[str, Callable[[ModelSpec, BackendContext], Backend]] = {}


def register_backend(source: str, factory: Callable[[ModelSpec, BackendContext], Backend]) -> None:
    _FACTORIES[source] = factory


def create_backend(spec: ModelSpec, context: BackendContext) -> Backend:
    if spec.source not in _FACTORIES:
        _register_defaults()
    return _FACTORIES[spec.source](spec, context)


def _register_defaults() -> None:
    from .local import LocalBackend
    for source in ("pypi", "gguf", "local", "hub"):
        _FACTORIES.setdefault(source, LocalBackend)
    try:
        from .remote import RemoteBackend
    except ImportError:  # pragma: no cover - remote support is optional
        return
    for source in ("openai", "tgi"):
        _FACTORIES.setdefault(source, RemoteBackend)


__all__ = ["Backend", "BackendContext", "create_backend", "register_backend"]
