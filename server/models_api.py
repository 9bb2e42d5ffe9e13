"""Health and model-management routes: list, inspect, load, unload, pin, swap, register.

Owners: `/health` and `/health/ready`, anyone; listing and inspecting models, a user (anyone when
keys are off; where a model's files or servers are is shown to admins only); everything that
changes the pool, an admin (`admin_caller`: 403 for anyone else, with how to become one).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from llm_pool import spec_from_dict
from llm_pool.params import keep_alive_seconds

from .auth import admin_caller, caller_of
from .context import services_of

router = APIRouter()
Admin = Depends(admin_caller)


def _openai_item(status: dict[str, Any], admin: bool) -> dict[str, Any]:
    item = {**status, "id": status["name"], "object": "model",
            "created": int(status.get("loaded_at") or 0), "owned_by": "shoal",
            "version_id": status["id"]}
    if not admin:  # paths and server addresses are the operator's business
        item.pop("location", None)
        if item.get("replicas"):
            item["replicas"] = [{k: v for k, v in r.items() if k != "url"} for r in item["replicas"]]
        if item.get("versions"):
            item["versions"] = [_openai_item(v, False) for v in item["versions"]]
    return item


@router.get("/health", tags=["health"], summary="Liveness: the process answers")
async def health() -> dict:
    return {"status": "ok", "time": time.time()}


@router.get("/health/ready", tags=["health"], summary="Readiness, with each model's state")
async def ready(request: Request):
    pool = services_of(request).pool
    models = {m["name"]: {"state": m["state"], "version": m["version"], "progress": m["progress"],
                          "error": m["error"]} for m in pool.models()}
    default = pool.default_model
    is_ready = default is not None and models.get(default.split("@")[0], {}).get("state") == "ready" \
        and not services_of(request).draining
    from fastapi.responses import JSONResponse
    return JSONResponse({"status": "ready" if is_ready else "starting", "default_model": default,
                         "models": models}, status_code=200 if is_ready else 503)


@router.get("/v1/models", tags=["models"], summary="List models (OpenAI-compatible, with Shoal's fields)")
async def list_models(request: Request) -> dict:
    admin = caller_of(request).admin
    return {"object": "list", "data": [_openai_item(m, admin) for m in services_of(request).pool.models()]}


@router.get("/v1/models/{name}", tags=["models"], summary="One model: versions, state, memory, figures")
async def get_model(name: str, request: Request) -> dict:
    pool = services_of(request).pool
    entry_status = pool.status(name)
    versions = [pool.status(f"{entry_status['name']}@{spec.version}")
                for spec in pool.catalog.versions(entry_status["name"])]
    return _openai_item({**entry_status, "versions": versions}, caller_of(request).admin)


class LoadOptions(BaseModel):
    timeout: float | None = Field(None, gt=0, le=3600, description="Seconds to wait for the load.")


@router.post("/v1/models/{name}/load", tags=["models"], summary="Load now (waits until ready)")
async def load_model(name: str, request: Request, wait: bool = Query(True),
                     keep_alive: str | None = Query(None, description="How long it stays loaded once idle "
                                                    "(Ollama's meaning: 300, '5m', 0, -1 = until evicted)"),
                     _admin=Admin) -> dict:
    pool = services_of(request).pool
    if keep_alive is not None:
        pool.set_keep_alive(name, keep_alive_seconds(keep_alive))
    if not wait:
        pool.resolve(name)  # 404 for unknown names
        import threading
        threading.Thread(target=_load_quietly, args=(pool, name), daemon=True).start()
        return pool.status(name)
    return await run_in_threadpool(pool.load, name)


def _load_quietly(pool, name: str) -> None:
    try:
        pool.load(name)
    except Exception:  # the failure shows as the model's state and error
        pass


@router.post("/v1/models/{name}/unload", tags=["models"], summary="Unload once in-flight requests finish")
async def unload_model(name: str, request: Request, _admin=Admin) -> dict:
    return await run_in_threadpool(services_of(request).pool.unload, name)


@router.post("/v1/models/{name}/pin", tags=["models"], summary="Keep resident: never evicted")
async def pin_model(name: str, request: Request, _admin=Admin) -> dict:
    return await run_in_threadpool(services_of(request).pool.pin, name)


@router.post("/v1/models/{name}/unpin", tags=["models"], summary="Allow eviction again")
def unpin_model(name: str, request: Request, _admin=Admin) -> dict:
    return services_of(request).pool.unpin(name)


class SwapRequest(BaseModel):
    version: str = Field(min_length=1, max_length=64, description="The version to serve from now on.")


@router.post("/v1/models/{name}/swap", tags=["models"],
             summary="Hot-swap to a version: load beside, flip, drain, unload the old one")
async def swap_model(name: str, body: SwapRequest, request: Request, _admin=Admin) -> dict:
    return await run_in_threadpool(services_of(request).pool.swap, name, body.version)


@router.post("/v1/models/{name}/rollback", tags=["models"], summary="Swap back to the previous version")
async def rollback_model(name: str, request: Request, _admin=Admin) -> dict:
    return await run_in_threadpool(services_of(request).pool.rollback, name)


class RegisterModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=64)
    source: str = Field(description="pypi, gguf, local, hub, openai or tgi")
    location: str = Field(min_length=1, max_length=2048)
    kind: str = "chat"
    file: str | None = Field(None, max_length=1024)
    assemble: bool = False
    dtype: str = "auto"
    quantization: str | None = None
    device: str = "auto"
    engine: str = Field("auto", description="auto, transformers or llama.cpp (GGUF files on the CPU)")
    context_length: int | None = Field(None, ge=16, le=10_000_000)
    description: str = Field("", max_length=1000)
    chat_template: str | None = Field(None, max_length=100_000)
    replicas: list[str] = Field(default_factory=list, max_length=64)
    remote_model: str | None = Field(None, max_length=200)
    options: dict[str, Any] = Field(default_factory=dict, description="Remote sources: timeout, connect_timeout, "
                                    "max_connections, retries, health_interval, api_key (kept 0600, never shown)")


@router.post("/v1/models", tags=["models"], status_code=201,
             summary="Register a model, or a new version of one, from a source")
async def register_model(body: RegisterModel, request: Request, _admin=Admin) -> dict:
    services = services_of(request)
    spec = spec_from_dict(body.model_dump())
    if services.pool.context.policy is not None:  # resolves host names: off the event loop
        await run_in_threadpool(services.pool.context.policy.check, spec)
    services.catalog.register(spec)
    return services.pool.status(spec.key)
