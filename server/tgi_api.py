"""TGI-protocol routes: POST /generate, /generate_stream and POST / (as TGI answers).

So `huggingface_hub.InferenceClient(base_url=...)` and TGI clients work unchanged. Parameters TGI
has and Shoal does not (watermark, best_of > 1, ...) are refused with TGI's own "model_kwargs are
not used" message, which InferenceClient understands and retries without; `grammar` (json, regex)
is enforced while decoding; unknown fields are refused by name.
"""

from __future__ import annotations

import json
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from llm_pool import Finished, GenerationParams, GenerationRequest
from llm_pool.constraints import OutputFormat
from llm_pool.errors import InvalidParamsError
from llm_pool.stream import Failed

from .context import admit
from .errors import error_body
from .protocol import FrequencyPenalty, MaxTokens, RepetitionPenalty, Seed, StopList, TopK, TopP
from .streaming import SSE_HEADERS, Chunk, chunked, result_or_disconnect, sse

router = APIRouter(tags=["TGI-compatible"])

UNSUPPORTED = ("watermark", "top_n_tokens", "typical_p", "adapter_id", "decoder_input_details")


class TGIGrammar(BaseModel):
    """TGI's `grammar`: {"type": "json", "value": <JSON schema>} or {"type": "regex", "value": "..."}."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["json", "regex", "json_schema"]
    value: dict | str

    def output_format(self) -> OutputFormat:
        value = self.value
        if self.type == "regex":
            if not isinstance(value, str):
                raise InvalidParamsError("grammar.value: a regex grammar's value is a string", param="grammar.value")
            return OutputFormat.regex(value, param="grammar.value")
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise InvalidParamsError("grammar.value: not valid JSON", param="grammar.value") from None
        if self.type == "json_schema" and isinstance(value, dict) and isinstance(value.get("schema"), dict):
            value = value["schema"]
        return OutputFormat.json(value, param="grammar.value")


class TGIParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: MaxTokens = None
    temperature: float | None = Field(None, gt=0, le=2, description="TGI's: above 0 (do_sample decides).")
    top_p: TopP = None
    top_k: TopK = None
    repetition_penalty: RepetitionPenalty = None
    do_sample: bool | None = None
    seed: Seed = None
    stop: StopList = None
    details: bool = False
    return_full_text: bool | None = False
    best_of: int | None = Field(None, ge=1, le=1)
    truncate: int | None = None
    grammar: TGIGrammar | None = None
    watermark: bool | None = None
    top_n_tokens: int | None = None
    typical_p: float | None = None
    adapter_id: str | None = None
    frequency_penalty: FrequencyPenalty = None
    decoder_input_details: bool | None = None

    def output_format(self) -> OutputFormat | None:
        return self.grammar.output_format() if self.grammar else None

    def to_params(self) -> GenerationParams:
        sampling = self.do_sample or any(v is not None for v in (self.temperature, self.top_p, self.top_k)) \
            and self.do_sample is not False
        return GenerationParams.validated(
            max_new_tokens=self.max_new_tokens, temperature=(self.temperature or 1.0) if sampling else 0.0,
            top_p=self.top_p, top_k=self.top_k, repetition_penalty=self.repetition_penalty,
            seed=self.seed, stop=self.stop, frequency_penalty=self.frequency_penalty)


class TGIRequest(BaseModel):
    inputs: str = Field(min_length=1, max_length=4_000_000, description="The prompt.")
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False
    model: str | None = Field(None, max_length=200, description="Shoal extension: which model.")


def _unsupported(params: TGIParameters) -> JSONResponse | None:
    used = [name for name in UNSUPPORTED if getattr(params, name)]
    if not used:
        return None
    names = ", ".join(f"'{n}'" for n in used)
    return JSONResponse(error_body(f"The following `model_kwargs` are not used by the model: [{names}]",
                                   "invalid_request_error", used[0]), status_code=400)


def _token_list(ids: tuple[int, ...], logprobs: tuple[float, ...], text: str) -> list[dict]:
    """TGI sends one event per token; a delta may cover several ids (multi-token characters):
    the text goes with the last of them."""
    return [{"id": tid, "logprob": lp, "special": False, "text": text if i == len(ids) - 1 else ""}
            for i, (tid, lp) in enumerate(zip(ids, logprobs))]


@router.post("/generate", summary="Generate (TGI protocol)")
async def generate(body: TGIRequest, request: Request):
    if body.stream:
        return await generate_stream(body, request)
    refused = _unsupported(body.parameters)
    if refused:
        return refused
    gen = GenerationRequest(body.parameters.to_params(), prompt=body.inputs,
                            output_format=body.parameters.output_format())
    handle = await admit(request, body.model, gen)
    final = await result_or_disconnect(handle, request)
    text = (body.inputs if body.parameters.return_full_text else "") + final.text
    out: dict = {"generated_text": text}
    if body.parameters.details:
        out["details"] = {"finish_reason": _finish(final), "generated_tokens": final.usage.completion_tokens,
                          "seed": body.parameters.seed, "prefill": [], "tokens": []}
    return out


@router.post("/generate_stream", summary="Generate, streamed as server-sent events (TGI protocol)")
async def generate_stream(body: TGIRequest, request: Request):
    refused = _unsupported(body.parameters)
    if refused:
        return refused
    handle = await admit(request, body.model, GenerationRequest(body.parameters.to_params(), prompt=body.inputs,
                                                                 want_logprobs=True,
                                                                 output_format=body.parameters.output_format()))
    seed = body.parameters.seed

    async def events():
        pending: list[dict] = []
        async for item in chunked(handle):
            if isinstance(item, Chunk):
                for token in pending:
                    yield sse({"index": 0, "token": token, "generated_text": None, "details": None})
                pending = _token_list(item.token_ids, item.logprobs, item.text)
            elif isinstance(item, Finished):
                last = pending.pop() if pending else {"id": 0, "logprob": 0.0, "special": True, "text": ""}
                for token in pending:
                    yield sse({"index": 0, "token": token, "generated_text": None, "details": None})
                yield sse({"index": 0, "token": last, "generated_text": item.text,
                           "details": {"finish_reason": _finish(item),
                                       "generated_tokens": item.usage.completion_tokens, "seed": seed}})
            elif isinstance(item, Failed):
                yield sse({"error": item.error.message, "error_type": "generation"})

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/", summary="TGI root route: generate, or generate_stream when stream=true")
async def tgi_root(body: TGIRequest, request: Request):
    if body.stream:
        return await generate_stream(body, request)
    result = await generate(body, request)
    return [result] if isinstance(result, dict) else result


def _finish(final: Finished) -> str:
    if final.reason == "stop":
        return "stop_sequence" if final.stopped_by == "stop_sequence" else "eos_token"
    return final.reason
