"""POST /v1/batch: many prompts in one call, answered in order, each item on its own.

Items go through the same door as every request (rate limits, the fair share between callers, the
model's bounded queue), a few at a time: never more than the caller's share of the model
(--max-running-per-caller), so a batch of 256 items runs beside other callers' requests instead of
filling the queue before them. An item that fails is reported in its place and the others go on.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, model_validator

from llm_pool import GenerationParams, GenerationRequest
from llm_pool.errors import InvalidParamsError, ShoalError

from .auth import caller_of
from .context import services_of
from .errors import api_status
from .openai_api import ChatMessageIn
from .protocol import MaxTokens, SamplingParams, timings, usage_dict
from .tool_calls import history

router = APIRouter(tags=["batch"])
MAX_ITEMS = 256


class ClientGoneError(ShoalError):
    """Nobody reads this answer: the client left and its batch was stopped."""

    status = 499
    type = "client_closed_request"


class BatchParams(SamplingParams):
    max_new_tokens: MaxTokens = Field(None, alias="max_tokens")  # OpenAI's name, as the rest of /v1

    def merged(self, base: GenerationParams) -> GenerationParams:
        return base.updated(**self.values())


class BatchItem(BaseModel):
    prompt: str | None = Field(None, description="Text to continue, or:")
    messages: list[ChatMessageIn] | None = Field(None, description="a chat to answer.")
    model: str | None = Field(None, max_length=200, description="Overrides the batch's model.")
    params: BatchParams | None = None

    @model_validator(mode="after")
    def _one_of(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("each item needs exactly one of 'prompt' or 'messages'")
        return self


class BatchRequest(BaseModel):
    model: str | None = Field(None, max_length=200)
    items: list[BatchItem] = Field(min_length=1, max_length=MAX_ITEMS)
    params: BatchParams = Field(default_factory=BatchParams, description="Defaults for every item.")
    concurrency: int = Field(8, ge=1, le=64, description="Items in flight at once (at most the caller's share "
                             "of the model, --max-running-per-caller).")


@router.post("/v1/batch", summary="Run many prompts; results in order, failures in place")
async def batch(body: BatchRequest, request: Request) -> dict:
    services = services_of(request)
    caller = caller_of(request)
    defaults = body.params.merged(GenerationParams())
    gate = asyncio.Semaphore(services.concurrency_for(caller, body.concurrency))

    async def run(index: int, item: BatchItem) -> dict:
        async with gate:
            try:
                params = item.params.merged(defaults) if item.params else defaults
                if item.messages is not None:
                    gen = GenerationRequest(params, messages=history(item.messages))
                else:
                    if not item.prompt:
                        raise InvalidParamsError("prompt must not be empty", param=f"items.{index}.prompt")
                    gen = GenerationRequest(params, prompt=item.prompt)
                handle = await services.submit(item.model or body.model, gen, caller)
                try:
                    final = await handle.aresult()
                except asyncio.CancelledError:
                    handle.cancel()
                    raise
            except ShoalError as exc:
                return {"index": index, "ok": False, "status": api_status(exc.status, "/v1/batch"),
                        "error": exc.to_dict()}
            return {"index": index, "ok": True, "model": handle.model, "text": final.text,
                    "finish_reason": final.reason, "usage": usage_dict(final), "timings": timings(final)}

    tasks = [asyncio.create_task(run(i, item)) for i, item in enumerate(body.items)]
    everything = asyncio.gather(*tasks)

    async def watch() -> None:  # a client that leaves stops its batch: queued and running items
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        everything.cancel()

    watcher = asyncio.create_task(watch())
    try:
        results = await everything
    except asyncio.CancelledError:
        raise ClientGoneError("the client disconnected; the batch was stopped") from None
    finally:
        watcher.cancel()
        for task in tasks:
            task.cancel()
    return {"object": "batch", "results": results,
            "succeeded": sum(1 for r in results if r["ok"]), "failed": sum(1 for r in results if not r["ok"])}
