"""TGI-protocol servers (text-generation-inference and compatibles) through `huggingface_hub`.

Owns the `AsyncInferenceClient` of each replica, the health URL (`/health`), and the mapping of a
request onto `chat_completion` (messages) or `text_generation` with details (a prompt); greedy
decoding unless the request samples.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ..chat_format import generic_messages
from ..errors import InvalidRequestError
from ..stream import GenerationRequest
from .protocols import Piece, ProtocolAdapter


class TGIProtocol(ProtocolAdapter):
    name = "tgi"

    async def open_client(self, url: str) -> Any:
        from huggingface_hub import AsyncInferenceClient

        return AsyncInferenceClient(
            base_url=url,
            timeout=self.timeout,
            api_key=None if self.api_key == "unused" else self.api_key,
        )

    def health_url(self, url: str) -> str:
        return f"{url}/health"

    async def pieces(self, client: Any, request: GenerationRequest) -> AsyncIterator[Piece]:
        params = request.params
        for name in ("min_p", "presence_penalty", "logit_bias"):
            if getattr(params, name):
                raise InvalidRequestError(f"{name}: not forwarded to a TGI server (TGI has no such parameter)",
                                          param=name)
        sampling = params.temperature > 0
        kwargs: dict[str, Any] = {"max_new_tokens": params.max_new_tokens or 512, "stream": True}
        if sampling:
            kwargs.update(
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p if params.top_p < 1 else None,
                top_k=params.top_k or None,
            )
        if params.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = params.repetition_penalty
        if params.frequency_penalty:
            kwargs["frequency_penalty"] = params.frequency_penalty
        if params.seed is not None:
            kwargs["seed"] = params.seed
        if params.stop:
            kwargs["stop"] = list(params.stop)
        if request.messages is not None:
            try:
                stream = await client.chat_completion(
                    generic_messages(request.messages, request.tool_prompt),
                    max_tokens=kwargs["max_new_tokens"],
                    temperature=params.temperature if sampling else 0.0,
                    seed=params.seed,
                    stop=list(params.stop) or None,
                    frequency_penalty=params.frequency_penalty or None,
                    stream=True,
                )
            except Exception as exc:
                raise self.translate(exc) from exc
            async for chunk in stream:
                choice = chunk.choices[0] if chunk.choices else None
                yield (
                    (choice.delta.content or "") if choice else "",
                    choice.finish_reason if choice else None,
                    None,
                )
            return
        try:
            stream = await client.text_generation(request.prompt, details=True, **kwargs)
        except Exception as exc:
            raise self.translate(exc) from exc
        async for event in stream:
            details = event.details
            reason = None
            if details is not None:
                reason = {"length": "length"}.get(details.finish_reason, "stop")
            usage = (0, details.generated_tokens) if details is not None else None
            yield event.token.text if not event.token.special else "", reason, usage
