"""Generation parameters and their validation, shared by every entry point.

`GenerationParams.validated(...)` is the one place bounds are checked; it raises
`InvalidParamsError` naming the offending field. HTTP adapters declare the same bounds in their
pydantic models (so they show in OpenAPI), but the core never trusts that they did.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import InvalidParamsError

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MAX_SEED = 2**63 - 1
MAX_NEW_TOKENS_LIMIT = 32768
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int | None = None  # None: as many as the context allows, capped by default_max
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    min_p: float = 0.0  # 0 = off; else tokens below min_p x the best token's probability are dropped
    presence_penalty: float = 0.0  # subtracted from a token's logit once it was generated
    frequency_penalty: float = 0.0  # subtracted per time it was generated
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)  # (token id, added to its logit)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stop"] = list(self.stop)
        data["logit_bias"] = {str(k): v for k, v in self.logit_bias}
        return data

    @property
    def shapes_logits(self) -> bool:
        """Whether anything but temperature / top-k / top-p changes the logits (greedy too)."""
        return bool(self.logit_bias) or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

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
            "min_p": lambda v: _float(v, "min_p", 0.0, 1.0),
            "presence_penalty": lambda v: _float(v, "presence_penalty", -2.0, 2.0),
            "frequency_penalty": lambda v: _float(v, "frequency_penalty", -2.0, 2.0),
            "logit_bias": _logit_bias,
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


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """{token id (as a string, OpenAI's JSON): bias in [-100, 100]} or (id, bias) pairs. Whether
    each id is a token of the model is checked by the backend, which knows its vocabulary."""
    pairs = value.items() if isinstance(value, dict) else value
    if not isinstance(pairs, (list, tuple, type({}.items()))):
        raise InvalidParamsError("logit_bias must map token ids to biases", param="logit_bias")
    pairs = list(pairs)
    if len(pairs) > MAX_LOGIT_BIAS:
        raise InvalidParamsError(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens", param="logit_bias")
    out = {}
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise InvalidParamsError("logit_bias must map token ids to biases", param="logit_bias")
        key, bias = pair
        try:
            token = int(key) if not isinstance(key, bool) and str(key).lstrip("-").isdigit() else None
        except (TypeError, ValueError):
            token = None
        if token is None or token < 0:
            raise InvalidParamsError(f"logit_bias.{key}: not a token id", param=f"logit_bias.{key}")
        out[token] = _float(bias, f"logit_bias.{key}", -100.0, 100.0)
    return tuple(sorted(out.items()))


MAX_KEEP_ALIVE = 10 * 365 * 86400.0
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def keep_alive_seconds(value: Any, param: str = "keep_alive") -> float | None:
    """Ollama's keep_alive: seconds (a number), a duration ("30s", "10m", "1h30m"), 0 = unload as
    soon as idle, a negative value = keep loaded forever (None)."""
    if isinstance(value, bool) or value is None:
        raise InvalidParamsError(f"{param}: a number of seconds or a duration such as '10m'", param=param)
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            match = _DURATION.match(text) if text and not text.startswith("-") else None
            if match is None or not any(match.groups()):
                if text.startswith("-") and _DURATION.match(text[1:]):
                    return None  # "-1m": forever, as Ollama reads any negative duration
                raise InvalidParamsError(f"{param}: '{value}' is not a duration (say 300, '5m' or '1h30m')",
                                         param=param) from None
            hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
            value = hours * 3600 + minutes * 60 + seconds
    if not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidParamsError(f"{param}: a number of seconds or a duration such as '10m'", param=param)
    if value < 0:
        return None
    if value > MAX_KEEP_ALIVE:
        raise InvalidParamsError(f"{param}: at most {MAX_KEEP_ALIVE:.0f} s (or -1: forever)", param=param)
    return float(value)
