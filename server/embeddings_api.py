"""Embeddings: POST /v1/embeddings (OpenAI's shape) and POST /api/embed (Ollama's), served by the
pool's embedding models (catalog `kind = "embedding"`; all-MiniLM-L6-v2 ships offline).

OpenAI's SDK asks for `encoding_format="base64"` by default (little-endian float32), so both
encodings are answered. `input` may be token ids as OpenAI allows (a list of ints: one text; a
list of lists: several), fed to the model as they are and checked against its vocabulary;
`dimensions` other than the model's own is refused by name. Same owner as generation: anyone
with keys off, a key holder with keys on. Each request is bounded in tokens
(--max-embedding-tokens, 413) and waits for its caller's turn (`Services.embed`); a client that
leaves while it waits gives up its place.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from llm_pool.errors import InvalidParamsError, ShoalError

from .auth import caller_of
from .context import services_of

router = APIRouter(tags=["Embeddings"])
MAX_INPUTS = 2048


async def _embed(request: Request, model: str | None, texts: list[str], keep_alive=None):
    """`Services.embed`, given up when the client disconnects (while it waits for its turn)."""
    work = asyncio.ensure_future(services_of(request).embed(model, texts, caller_of(request), keep_alive))

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        work.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    finally:
        watcher.cancel()


def _texts(value: str | list, param: str = "input", ids: bool = False) -> list:
    """The inputs as a list: texts, or (with `ids`, OpenAI's forms) lists of token ids, where a
    flat list of ints is one text's tokens."""
    items = [value] if isinstance(value, str) or (ids and _token_list(value)) else value
    if not items or len(items) > MAX_INPUTS:
        raise InvalidParamsError(f"{param}: send 1 to {MAX_INPUTS} texts", param=param)
    for i, item in enumerate(items):
        if not isinstance(item, str) and not (ids and _token_list(item)):
            raise InvalidParamsError(f"{param}.{i}: send a text" + (" or a list of token ids" if ids else ""),
                                     param=f"{param}.{i}")
        if not item:
            raise InvalidParamsError(f"{param}.{i}: an empty input has no embedding", param=f"{param}.{i}")
    if ids and len({isinstance(item, str) for item in items}) > 1:
        raise InvalidParamsError(f"{param}: send texts or lists of token ids, not both", param=param)
    return items


def _token_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text, a list of texts, one text's token ids, or a list of them (this model's ids).")
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
    keep_alive: str | float | None = Field(None, description="How long the model stays loaded once idle "
                                           "(Ollama's meaning: seconds, '5m', 0, -1); admins only.")
    options: dict | None = None


@router.post("/v1/embeddings", summary="Embeddings (OpenAI-compatible)")
async def embeddings(body: EmbeddingRequest, request: Request):
    texts = _texts(body.input, ids=True)
    try:
        vectors, tokens, model = await _embed(request, body.model, texts)
    except ShoalError as exc:  # one text sent as a flat list of ids: its problems are input's, not input.0's
        if exc.param == "input.0" and _token_list(body.input):
            exc.param, exc.message = "input", exc.message.replace("input.0", "input", 1)
        raise
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
    for name in ("truncate", "options"):
        value = getattr(body, name)
        if value not in (None, False) and value != {}:
            raise InvalidParamsError(f"{name}: not supported (texts are never cut, not truncated)", param=name)
    started = time.monotonic()
    vectors, tokens, model = await _embed(request, body.model, _texts(body.input), keep_alive=body.keep_alive)
    return {"model": model, "embeddings": vectors.tolist(), "prompt_eval_count": tokens,
            "total_duration": int((time.monotonic() - started) * 1e9)}


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=200, description="Default: the catalog's first embedding model.")
    query: str = Field(min_length=1, description="What the documents are ranked against.")
    documents: list[str] = Field(min_length=1, max_length=MAX_INPUTS - 1)
    top_n: int | None = Field(None, ge=1, description="Return only the best n (default: all).")
    return_documents: bool = Field(False, description="Include each document's text in its result.")


@router.post("/v1/rerank", summary="Rank documents against a query (the Jina/Cohere shape llama.cpp and vLLM use)")
@router.post("/rerank", include_in_schema=False)
async def rerank(body: RerankRequest, request: Request):
    """Scores are the cosine similarity of the embedding model's vectors (a bi-encoder: no
    cross-encoder ships offline), best first."""
    texts = [body.query, *_texts(body.documents, param="documents")]
    try:
        vectors, tokens, model = await _embed(request, body.model, texts)
    except ShoalError as exc:  # the model numbers the texts as input.N: name them as this request does
        if exc.param == "input":
            exc.param, exc.message = "documents", exc.message.replace("input:", "query and documents:", 1)
        elif exc.param and exc.param.startswith("input."):
            index = int(exc.param.split(".")[1])
            exc.param = "query" if index == 0 else f"documents.{index - 1}"
            exc.message = exc.message.replace(f"input.{index}", exc.param, 1)
        raise
    scores = (vectors[1:] @ vectors[0]).tolist()  # the vectors are normalized
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[: body.top_n or len(scores)]
    results = [{"index": i, "relevance_score": scores[i],
                **({"document": {"text": body.documents[i]}} if body.return_documents else {})} for i in order]
    return {"object": "list", "model": model, "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
