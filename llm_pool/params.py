"""Generation parameters and their validation, shared by every entry point.

`GenerationParams.validated(...)` is the one place bounds are checked; it raises
`InvalidParamsError` naming the offending field. HTTP adapters declare the same bounds in their
pydantic models (so they show in OpenAPI), but the core never trusts that they did.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import InvalidParamsError

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MAX_SEED = 2**63 - 1
MAX_NEW_TOKENS_LIMIT = 32768


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int | None = None  # None: as many as the context allows, capped by default_max
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stop"] = list(self.stop)
        return data

    def updated(self, **changes: Any) -> GenerationParams:
        """A copy with `changes` applied (None values ignored), validated."""
        current = self.to_dict()
        current.update({k: v for k, v in changes.items() if v is not None})
        return GenerationParams.validated(**current)

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def validated(cls, **values: Any) -> GenerationParams:
        unknown = set(values) - cls.names()
        if unknown:
            name = sorted(unknown)[0]
            raise InvalidParamsError(f"unknown generation parameter '{name}'", param=name)
        values = {k: v for k, v in values.items() if v is not None}
        out = replace(cls())
        checks = {
            "max_new_tokens": lambda v: _int(v, "max_new_tokens", 1, MAX_NEW_TOKENS_LIMIT),
            "temperature": lambda v: _float(v, "temperature", 0.0, 2.0),
            "top_p": lambda v: _float(v, "top_p", 0.0, 1.0, low_open=True),
            "top_k": lambda v: _int(v, "top_k", 0, 1_000_000),
            "repetition_penalty": lambda v: _float(v, "repetition_penalty", 0.0, 10.0, low_open=True),
            "seed": lambda v: _int(v, "seed", 0, MAX_SEED),
            "stop": _stop,
        }
        cleaned = {name: checks[name](value) for name, value in values.items()}
        return replace(out, **cleaned)


def _int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParamsError(f"{name} must be an integer, got {type(value).__name__}", param=name)
    if isinstance(value, float) and not value.is_integer():
        raise InvalidParamsError(f"{name} must be an integer, got {value}", param=name)
    value = int(value)
    if not low <= value <= high:
        raise InvalidParamsError(f"{name} must be between {low} and {high}, got {value}", param=name)
    return value


def _float(value: Any, name: str, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParamsError(f"{name} must be a number, got {type(value).__name__}", param=name)
    value = float(value)
    too_low = value <= low if low_open else value < low
    if math.isnan(value) or too_low or value > high:
        bracket = "(" if low_open else "["
        raise InvalidParamsError(f"{name} must be in {bracket}{low}, {high}], got {value}", param=name)
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise InvalidParamsError("stop must be a string or a list of strings", param="stop")
    if len(value) > MAX_STOP_SEQUENCES:
        raise InvalidParamsError(f"stop takes at most {MAX_STOP_SEQUENCES} sequences", param="stop")
    for item in value:
        if not isinstance(item, str) or not item:
            raise InvalidParamsError("each stop sequence must be a non-empty string", param="stop")
        if len(item) > MAX_STOP_LENGTH:
            raise InvalidParamsError(f"stop sequences are at most {MAX_STOP_LENGTH} characters",
                                     param="stop")
    return tuple(value)
