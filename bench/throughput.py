"""Throughput benchmark: concurrent streaming clients through the real HTTP API, against the
in-process engine and against the naive baseline (one `generate` per request under a lock).

    .venv/bin/python bench/throughput.py            # full: 128 new tokens, 1..32 clients
    .venv/bin/python bench/throughput.py --quick    # 64 new tokens, 1/4/16 clients, < 5 minutes
    .venv/bin/python bench/throughput.py --engines  # Shoal on llama.cpp against the llama-server a
                                                    # user would start instead, alternated in one run

Starts `python app.py` on a loopback port (a separate process, as users run it) with SmolLM2, and
drives it with streaming `/v1/chat/completions` requests (one SSE event per token). Reports
aggregate tok/s, time to first token p50/p99, inter-token latency p50/p99 and the server's peak
memory; prints a Markdown table, ends with `ratio 16-stream/1-stream: X`, and draws a PNG plot
(bench/results/throughput.png). All figures come from this run, on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODEL = "smollm2-135m"
PROMPTS = [
    "Write a short story about a lighthouse.",
    "Explain how rain forms.",
    "Describe a busy market.",
    "Tell me about the history of bread.",
    "Why is the sky blue?",
    "Describe your ideal garden.",
    "Write a letter to a friend about a trip.",
    "Explain how a bicycle works.",
]


@dataclass
class Stream:
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    at: list[float] = field(default_factory=list)  # perf_counter time of the token ending each gap
    tokens: int = 0
    error: str | None = None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


@dataclass
class Result:
    label: str
    clients: int
    streams: list[Stream]
    wall: float
    peak_rss: float

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.streams)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall

    def ttft(self, q: float) -> float:
        return percentile([s.ttft for s in self.streams if s.ttft is not None], q)

    def row(self) -> str:
        ttfts = [s.ttft for s in self.streams if s.ttft is not None]
        gaps = [g for s in self.streams for g in s.gaps]
        failed = sum(1 for s in self.streams if s.error)
        return (
            f"| {self.label} | {self.clients} | {self.tok_s:.1f} | {percentile(ttfts, 50):.2f} | "
            f"{percentile(ttfts, 99):.2f} | {percentile(gaps, 50) * 1000:.0f} | {percentile(gaps, 99) * 1000:.0f} | "
            f"{self.peak_rss / 1e9:.2f} | {failed} |"
        )


# ------------------------------------------------------------------------------------- the API
async def api_stream(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int,
                     model: str | None = None) -> Stream:
    stream = Stream()
    body = {
        "model": model or MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    started = last = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                stream.error = f"HTTP {response.status_code}"
                return stream
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if not event.get("choices") or not event["choices"][0]["delta"].get("content"):
                    continue
                now = time.perf_counter()
                if stream.ttft is None:
                    stream.ttft = now - started
                else:
                    stream.gaps.append(now - last)
                    stream.at.append(now)
                last = now
                stream.tokens += 1
    except httpx.HTTPError as exc:
        stream.error = str(exc)
    return stream


async def api_run(url: str, clients: int, max_tokens: int) -> tuple[list[Stream], float]:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        streams = await asyncio.gather(
            *(api_stream(client, url, PROMPTS[i % len(PROMPTS)], max_tokens) for i in range(clients))
        )
        return list(streams), time.perf_counter() - started


def server_rss(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return float("nan")


def start_server(port: int, data_dir: Path, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [
        sys.executable,
        str(ROOT / "app.py"),
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--preload",
        f'["{MODEL}"]',
        "--log-level",
        "warning",
        *extra,
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become ready")


# ------------------------------------------------------------------------------------- in process
def engine_run(pool, clients: int, max_tokens: int) -> tuple[list[Stream], float]:
    from llm_pool import GenerationParams, GenerationRequest, Message, TextDelta

    params = GenerationParams.validated(temperature=0, max_new_tokens=max_tokens)
    streams = [Stream() for _ in range(clients)]

    def consume(i: int) -> None:
        started = last = time.perf_counter()
        handle = pool.submit(
            MODEL, GenerationRequest(params, messages=[Message("user", PROMPTS[i % len(PROMPTS)])])
        )
        for event in handle:
            if isinstance(event, TextDelta):
                now = time.perf_counter()
                if streams[i].ttft is None:
                    streams[i].ttft = now - started
                else:
                    streams[i].gaps.append(now - last)
                last = now
                streams[i].tokens += event.tokens

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return streams, time.perf_counter() - started


def naive_run(model, tokenizer, clients: int, max_tokens: int) -> tuple[list[Stream], float]:
    """What a plain Gradio LLM app does: one `generate` at a time behind a lock, streamed."""
    import torch
    from transformers import TextIteratorStreamer

    lock = threading.Lock()
    streams = [Stream() for _ in range(clients)]

    def serve(i: int) -> None:
        started = time.perf_counter()
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with lock:
            streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            output = {}

            def generate() -> None:
                with torch.inference_mode():
                    output["ids"] = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                                                   streamer=streamer)

            worker = threading.Thread(target=generate)
            worker.start()
            last = time.perf_counter()
            for _piece in streamer:
                now = time.perf_counter()
                if streams[i].ttft is None:
                    streams[i].ttft = now - started
                else:
                    streams[i].gaps.append(now - last)
                last = now
            worker.join()
            streams[i].tokens = output["ids"].shape[1] - ids["input_ids"].shape[1]

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return streams, time.perf_counter() - started


def own_rss() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 tokens, 1/4/16 clients (< 5 minutes)")
    parser.add_argument("--clients", type=int, nargs="+")
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--server-args", default="", help="extra flags for app.py, e.g. '--max-batch-size 32'")
    parser.add_argument("--version", help="measure this version of the model (hot-swapped in first)")
    parser.add_argument("--engines", action="store_true",
                        help="Shoal on llama.cpp against the bare llama-server a user would start instead "
                        "(two configurations), alternated in one run")
    parser.add_argument("--rounds", type=int, default=3, help="--engines: rounds alternating the servers")
    parser.add_argument("--transformers", action="store_true", help="--engines: Shoal on transformers too")
    args = parser.parse_args()
    if args.engines:
        return compare_engines(args)
    sweep = args.clients or ([1, 4, 16] if args.quick else [1, 2, 4, 8, 16, 32])
    max_tokens = args.tokens or (64 if args.quick else 128)
    args.out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data_dir = args.out / "data"
    extra = (
        ["--model-cache-dir", str(ROOT / ".cache" / "test-models")]
        if (ROOT / ".cache" / "test-models").exists()
        else []
    )
    server = start_server(port, data_dir, extra + ["--max-batch-size", "32"] + args.server_args.split())
    url = f"http://127.0.0.1:{port}"
    results: list[Result] = []
    try:
        if args.version:
            httpx.post(f"{url}/v1/models/{MODEL}/swap", json={"version": args.version}, timeout=600).raise_for_status()
        asyncio.run(api_run(url, 2, 8))  # warm-up
        for clients in sweep:
            streams, wall = asyncio.run(api_run(url, clients, max_tokens))
            results.append(Result("API (Shoal)", clients, streams, wall, server_rss(server.pid)))
            print(results[-1].row(), flush=True)
    finally:
        server.terminate()
        server.wait(60)

    from llm_pool import Catalog, ModelPool
    from llm_pool.backends import BackendContext

    cache = ROOT / ".cache" / "test-models" if extra else data_dir / "models"
    pool = ModelPool(Catalog.from_toml(ROOT / "models.toml"), BackendContext(cache_dir=cache), 8 * 2**30)
    if args.version:
        pool.swap(MODEL, args.version)
    pool.load(MODEL)
    engine_run(pool, 2, 8)
    for clients in sorted({1, 16} & set(sweep) or {sweep[0]}):
        streams, wall = engine_run(pool, clients, max_tokens)
        results.append(Result("in-process engine", clients, streams, wall, own_rss()))
        print(results[-1].row(), flush=True)
    backend = pool.backend(MODEL)
    for clients in sorted({1, 4} & set(sweep) or {sweep[0]}):
        streams, wall = naive_run(backend.model, backend.tokenizer, clients, max_tokens)
        results.append(Result("naive generate + lock", clients, streams, wall, own_rss()))
        print(results[-1].row(), flush=True)
    pool.shutdown()
    report(results, max_tokens, args.out)


WINDOW = 8192  # SmolLM2's trained context: the longest request Shoal accepts for it


def bare_configs(clients: int) -> dict[str, list[str]]:
    """The llama-server a user would start instead of Shoal, for `clients` clients:
    - as llama.cpp's README suggests (`-np N`, defaults otherwise: each slot gets the default
      context divided by N, so a request may use 8192/N tokens);
    - the fastest bare configuration that serves every request Shoal accepts (each up to the 8k
      window), measured with bench/kv_layouts.py: one KV per slot holding the whole window, flash
      attention, q8_0 K and V."""
    return {
        "llama-server -np N": ["-np", str(clients)],
        "llama-server, 8k per slot": ["-np", str(clients), "-c", str(WINDOW * clients), "-fa", "on",
                                      "-ctk", "q8_0", "-ctv", "q8_0"],
    }


def measured_run(url: str, clients: int, max_tokens: int) -> tuple[list[Stream], float]:
    """`api_run`, repeated until about 16 streams were served (one client's 128 tokens take ~1 s
    here, too short to read a 5% difference from): streams of every repeat, their total time."""
    streams: list[Stream] = []
    wall = 0.0
    for _ in range(max(1, 16 // clients)):
        more, spent = asyncio.run(api_run(url, clients, max_tokens))
        streams += more
        wall += spent
    return streams, wall


def bare_llama_server(port: int, flags: list[str]) -> subprocess.Popen:
    """The llama-server that Shoal built, on SmolLM2's GGUF, with `flags` and nothing in front."""
    from llm_pool import Catalog, llamacpp_build
    from llm_pool.sources import locate_gguf

    spec = Catalog.from_toml(ROOT / "models.toml").get(MODEL)
    gguf = locate_gguf(spec, ROOT / ".cache" / "test-models")
    command = [str(llamacpp_build.find_server()), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "-t", str(len(os.sched_getaffinity(0))), "--no-webui", *flags]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"llama-server did not become ready with {flags}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (its own threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def compare_engines(args) -> None:
    """One run, one machine: each bare configuration and Shoal, alternated at each client count
    for `--rounds` rounds, same prompts. Ratios are against the faster bare configuration."""
    sweep = args.clients or [1, 16, 32]
    max_tokens = args.tokens or 128
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    cpu_per_k: dict[int, list[float]] = {}
    engines = [("llama.cpp", None)] + ([("transformers", "instruct-transformers")] if args.transformers else [])
    servers = {}
    try:
        for engine, version in engines:
            port = free_port()
            flags = ["--model-cache-dir", str(ROOT / ".cache" / "test-models"), "--max-batch-size",
                     str(max(sweep + [16])), *args.server_args.split()]
            servers[engine] = (start_server(port, args.out / f"data-{engine}", flags), f"http://127.0.0.1:{port}")
            if version:
                httpx.post(f"{servers[engine][1]}/v1/models/{MODEL}/swap", json={"version": version},
                           timeout=600).raise_for_status()
            asyncio.run(api_run(servers[engine][1], 2, 8))
        for _ in range(args.rounds):
            for clients in sweep:
                for label, flags in bare_configs(clients).items():
                    port = free_port()
                    bare = bare_llama_server(port, flags)
                    try:
                        url = f"http://127.0.0.1:{port}"
                        asyncio.run(api_run(url, 2, 8))
                        streams, wall = measured_run(url, clients, max_tokens)
                        results.append(Result(label, clients, streams, wall, server_rss(bare.pid)))
                        print(results[-1].row(), flush=True)
                    finally:
                        bare.terminate()
                        bare.wait(30)
                for engine, (server, url) in servers.items():
                    before = cpu_seconds(server.pid)
                    streams, wall = measured_run(url, clients, max_tokens)
                    spent = cpu_seconds(server.pid) - before
                    rss = server_rss(server.pid) + sum(server_rss(int(p)) for p in _children(server.pid))
                    results.append(Result(f"Shoal, {engine}", clients, streams, wall, rss))
                    if engine == "llama.cpp":
                        cpu_per_k.setdefault(clients, []).append(spent / max(1, results[-1].tokens) * 1000)
                    print(results[-1].row(), f"(Shoal's process: {spent:.1f} CPU s)", flush=True)
        for engine, (server, url) in servers.items():
            status = httpx.get(f"{url}/v1/models/{MODEL}", timeout=30).json()
            print(f"    Shoal, {engine}: Shoal's own process {server_rss(server.pid) / 1e9:.2f} GB peak; the model "
                  f"as the pool counts it {status.get('resident_bytes', 0) / 1e9:.2f} GB", flush=True)
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(60)
    report(results, max_tokens, args.out)
    print("\n| clients | faster bare | its tok/s | Shoal tok/s | Shoal / bare | TTFT p50 bare s | TTFT p50 Shoal s "
          "| TTFT p99 bare s | TTFT p99 Shoal s | Shoal CPU s / 1k tokens |\n|---|---|---|---|---|---|---|---|---|---|")
    for clients in sweep:
        rows = [r for r in results if r.clients == clients]
        bare = {}
        for r in rows:
            if r.label.startswith("llama-server"):
                bare.setdefault(r.label, []).append(r)
        shoal = [r for r in rows if r.label == "Shoal, llama.cpp"]
        if not bare or not shoal:
            continue
        best = max(bare, key=lambda label: statistics.median(r.tok_s for r in bare[label]))
        base = bare[best]

        def med(runs: list[Result], what) -> float:
            return statistics.median(what(r) for r in runs)

        tok_b, tok_s = med(base, lambda r: r.tok_s), med(shoal, lambda r: r.tok_s)
        print(f"| {clients} | {best} | {tok_b:.0f} | {tok_s:.0f} | {tok_s / tok_b:.2f}x | "
              f"{med(base, lambda r: r.ttft(50)):.2f} | {med(shoal, lambda r: r.ttft(50)):.2f} | "
              f"{med(base, lambda r: r.ttft(99)):.2f} | {med(shoal, lambda r: r.ttft(99)):.2f} | "
              f"{statistics.median(cpu_per_k.get(clients) or [float('nan')]):.2f} |")


def _children(pid: int) -> list[str]:
    """Child processes of every thread of `pid` (the pool starts llama-server from a loader
    thread, so the main thread's own list misses it)."""
    found: list[str] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += (task / "children").read_text().split()
        except OSError:
            pass
    return found


def report(results: list[Result], max_tokens: int, out: Path) -> None:
    print(f"\n{max_tokens} new tokens per request, greedy, SmolLM2-135M-Instruct, CPU\n")
    print("| path | clients | aggregate tok/s | TTFT p50 s | TTFT p99 s | ITL p50 ms | ITL p99 ms "
          "| peak RSS GB | failed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for result in results:
        print(result.row())
    api = {r.clients: r for r in results if r.label.startswith("API")}
    engine = {r.clients: r for r in results if r.label.startswith("in-process")}
    if 1 in api and 1 in engine:
        print(f"\nAPI single-stream overhead vs in-process: {(1 - api[1].tok_s / engine[1].tok_s) * 100:+.1f}%")
    plot(results, out / "throughput.png")
    print(f"plot: {out / 'throughput.png'}")
    if 1 in api and 16 in api:
        print(f"ratio 16-stream/1-stream: {api[16].tok_s / api[1].tok_s:.2f}")


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = dict.fromkeys(r.label for r in results)
    for label, marker in zip(labels, "osx^dv"):
        points = sorted(
            (r.clients, r.tok_s, statistics.median([s.ttft for s in r.streams if s.ttft] or [0]))
            for r in results
            if r.label == label
        )
        if points:
            xs = [p[0] for p in points]
            left.plot(xs, [p[1] for p in points], marker=marker, label=label)
            right.plot(xs, [p[2] for p in points], marker=marker, label=label)
    for axis, title in ((left, "aggregate tokens/s"), (right, "time to first token, p50 (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent streaming clients")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
