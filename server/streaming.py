"""Turning a generation's events into a stream for a client, and cancelling it when they leave.

`chunked(handle, chunk_size, delay_ms)` groups text deltas into chunks of at least `chunk_size`
tokens (never an empty one) and paces them; whatever the transport, the consumer's `finally` cancels the handle, so a
client that disconnects (the ASGI server cancels the response task) frees its batch slot at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llm_pool.stream import Failed, Finished, GenerationHandle, TextDelta


@dataclass(frozen=True)
class Chunk:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    token_bytes: tuple[bytes, ...] = ()  # filled when the request wants logprobs
    top: tuple[tuple[tuple[bytes, float], ...], ...] = ()


def _join(a: Chunk, b: TextDelta | Chunk) -> Chunk:
    return Chunk(a.text + b.text, a.token_ids + b.token_ids, a.logprobs + b.logprobs,
                 a.token_bytes + b.token_bytes, a.top + b.top)


def joined(chunks: list[Chunk]) -> Chunk:
    whole = Chunk("", (), ())
    for chunk in chunks:
        whole = _join(whole, chunk)
    return whole


async def chunked(handle: GenerationHandle, chunk_size: int = 1,
                  delay_ms: int = 0) -> AsyncIterator[Chunk | Finished | Failed]:
    """Yield Chunk (>= chunk_size tokens, except the last), then Finished or Failed."""
    empty = Chunk("", (), ())
    pending = empty
    try:
        async for event in handle:
            if isinstance(event, TextDelta):
                pending = _join(pending, event)
                # a token with no text of its own yet (the end-of-text token, half a character) goes
                # with the next text: no client is sent an empty delta
                if len(pending.token_ids) >= chunk_size and pending.text:
                    yield pending
                    pending = empty
                    if delay_ms:
                        await asyncio.sleep(delay_ms / 1000)
                continue
            if pending.text:
                yield pending
            yield event
            return
    finally:
        handle.cancel()  # no-op when finished; stops generation when the client went away


async def result_or_disconnect(handle: GenerationHandle, request, chunks: list[Chunk] | None = None) -> Finished:
    """The whole result of a non-streamed request; if the client goes away first (while queued
    or while generating), the generation is cancelled so its slot is freed at once. With
    `chunks`, the text's pieces (with their logprobs) are collected there too."""
    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        handle.cancel()

    watcher = asyncio.create_task(watch())
    try:
        if chunks is None:
            return await handle.aresult()
        async for item in chunked(handle):
            if isinstance(item, Chunk):
                chunks.append(item)
            elif isinstance(item, Failed):
                raise item.error
            else:
                return item
        raise RuntimeError("the stream ended without a result")
    finally:
        watcher.cancel()


async def merged(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Items of several streams as they come, as (stream index, item). Closing this (a client that
    went away) cancels every stream, whose own cleanup then cancels its generation. One stream
    (nearly every request) is read in place: no task and no queue hop per token."""
    if len(streams) == 1:
        only = streams[0]
        try:
            async for item in only:
                yield 0, item
        finally:
            await only.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
        finally:
            queue.put_nowait((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
