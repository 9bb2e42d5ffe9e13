"""What every route needs from the request: the services, the caller, admission to a model."""

from __future__ import annotations

from fastapi import Request

from llm_pool import GenerationHandle, GenerationRequest
from service import Services

from .auth import caller_of


def services_of(request: Request) -> Services:
    return request.app.state.services


async def admit(request: Request, model: str | None, gen: GenerationRequest,
                cache_salt: str | None = None, keep_alive=None) -> GenerationHandle:
    """Start a generation for this caller: rate limits, on-demand load, bounded queue; cached
    prefixes shared only with the same user, or with the same `cache_salt`. `keep_alive`
    (Ollama's meaning; admins only) sets how long the model stays loaded once idle."""
    caller = caller_of(request).with_cache_salt(cache_salt)
    return await services_of(request).submit(model, gen, caller, keep_alive)
