"""Prometheus metrics: requests, tokens, time to first token, latency, queue depth, residency.

Each `Metrics` has its own registry (several apps can live in one process, as in tests). Counters
and histograms are fed by `observe(handle)` when a generation ends; gauges about the pool (queue
depth, batch size, models resident, memory) are read from the pool at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llm_pool import Finished, GenerationHandle, ModelPool
from llm_pool.stream import Failed

_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60)
_LATENCY_BUCKETS = (0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class _PoolCollector:
    def __init__(self, pool: ModelPool):
        self.pool = pool

    def collect(self):
        waiting = GaugeMetricFamily("shoal_queue_depth", "Requests waiting for a batch slot", labels=["model"])
        running = GaugeMetricFamily("shoal_batch_size", "Requests generating now", labels=["model"])
        state = GaugeMetricFamily("shoal_model_ready", "1 when the model version is resident",
                                  labels=["model", "version"])
        memory = GaugeMetricFamily("shoal_model_memory_bytes", "Memory counted for the model version",
                                   labels=["model", "version"])
        for model in self.pool.models():
            for version in model["versions"]:
                queue = version["queue"]
                waiting.add_metric([version["id"]], queue.get("waiting", 0))
                running.add_metric([version["id"]], queue.get("running", 0))
                state.add_metric([version["name"], version["version"]], 1 if version["state"] == "ready" else 0)
                memory.add_metric([version["name"], version["version"]], version["resident_bytes"])
        yield waiting
        yield running
        yield state
        yield memory
        disk = self.pool.context.kv_disk
        if disk is not None:
            stats = disk.stats()
            for name, key, what in (("restores", "restores", "Chat turns whose KV was read back from disk"),
                                    ("restored_tokens", "restored_tokens", "Prompt tokens read back from disk"),
                                    ("restore_seconds", "restore_seconds", "Seconds spent reading KV back from disk"),
                                    ("misses", "misses", "Chat turns with no KV in memory or on disk"),
                                    ("writes", "writes", "KV files written"),
                                    ("written_bytes", "written_bytes", "Bytes of KV files written"),
                                    ("evictions", "evictions", "KV files deleted for the disk budget"),
                                    ("rejected", "rejected", "KV files that failed their checksum (ignored)")):
                yield CounterMetricFamily(f"shoal_kv_disk_{name}", what, value=stats[key])
            yield GaugeMetricFamily("shoal_kv_disk_bytes", "Bytes of chats' KV kept on disk", value=stats["bytes"])
            yield GaugeMetricFamily("shoal_kv_disk_files", "Chats' KV files on disk", value=stats["files"])
            yield GaugeMetricFamily("shoal_kv_disk_budget_bytes", "--kv-disk-budget", value=stats["budget_bytes"])
        yield GaugeMetricFamily("shoal_models_resident", "Model versions resident", value=self.pool.ready_count())
        yield GaugeMetricFamily("shoal_memory_used_bytes", "Memory counted against the budget",
                                value=self.pool.resident_bytes())
        yield GaugeMetricFamily("shoal_memory_budget_bytes", "The pool's memory budget", value=self.pool.budget)


class Metrics:
    def __init__(self, pool: ModelPool):
        self.registry = CollectorRegistry()
        self.requests = Counter("shoal_requests", "Generation requests by outcome",
                                ["model", "outcome"], registry=self.registry)
        self.rejected = Counter("shoal_rejected_requests", "Requests refused before generating",
                                ["reason"], registry=self.registry)
        self.prompt_tokens = Counter("shoal_prompt_tokens", "Prompt tokens processed", ["model"],
                                     registry=self.registry)
        self.cached_tokens = Counter("shoal_cached_prompt_tokens", "Prompt tokens served from the prefix cache",
                                     ["model"], registry=self.registry)
        self.generated_tokens = Counter("shoal_generated_tokens", "Tokens generated", ["model"],
                                        registry=self.registry)
        self.ttft = Histogram("shoal_time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.latency = Histogram("shoal_request_duration_seconds", "Time from submit to the last token",
                                 ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_PoolCollector(pool))

    def observe(self, handle: GenerationHandle) -> None:
        final = handle.final
        model = handle.model
        if isinstance(final, Failed):
            self.requests.labels(model, "error").inc()
            return
        if not isinstance(final, Finished):
            return
        self.requests.labels(model, final.reason).inc()
        self.prompt_tokens.labels(model).inc(final.usage.prompt_tokens)
        self.cached_tokens.labels(model).inc(final.usage.cached_tokens)
        self.generated_tokens.labels(model).inc(final.usage.completion_tokens)
        if final.ttft is not None:
            self.ttft.labels(model).observe(final.ttft)
        self.latency.labels(model).observe(final.duration)

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
