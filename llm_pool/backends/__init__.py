"""Backends: what the pool holds for each model version, behind one small interface.

A backend is built from a `ModelSpec`, prepared (files found, converted, checked: the slow part that
needs no memory budget), loaded (weights resident, engine running), asked to `submit` requests and
finally unloaded. `LocalBackend` runs transformers in this process, `LlamaCppBackend` a
GGUF in a private llama.cpp server process (chosen per spec by `engine_for`); remote backends
(OpenAI or TGI protocol servers) attach to servers elsewhere. Tests may add fakes through `register_backend`,
the same door the real ones use.
"""

from __future__ import annotations

from collections.abc import Callable

from ..catalog import ENGINES, ModelSpec
from .base import Backend, BackendContext

_FACTORIES: dict[str, Callable[[ModelSpec, BackendContext], Backend]] = {}


def engine_for(spec: ModelSpec, device: str = "auto") -> str:
    """Which engine runs `spec`: its catalog `engine`, or for "auto" llama.cpp for a GGUF on a
    CPU (when llama.cpp is built here or can be), transformers for the rest and on CUDA."""
    if spec.is_remote:
        return "remote"
    if spec.kind == "embedding":
        return _embedding_engine(spec, device)
    if spec.engine != "auto":
        return spec.engine
    from .. import llamacpp_build
    gguf = spec.source in ("pypi", "gguf") or (spec.source == "hub" and bool(spec.file))
    wanted = spec.device if spec.device != "auto" else device
    if not gguf or spec.dtype != "auto" or spec.quantization or wanted.startswith("cuda"):
        return "transformers"
    if wanted == "auto":
        from ..devices import cuda_available
        if cuda_available():
            return "transformers"
    return "llama.cpp" if llamacpp_build.usable() else "transformers"


def _embedding_engine(spec: ModelSpec, device: str) -> str:
    """llama.cpp for a BERT sentence-transformers folder on a CPU when llama.cpp is built (no torch
    in Shoal's process for retrieval), else sentence-transformers."""
    if spec.engine == "transformers":
        return "sentence-transformers"
    from .. import llamacpp_build
    from .llamacpp_embedding import embeds_on_llamacpp
    wanted = spec.device if spec.device != "auto" else device
    if wanted.startswith("cuda") or llamacpp_build.find_server() is None or embeds_on_llamacpp(spec) is None:
        return "sentence-transformers"
    if wanted == "auto":
        from ..devices import cuda_available
        if cuda_available():
            return "sentence-transformers"
    return "llama.cpp"


def register_backend(source: str, factory: Callable[[ModelSpec, BackendContext], Backend]) -> None:
    _FACTORIES[source] = factory


def create_backend(spec: ModelSpec, context: BackendContext) -> Backend:
    if spec.source not in _FACTORIES:
        _register_defaults()
    factory = _FACTORIES[spec.source]
    if spec.kind == "embedding":
        if engine_for(spec, context.device) == "llama.cpp":
            from .llamacpp_embedding import LlamaCppEmbeddingBackend
            return LlamaCppEmbeddingBackend(spec, context)
        from .embedding import EmbeddingBackend
        return EmbeddingBackend(spec, context)
    if getattr(factory, "engine_name", None) == "transformers" and engine_for(spec, context.device) == "llama.cpp":
        from .llamacpp import LlamaCppBackend
        return LlamaCppBackend(spec, context)
    return factory(spec, context)


def _transformers(spec: ModelSpec, context: BackendContext) -> Backend:
    """The transformers engine, imported (with torch) only when a model runs on it."""
    from .local import LocalBackend
    return LocalBackend(spec, context)


_transformers.engine_name = "transformers"  # type: ignore[attr-defined]


def _register_defaults() -> None:
    for source in ("pypi", "gguf", "local", "hub"):
        _FACTORIES.setdefault(source, _transformers)
    try:
        from .remote import RemoteBackend
    except ImportError:  # pragma: no cover - remote support is optional
        return
    for source in ("openai", "tgi"):
        _FACTORIES.setdefault(source, RemoteBackend)


__all__ = ["ENGINES", "Backend", "BackendContext", "create_backend", "engine_for", "register_backend"]
