"""How a model's engine is sized: batch slots, queue, KV budget. No torch here: the pool, the
llama.cpp engine and the service read it without loading the transformers engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 16
    queue_size: int = 64
    queue_timeout: float = 120.0
    kv_cache_bytes: int = 512 * 2**20  # running batch + prefix cache
    llamacpp_kv_bytes: int | None = None  # llama.cpp's KV cap (None: kv_cache_bytes)
    prefix_cache_share: float = 0.25  # part of kv_cache_bytes kept for finished prefixes
    min_prefix_tokens: int = 16
    # transformers: "ragged" (per-row KV, chunked prefill), "padded" (one shared buffer), "auto";
    # llama.cpp: "ragged" = one KV per slot, each the whole window; "padded" = one unified KV;
    # "auto" = per slot when the KV cap holds window x slots
    layout: str = "auto"
    prefill_chunk: int = 256  # ragged: prompt tokens prefilled per step beside the running rows
    llamacpp_batch: int = 512  # llama.cpp's -b/-ub: prompt tokens per step (a long prompt beside running streams: 128)
    bypass_seconds: float = 5.0  # a queued job that does not fit yet lets later ones pass this long


__all__ = ["EngineConfig"]
