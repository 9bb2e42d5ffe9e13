"""The interface every backend implements, and what the pool hands each one."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..catalog import ModelSpec
from ..engine import EngineConfig
from ..policy import SourcePolicy
from ..stream import GenerationHandle, GenerationRequest

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class BackendContext:
    cache_dir: Path
    device: str = "auto"  # overrides specs that say "auto"
    engine: EngineConfig = field(default_factory=EngineConfig)
    policy: SourcePolicy | None = None  # checks specs that came from callers; None trusts every spec


class Backend(ABC):
    def __init__(self, spec: ModelSpec, context: BackendContext):
        self.spec = spec
        self.context = context

    @abstractmethod
    def prepare(self, progress: Progress) -> None:
        """Find, fetch, convert and check the weights. Slow; uses no lasting memory."""

    @abstractmethod
    def estimate_bytes(self) -> int:
        """Memory the loaded model will take (weights + KV budget), known after prepare()."""

    @abstractmethod
    def load(self, progress: Progress) -> None:
        """Make the model resident and ready to serve."""

    @abstractmethod
    def unload(self) -> None:
        """Free everything load() took. Called only when no request is in flight."""

    @abstractmethod
    def submit(self, request: GenerationRequest) -> GenerationHandle:
        """Validate and start a generation; raises typed errors for bad requests."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Memory counted against the pool's budget while loaded."""

    def alive(self) -> bool:
        """False once a loaded engine stopped on its own; the pool then loads it again."""
        return True

    def count_tokens(self, text: str) -> int:
        """Tokens `text` takes for this model (estimate where the tokenizer is remote)."""
        return max(1, len(text) // 4)

    @property
    def context_length(self) -> int:
        return self.spec.context_length or 2048

    def info(self) -> dict[str, Any]:
        """Facts for status pages: device, dtype, parameters, context length, ..."""
        return {}

    def load_stats(self) -> dict[str, Any]:
        """Live figures: running/waiting requests, KV use."""
        return {}
