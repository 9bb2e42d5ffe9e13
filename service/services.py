"""Building the service objects from settings (the only place that knows all of them)."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from llm_pool import Catalog, EngineConfig, ModelPool
from llm_pool.backends import BackendContext

from .settings import Settings

log = logging.getLogger("shoal")


@dataclass
class Services:
    settings: Settings
    catalog: Catalog
    pool: ModelPool

    def preload(self) -> None:
        """Load the start-up models in the background; failures show in the model status."""
        names = self.settings.preload
        if names is None:
            names = [self.pool.default_model] if self.pool.default_model else []
        for name in names:
            threading.Thread(target=self._preload_one, args=(name,), daemon=True).start()

    def _preload_one(self, name: str) -> None:
        try:
            self.pool.load(name)
        except Exception as exc:  # shown in /v1/models and the UI
            log.warning("preloading %s failed: %s", name, exc)

    def close(self) -> None:
        self.pool.shutdown()


def ensure_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def build_services(settings: Settings) -> Services:
    data_dir = ensure_private_dir(settings.data_dir)
    catalog = Catalog.from_toml(settings.catalog, registry_path=data_dir / "registered-models.json")
    gpu_total = (torch.cuda.get_device_properties(0).total_memory
                 if settings.device != "cpu" and torch.cuda.is_available() else None)
    engine = EngineConfig(max_batch_size=settings.max_batch_size, queue_size=settings.queue_size,
                          queue_timeout=settings.queue_timeout, kv_cache_bytes=settings.kv_cache_bytes())
    context = BackendContext(cache_dir=settings.models_dir, device=settings.device, engine=engine)
    pool = ModelPool(catalog, context, settings.memory_budget_bytes(gpu_total),
                     default_model=settings.default_model, load_timeout=settings.load_timeout)
    return Services(settings=settings, catalog=catalog, pool=pool)
