"""The interface every backend implements, and what the pool hands each one."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..catalog import ModelSpec
from ..config import EngineConfig
from ..errors import InvalidParamsError, InvalidRequestError
from ..policy import SourcePolicy
from ..reasoning import Reasoning
from ..stream import GenerationHandle, GenerationRequest

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class BackendContext:
    cache_dir: Path
    device: str = "auto"  # overrides specs that say "auto"
    engine: EngineConfig = field(default_factory=EngineConfig)
    policy: SourcePolicy | None = None  # checks specs that came from callers; None trusts every spec
    kv_disk: Any = None  # kv_disk.KvDisk: chats' KV caches kept on disk (None: off)


class Backend(ABC):
    # True once loaded when the model's chat template renders tools itself (chat_format); remote
    # backends and templates without tools get Shoal's generic tool format
    tool_template = False
    # Once loaded: what the model's chat template says about thinking (reasoning.py); remote
    # backends and templates without <think> blocks: a model that does not reason
    reasoning = Reasoning()

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

    def tokenize(self, request: GenerationRequest) -> list[int]:
        """The token ids the model would see for this request (chat template applied)."""
        raise InvalidRequestError(f"model '{self.spec.name}' is served remotely: its tokenizer is not here",
                                  param="model", code="no_tokenizer")

    def tokenize_pieces(self, request: GenerationRequest) -> list[tuple[int, bytes]]:
        """As `tokenize`, with each token's exact bytes (a character may be split across tokens)."""
        raise InvalidParamsError(f"with_pieces: model '{self.spec.name}' does not give token pieces "
                                 "(chat and completion models on this machine do)", param="with_pieces")

    def detokenize(self, ids: list[int]) -> str:
        raise InvalidRequestError(f"model '{self.spec.name}' is served remotely: its tokenizer is not here",
                                  param="model", code="no_tokenizer")

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


MAX_DETOKENIZE = 100_000


def check_token_ids(ids: list[int], vocab: int) -> None:
    """Ids from a caller are data: each must be a token of this model (llama.cpp is not asked
    about ids it does not have)."""
    if len(ids) > MAX_DETOKENIZE:
        raise InvalidParamsError(f"tokens: at most {MAX_DETOKENIZE} ids", param="tokens")
    for i, value in enumerate(ids):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
            raise InvalidParamsError(f"tokens.{i}: {value!r} is not a token id of this model (0..{vocab - 1})",
                                     param=f"tokens.{i}")


def check_logit_bias(params, vocab: int) -> None:
    """Each logit_bias key must be a token of this model (the params only know it is an id)."""
    for token, _bias in params.logit_bias:
        if not 0 <= token < vocab:
            raise InvalidParamsError(f"logit_bias.{token}: not a token id of this model (0..{vocab - 1})",
                                     param=f"logit_bias.{token}")
