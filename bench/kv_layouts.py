"""KV layouts of a bare `llama-server`, side by side: which one should Shoal's llama.cpp engine use?

    .venv/bin/python bench/kv_layouts.py                  # 1/16/32 clients, 128 tokens, ~10 minutes
    .venv/bin/python bench/kv_layouts.py --clients 16 --layouts split-fa-q8 unified

Each layout is the same build and GGUF (SmolLM2 Q4_1) started with nothing in front, driven by
streaming `/v1/chat/completions` clients (bench/throughput.py's), two rounds alternating the
layouts. Reported: aggregate tok/s, TTFT p50, and the server's resident memory.

- `readme`: `-np N`, defaults otherwise (llama.cpp's README for N clients; each slot gets the
  default context divided by N, so a request may use 8192/N tokens).
- `unified`: Shoal's flags before issue 25 (`-kvu`, a KV of what 512 MiB holds, each slot up to
  the 8k window).
- `split*`: one KV stream per slot, each holding the whole window (`-c window x N`): every request
  Shoal accepts fits, and a stream's attention runs over its own cells only.
- `-fa`: flash attention; `-q8`: q8_0 K and V (half the bytes of f16).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import api_run, free_port, percentile, server_rss  # noqa: E402

WINDOW = 8192


def layouts(clients: int) -> dict[str, list[str]]:
    full = str(WINDOW * clients)
    return {
        "readme": ["-np", str(clients)],
        "unified": ["-np", str(clients), "-c", "23296", "-kvu", "--kv-unified-per-slot", str(WINDOW)],
        "unified-fa": ["-np", str(clients), "-c", "23296", "-kvu", "--kv-unified-per-slot", str(WINDOW),
                       "-fa", "on"],
        "unified-fa-q8": ["-np", str(clients), "-c", "23296", "-kvu", "--kv-unified-per-slot", str(WINDOW),
                          "-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0"],
        "split": ["-np", str(clients), "-c", full],
        "split-fa": ["-np", str(clients), "-c", full, "-fa", "on"],
        "split-fa-q8": ["-np", str(clients), "-c", full, "-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0"],
    }


def gguf() -> Path:
    from llm_pool import Catalog
    from llm_pool.sources import locate_gguf

    spec = Catalog.from_toml(ROOT / "models.toml").get("smollm2-135m")
    return locate_gguf(spec, ROOT / ".cache" / "test-models")


def start(binary: Path, model: Path, flags: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                             "-t", "2", "--no-webui", *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited ({proc.returncode}) with {flags}")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("llama-server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layouts", nargs="+")
    args = parser.parse_args()
    from llm_pool import llamacpp_build

    binary, model = llamacpp_build.find_server(), gguf()
    rows: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    for _ in range(args.rounds):
        for clients in args.clients:
            for name, flags in layouts(clients).items():
                if args.layouts and name not in args.layouts:
                    continue
                proc, url = start(binary, model, flags)
                try:
                    asyncio.run(api_run(url, 2, 8))
                    streams, wall = asyncio.run(api_run(url, clients, args.tokens))
                    ttft = percentile([s.ttft for s in streams if s.ttft is not None], 50)
                    tok_s = sum(s.tokens for s in streams) / wall
                    rows.setdefault((name, clients), []).append((tok_s, ttft, server_rss(proc.pid)))
                    print(f"{name:14} {clients:3} clients: {tok_s:6.1f} tok/s, TTFT p50 {ttft:.2f} s, "
                          f"{server_rss(proc.pid) / 1e9:.2f} GB", flush=True)
                finally:
                    proc.terminate()
                    proc.wait(30)
    print("\n| layout | clients | tok/s (each round) | TTFT p50 s (median) | resident GB |\n|---|---|---|---|---|")
    for (name, clients), runs in rows.items():
        print(f"| {name} | {clients} | {' / '.join(f'{r[0]:.0f}' for r in runs)} | "
              f"{statistics.median(r[1] for r in runs):.2f} | {max(r[2] for r in runs) / 1e9:.2f} |")


if __name__ == "__main__":
    main()
