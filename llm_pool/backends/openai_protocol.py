"""OpenAI-protocol servers (vLLM, llama.cpp, Ollama, `transformers serve`, another Shoal) through `openai`.

Owns the `AsyncOpenAI` client of each replica, the health URL (`/models`), and the mapping of a
request onto `chat.completions` or `completions` with streamed usage; parameters the protocol
lacks (top_k, repetition_penalty) travel in `extra_body`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx

from ..chat_format import generic_messages
from ..stream import GenerationRequest
from .protocols import Piece, ProtocolAdapter


class OpenAIProtocol(ProtocolAdapter):
    name = "openai"

    async def open_client(self, url: str) -> Any:
        from openai import AsyncOpenAI

        timeout = httpx.Timeout(self.timeout, connect=self.connect_timeout)
        limits = httpx.Limits(max_connections=self.max_connections)
        return AsyncOpenAI(
            base_url=url,
            api_key=self.api_key,
            max_retries=0,
            timeout=timeout,
            http_client=httpx.AsyncClient(timeout=timeout, limits=limits),
        )

    def health_url(self, url: str) -> str:
        return f"{url}/models"

    async def pieces(self, client: Any, request: GenerationRequest) -> AsyncIterator[Piece]:
        params = request.params
        common: dict[str, Any] = {
            "model": self.upstream_model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.max_new_tokens:
            common["max_tokens"] = params.max_new_tokens
        if params.seed is not None:
            common["seed"] = params.seed
        if params.stop:
            common["stop"] = list(params.stop)
        if params.presence_penalty:
            common["presence_penalty"] = params.presence_penalty
        if params.frequency_penalty:
            common["frequency_penalty"] = params.frequency_penalty
        if params.logit_bias:
            common["logit_bias"] = {str(token): bias for token, bias in params.logit_bias}
        extra = {
            k: v
            for k, v in (("top_k", params.top_k), ("repetition_penalty", params.repetition_penalty),
                         ("min_p", params.min_p))
            if v not in (0, 1.0)
        }
        if extra:
            common["extra_body"] = extra
        try:
            if request.messages is not None:
                stream = await client.chat.completions.create(
                    messages=generic_messages(request.messages, request.tool_prompt), **common
                )
            else:
                stream = await client.completions.create(prompt=request.prompt, **common)
        except Exception as exc:
            raise self.translate(exc) from exc
        try:
            async for chunk in stream:
                usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens) if chunk.usage else None
                if not chunk.choices:
                    yield "", None, usage
                    continue
                choice = chunk.choices[0]
                piece = choice.delta.content if request.messages is not None else choice.text
                yield piece or "", choice.finish_reason, usage
        finally:
            await stream.close()
