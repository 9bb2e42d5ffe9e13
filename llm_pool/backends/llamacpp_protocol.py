"""Translation between llama-server's native API and Shoal's requests and events: a request as
the body of `/completion`, its streamed events as TextDeltas (with logprobs when asked), and its
error bodies as one short message."""

from __future__ import annotations

import json
import secrets
from typing import Any

from ..stream import GenerationRequest, TextDelta

_F32_TINY = 1e-30  # well inside float32, where llama.cpp keeps sampling values (1e-300 would become 0)


def error_message(text: str) -> str:
    try:
        data = json.loads(text)
        error = data.get("error", data)
        return str(error.get("message", error))[:300] if isinstance(error, dict) else str(error)[:300]
    except (ValueError, AttributeError):
        return text[:300]


def delta_of(piece: str, ids: tuple[int, ...], probs: list[dict], top_n: int) -> TextDelta:
    """A streamed event as a TextDelta; `probs` (llama.cpp's completion_probabilities) is there
    only when the caller reads logprobs."""
    if not probs:
        return TextDelta(piece, ids)

    def raw(entry: dict) -> bytes:
        return bytes(entry["bytes"]) if entry.get("bytes") is not None else str(entry.get("token", "")).encode()

    top = tuple(tuple((raw(alt), float(alt.get("logprob", 0.0))) for alt in (p.get("top_logprobs") or [])[:top_n])
                for p in probs) if top_n else ()
    return TextDelta(piece, ids, tuple(float(p.get("logprob", 0.0)) for p in probs),
                     tuple(raw(p) for p in probs), top)


def completion_body(request: GenerationRequest, ids: list[int], wanted: int, slot_id: int, reuse: bool,
                    window: int) -> dict[str, Any]:
    """The body of llama-server's native `/completion` for one request on slot `slot_id`."""
    params = request.params
    body: dict[str, Any] = {
        "prompt": ids, "n_predict": wanted, "stream": True, "return_tokens": True,
        "id_slot": slot_id, "cache_prompt": reuse,
        # llama.cpp keeps these as float32: below 1e-4 a temperature is the argmax (as on transformers),
        # and a positive penalty or top_p must stay positive after the cast
        "temperature": 0.0 if params.greedy or params.temperature < 1e-4 else params.temperature,
        "top_p": max(params.top_p, _F32_TINY), "top_k": params.top_k, "min_p": params.min_p, "typical_p": 1.0,
        "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty,
        "logit_bias": [[token, bias] for token, bias in params.logit_bias],
        "repeat_penalty": max(params.repetition_penalty, _F32_TINY), "repeat_last_n": window,
        "seed": params.seed if params.seed is not None else secrets.randbits(31),
        "stop": list(params.stop),
        "n_probs": max(1, request.top_logprobs) if request.want_logprobs else 0,
        "timings_per_token": False,
    }
    if request.output_format is not None:  # llama.cpp turns the schema into its grammar
        body["json_schema"] = request.output_format.schema
    return body
