"""Load-time benchmark: cold GGUF load (conversion), cached reload, hot-swap, per model.

    .venv/bin/python bench/load_times.py [--models smollm2-135m gemma3-270m]

Cold loads convert into a fresh temporary cache; cached loads reuse it (as every start after the
first does). The hot-swap row times `swap` from one version to another of the same weights
under a light stream of requests, and counts failed requests (there should be none). Prints a
Markdown table; figures are for this machine and vary by about 20% between runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_pool import Catalog, EngineConfig, GenerationParams, GenerationRequest, Message, ModelPool  # noqa: E402
from llm_pool.backends import BackendContext  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def timed_load(pool: ModelPool, name: str) -> float:
    started = time.monotonic()
    pool.load(name)
    return time.monotonic() - started


def swap_under_load(catalog: Catalog, cache: Path, name: str, folder: str) -> tuple[float, int, int]:
    """Swap to a second version (the same weights from the converted folder) under traffic."""
    base = catalog.get(name)
    twin = replace(base, version=base.version + "-twin", source="local", location=folder, file=None, assemble=False)
    pool = ModelPool(Catalog([base, twin]), BackendContext(cache_dir=cache), 16 * 2**30)
    pool.load(name)
    stop, done, failed = threading.Event(), [0], [0]

    def client():
        params = GenerationParams.validated(temperature=0, max_new_tokens=8)
        while not stop.is_set():
            request = GenerationRequest(params, messages=[Message("user", "Hi")]) if base.kind == "chat" \
                else GenerationRequest(params, prompt="Hello")
            try:
                pool.submit(name, request).result(120)
                done[0] += 1
            except Exception:
                failed[0] += 1

    threads = [threading.Thread(target=client) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    started = time.monotonic()
    pool.swap(name, twin.version)
    took = time.monotonic() - started
    time.sleep(1)
    stop.set()
    for thread in threads:
        thread.join()
    pool.shutdown()
    return took, done[0], failed[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    args = parser.parse_args()
    catalog = Catalog.from_toml(ROOT / "models.toml")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        for name in args.models:
            pool = ModelPool(catalog, BackendContext(cache_dir=cache, engine=EngineConfig()), 16 * 2**30)
            cold = timed_load(pool, name)
            status = pool.status(name)
            pool.unload(name)
            cached = timed_load(pool, name)
            folder = pool.backend(name)._prepared.location
            pool.shutdown()
            swap, served, failed = swap_under_load(catalog, cache, name, folder)
            rows.append(f"| {name} | {status['parameters'] / 1e6:.0f} M | {status['resident_bytes'] / 1e9:.2f} GB | "
                        f"{cold:.1f} s | {cached:.1f} s | {swap:.1f} s ({served} served, {failed} failed) |")
    print("| model | parameters | memory (weights + KV budget) | cold GGUF load | cached load | hot-swap |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
