"""Translation between llama-server's native API and Shoal's requests and events: a request as
the body of `/completion`, its streamed events as TextDeltas (with logprobs when asked), and its
error bodies as one short message."""

from __future__ import annotations

import asyncio
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
    greedy = params.greedy or params.temperature < 1e-4
    body: dict[str, Any] = {
        "prompt": ids, "n_predict": wanted, "stream": True, "return_tokens": True,
        "id_slot": slot_id, "cache_prompt": reuse,
        # llama.cpp keeps these as float32: below 1e-4 a temperature is the argmax (as on transformers),
        # and a positive penalty or top_p must stay positive after the cast
        "temperature": 0.0 if greedy else params.temperature,
        # greedy: the best token either way, but llama.cpp's chain would still take a softmax
        # over the whole vocabulary for every token of every stream (49k for SmolLM2)
        "top_p": max(params.top_p, _F32_TINY), "top_k": 1 if greedy else params.top_k,
        "min_p": params.min_p, "typical_p": 1.0,
        "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty,
        "logit_bias": [[token, bias] for token, bias in params.logit_bias],
        "repeat_penalty": max(params.repetition_penalty, _F32_TINY), "repeat_last_n": window,
        "seed": params.seed if params.seed is not None else secrets.randbits(31),
        "stop": list(params.stop),
        "n_probs": max(1, request.top_logprobs) if request.want_logprobs else 0,
        "timings_per_token": False,
    }
    fmt = request.output_format
    if fmt is not None and fmt.kind == "gbnf":  # llama.cpp's own grammar format, as the caller wrote it
        body["grammar"] = fmt.gbnf_text
    elif fmt is not None:  # llama.cpp turns the schema into its grammar
        body["json_schema"] = fmt.schema
    return body


def prompt_piece_body(ids: list[int], slot_id: int, cache_prompt: bool) -> dict[str, Any]:
    """A request that only reads `ids` into slot `slot_id`'s KV (its one sampled token is dropped:
    llama-server keeps the prompt's cells only)."""
    return {"prompt": ids, "n_predict": 0, "stream": True, "id_slot": slot_id, "cache_prompt": cache_prompt,
            "temperature": 0.0, "top_k": 1, "n_probs": 0, "timings_per_token": False}


class UpstreamRefused(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(f"{status}: {text[:200]}")
        self.status, self.text = status, text


async def stream_lines(host: str, port: int, path: str, headers: dict[str, str], body: dict):
    """POST `body` as JSON and yield the streamed answer's lines (`data: {...}`), over a plain
    asyncio stream: one connection per request (loopback), the chunked body parsed here. httpx
    cost ~1 ms of Shoal's CPU per token relayed (anyio pauses and resumes the socket around every
    read, and each event goes through httpcore's h11 and three decoders); this is what remains
    between Shoal and a client of the bare server. Raises UpstreamRefused for a non-200 answer;
    closing the generator closes the connection, which stops the generation upstream."""
    payload = json.dumps(body, separators=(",", ":")).encode()
    reader, writer = await asyncio.open_connection(host, port, limit=2**22)
    try:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\nConnection: close\r\n{head}\r\n".encode() + payload)
        status_line = await reader.readline()
        status = int(status_line.split(b" ", 2)[1])
        chunked, length = False, None
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            elif name == "content-length":
                length = int(value)
        if status != 200:
            if chunked:
                text = b"".join([piece async for piece in _chunks(reader)])
            else:
                text = await (reader.readexactly(length) if length is not None else reader.read())
            raise UpstreamRefused(status, text.decode(errors="replace"))
        pending = b""
        pieces = _chunks(reader) if chunked else _plain(reader, length)
        async for piece in pieces:
            pending += piece
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.startswith((b"data:", b"error:")):
                    yield line.decode()
        if pending.startswith((b"data:", b"error:")):
            yield pending.decode()
    finally:
        writer.close()


async def _chunks(reader: asyncio.StreamReader):
    while True:
        line = await reader.readline()
        if not line:  # the server went away mid-answer (a crash): not the end of the answer
            raise ConnectionResetError("llama.cpp closed the connection before the end of its answer")
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            await reader.readline()  # the empty trailer
            return
        data = await reader.readexactly(size + 2)
        yield data[:-2]


async def _plain(reader: asyncio.StreamReader, length: int | None):
    remaining = length
    while remaining is None or remaining > 0:
        data = await reader.read(65536 if remaining is None else min(65536, remaining))
        if not data:
            if remaining is not None:
                raise ConnectionResetError("llama.cpp closed the connection before the end of its answer")
            return
        if remaining is not None:
            remaining -= len(data)
        yield data
