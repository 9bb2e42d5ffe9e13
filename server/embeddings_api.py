"""Embeddings: POST /v1/embeddings (OpenAI's shape) and POST /api/embed (Ollama's), served by the
pool's embedding models (catalog `kind = "embedding"`; all-MiniLM-L6-v2 ships offline).

OpenAI's SDK asks for `encoding_format="base64"` by default (little-endian float32), so both
encodings are answered. Token-id inputs and `dimensions` other than the model's own are refused by
name. Same owner as generation: anyone with keys off, a key holder with keys on.
"""

from __future__ import annotations

import base64
import time
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from llm_pool.errors import InvalidParamsError

from .auth import caller_of
from .context import services_of

router = APIRouter(tags=["Embeddings"])
MAX_INPUTS = 2048


def _texts(value: str | list, param: str = "input") -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not items or len(items) > MAX_INPUTS:
        raise InvalidParamsError(f"{param}: send 1 to {MAX_INPUTS} texts", param=param)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise InvalidParamsError(f"{param}.{i}: token-id inputs are not supported; send text",
                                     param=f"{param}.{i}")
        if not item:
            raise InvalidParamsError(f"{param}.{i}: an empty text has no embedding", param=f"{param}.{i}")
    return items


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str | list[str] | list[int] | list[list[int]] = Field(description="A text or a list of texts.")
    model: str | None = Field(None, max_length=200, description="Default: the catalog's first embedding model.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=65536, description="Only the model's own size.")
    user: str | None = Field(None, max_length=256)


class OllamaEmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=200)
    input: str | list[str]
    truncate: bool | None = Field(None, description="Only false: a text longer than the model reads is "
                                  "refused, never cut.")
    keep_alive: str | int | None = Field(None, description="Not supported yet; refused when given.")
    options: dict | None = None


@router.post("/v1/embeddings", summary="Embeddings (OpenAI-compatible)")
async def embeddings(body: EmbeddingRequest, request: Request):
    texts = _texts(body.input)
    vectors, tokens, model = await services_of(request).embed(body.model, texts, caller_of(request))
    if body.dimensions is not None and body.dimensions != vectors.shape[1]:
        raise InvalidParamsError(f"dimensions: this model's embeddings have {vectors.shape[1]} dimensions",
                                 param="dimensions")
    data = []
    for i, vector in enumerate(vectors):
        value = (base64.b64encode(vector.astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
                 else vector.tolist())
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


@router.post("/api/embed", summary="Embeddings (Ollama's shape)")
async def ollama_embed(body: OllamaEmbedRequest, request: Request):
    for name in ("truncate", "keep_alive", "options"):
        value = getattr(body, name)
        if value not in (None, False) and value != {}:
            raise InvalidParamsError(f"{name}: not supported (texts are never cut; models stay loaded "
                                     "until evicted)", param=name)
    started = time.monotonic()
    vectors, tokens, model = await services_of(request).embed(body.model, _texts(body.input), caller_of(request))
    return {"model": model, "embeddings": vectors.tolist(), "prompt_eval_count": tokens,
            "total_duration": int((time.monotonic() - started) * 1e9)}
