"""Long prompts beside running streams, mixed prompt lengths, and the sampler's cost: the
transformers engine's ragged KV layout (per-request KV, chunked prefill, vectorized sampling)
against the padded layout it replaced, selected in the same process (`EngineConfig.layout`),
and the vectorized sampler against main's per-row sampler (loaded from git) on the same logits.

    .venv/bin/python bench/long_prompts.py              # all three, ~10 minutes on 2 cores
    .venv/bin/python bench/long_prompts.py --only itl   # or: mixed, sampling

- itl: 15 greedy streams run; a ~6k-token prompt arrives, then a short one a second later.
  Reported: the running streams' inter-token gaps (p50/p99/max) that overlap the time from the
  long prompt's arrival to its first token, and each newcomer's time to first token.
- mixed: 16 clients for 60 s, 13 short chats and 3 with ~4k-token prompts, KV budget 1 GiB
  (`--mixed-kv-gb`): aggregate tok/s and TTFT p50 of each kind.
- sampling: `choose_tokens` on SmolLM2's real logits at 16 and 32 rows (greedy, t=0.7 top_p=0.9,
  t=1.0, t=0.8 top_p=0.95 repetition_penalty=1.1), and an engine step at 16 and 32 sampled rows.

Runs in-process with SmolLM2's transformers version (the converted folder is made on first use).
All figures come from this run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_pool import (  # noqa: E402
    Catalog,
    EngineConfig,
    GenerationParams,
    GenerationRequest,
    Message,
    ModelPool,
    TextDelta,
)
from llm_pool.backends import BackendContext  # noqa: E402

MODEL = "smollm2-135m@instruct-transformers"
CACHE = ROOT / ".cache" / "test-models"
TEXT = (ROOT / "README.md").read_text()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


LLAMA = "smollm2-135m@instruct-q4_1"  # the same model on llama.cpp (its GGUF)
# llama.cpp, before and after issue 25: one unified KV with llama-server's default batch
# (-b 2048 -ub 512); a KV per slot with prompts read 256 tokens per step (2026-12-06); and the
# default now: -b 512, a long prompt arriving beside running streams read 128 tokens per step
LLAMA_LAYOUTS = {"llama.cpp before (unified KV, -b 2048)": ("padded", 2048, None, False),
                 "llama.cpp, KV per slot, -b 256 (a long prompt 256 per step)": ("ragged", 256, 8 * 2**30, False),
                 "llama.cpp after (KV per slot, -b 512, a long prompt beside streams 128 per step)":
                     ("ragged", 512, 8 * 2**30, True)}


def make_pool(layout: str, kv_bytes: int = 512 * 2**20, batch: int = 16, model: str = MODEL,
              prefill_chunk: int = 256, llamacpp_kv: int | None = None) -> ModelPool:
    catalog = Catalog.from_toml(ROOT / "models.toml")
    spec = catalog.get(*model.split("@"))
    config = EngineConfig(layout=layout, kv_cache_bytes=kv_bytes, max_batch_size=batch, queue_size=128,
                          queue_timeout=600, llamacpp_batch=prefill_chunk, llamacpp_kv_bytes=llamacpp_kv)
    pool = ModelPool(Catalog([spec]), BackendContext(cache_dir=CACHE, device="cpu", engine=config), 32 * 2**30)
    pool.load(model)
    backend = pool.backend(model)
    print(f"  [{layout}] {getattr(backend, 'engine', None).__class__.__name__} {backend.info().get('kv_layout', '')}",
          flush=True)
    return pool


def long_prompt(pool: ModelPool, tokens: int, model: str = MODEL) -> str:
    """About `tokens` tokens of the README, asked to be summarized."""
    backend = pool.backend(model)
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is None:  # llama.cpp: its own tokenizer, over its API
        ids = backend._post("/tokenize", {"content": TEXT, "add_special": False})["tokens"][:tokens]
        return "Summarize this text in one sentence:\n\n" + backend.detokenize(ids)
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids[:tokens]
    return "Summarize this text in one sentence:\n\n" + tokenizer.decode(ids)


def chat(text: str, max_new: int, **params) -> GenerationRequest:
    params.setdefault("temperature", 0)
    return GenerationRequest(GenerationParams.validated(max_new_tokens=max_new, **params),
                             messages=[Message("user", text)])


class Timed:
    """A request run in a thread, its token arrival times recorded."""

    def __init__(self, pool: ModelPool, request: GenerationRequest, model: str = MODEL):
        self.sent = time.monotonic()
        self.times: list[float] = []
        self.tokens = 0
        self.handle = pool.submit(model, request)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for event in self.handle:
            if isinstance(event, TextDelta):
                self.times.append(time.monotonic())
                self.tokens += len(event.token_ids)

    @property
    def ttft(self) -> float:
        return self.times[0] - self.sent if self.times else float("nan")


def itl(layout: str, prompt_tokens: int, label: str | None = None) -> str:
    if label in LLAMA_LAYOUTS:  # llama.cpp: 16 slots as `make run` starts it
        kv_layout, chunk, kv_cap, pieces = LLAMA_LAYOUTS[label]
        model = LLAMA
        pool = make_pool(kv_layout, batch=16, model=model, prefill_chunk=chunk, llamacpp_kv=kv_cap)
        pool.backend(model).read_in_pieces = pieces
    else:
        # a KV budget that lets the padded layout take the long prompt beside the streams (its
        # reservation is rows x (longest + max remaining)), so both layouts read it while they run
        model = MODEL
        pool = make_pool(layout, kv_bytes=8 * 2**30, batch=32)  # room for the newcomers beside 15 streams
    label = label or layout
    try:
        streams = [Timed(pool, chat(f"Write a long story about a lighthouse keeper number {i}.", 400), model)
                   for i in range(14 if model == LLAMA else 15)]
        time.sleep(6)
        long = Timed(pool, chat(long_prompt(pool, prompt_tokens, model), 8), model)
        time.sleep(1)
        short = Timed(pool, chat("Say hi.", 8), model)
        long.thread.join(600)
        short.thread.join(600)
        # every gap between two tokens of a running stream that overlaps the time from the long
        # prompt's arrival to its first token
        window = (long.sent, long.times[0] if long.times else time.monotonic())
        gaps = [b - a for s in streams for a, b in zip(s.times, s.times[1:]) if a < window[1] and b > window[0]]
        for s in streams:
            s.handle.cancel()
        prompt = long.handle.result(5).usage.prompt_tokens
        return (f"| {label} | {prompt} | {percentile(gaps, 50):.2f} | {percentile(gaps, 99):.2f} | "
                f"{max(gaps, default=float('nan')):.2f} | {long.ttft:.1f} | {short.ttft:.2f} |")
    finally:
        pool.shutdown()


def mixed(layout: str, seconds: float, long_tokens: int, kv_bytes: int) -> str:
    pool = make_pool(layout, kv_bytes=kv_bytes)
    document = long_prompt(pool, long_tokens)
    stop = time.monotonic() + seconds
    done: dict[str, list[Timed]] = {"short": [], "long": []}
    lock = threading.Lock()

    def client(kind: str, i: int) -> None:
        n = 0
        while time.monotonic() < stop:
            text = f"({i}.{n}) " + document if kind == "long" else f"Tell me about topic {i}.{n}."
            run = Timed(pool, chat(text, 32 if kind == "long" else 96))
            run.thread.join(600)
            with lock:
                done[kind].append(run)
            n += 1

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=("long" if i < 3 else "short", i)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    pool.shutdown()
    tokens = sum(r.tokens for runs in done.values() for r in runs)
    ttft = {kind: statistics.median([r.ttft for r in runs]) if runs else float("nan") for kind, runs in done.items()}
    return (f"| {layout} | {tokens / wall:.1f} | {len(done['short'])} | {len(done['long'])} | "
            f"{ttft['short']:.2f} | {ttft['long']:.1f} |")


def previous_sampling(commit: str) -> types.ModuleType:
    """llm_pool/sampling.py as it was at `commit`, as a module."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:llm_pool/sampling.py"],
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("previous_sampling")
    module.__package__ = "llm_pool"
    exec(compile(source, f"{commit}:llm_pool/sampling.py", "exec"), module.__dict__)
    return module


SAMPLING = [("greedy", dict(temperature=0)), ("t=0.7 top_p=0.9", dict(temperature=0.7, top_p=0.9)),
            ("t=1.0", dict(temperature=1.0)),
            ("t=0.8 top_p=0.95 rep=1.1", dict(temperature=0.8, top_p=0.95, repetition_penalty=1.1))]


def sampling(commit: str) -> list[str]:
    import llm_pool.engine as engine_module
    import llm_pool.sampling as current
    previous = previous_sampling(commit)
    pool = make_pool("ragged", batch=32)
    rows = []
    try:
        model = pool.backend(MODEL).model
        ids = pool.backend(MODEL).tokenizer(TEXT[:8000], return_tensors="pt").input_ids[:, :400]
        with torch.inference_mode():
            logits = model(ids).logits[0].float()
        for batch in (16, 32):
            picked = logits[50:50 + batch * 10:10].contiguous()
            for label, settings in SAMPLING:
                params = GenerationParams.validated(**settings)
                times = {}
                for name, module in (("previous", previous), ("vectorized", current)):
                    samplers = [module.RowSampler(params, ids[0, :100].tolist(), torch.device("cpu"))
                                for _ in range(batch)]
                    module.choose_tokens(picked, samplers)
                    started, n = time.perf_counter(), 10
                    for _ in range(n):
                        module.choose_tokens(picked, samplers)
                    times[name] = (time.perf_counter() - started) / n * 1000
                rows.append(f"| choose_tokens | {batch} | {label} | {times['previous']:.1f} | "
                            f"{times['vectorized']:.1f} | {times['previous'] / times['vectorized']:.1f}x |")
        # whole engine steps: the same sampled requests, the engine using each sampler in turn
        engine = pool.backend(MODEL).engine
        for batch in (16, 32):
            times = {}
            for name, module in (("previous", previous), ("vectorized", current)):
                engine_module.RowSampler, engine_module.choose_tokens = module.RowSampler, module.choose_tokens
                try:
                    steps = engine.stats["steps"]
                    started = time.perf_counter()
                    runs = [pool.submit(MODEL, chat(f"Write a poem about the number {i}.", 48, temperature=0.7,
                                                    top_p=0.9, seed=i)) for i in range(batch)]
                    for run in runs:
                        run.result(600)
                    times[name] = (time.perf_counter() - started) / (engine.stats["steps"] - steps) * 1000
                finally:
                    engine_module.RowSampler, engine_module.choose_tokens = current.RowSampler, current.choose_tokens
            rows.append(f"| engine step | {batch} | t=0.7 top_p=0.9 | {times['previous']:.1f} | "
                        f"{times['vectorized']:.1f} | {times['previous'] / times['vectorized']:.1f}x |")
    finally:
        pool.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["itl", "mixed", "sampling"])
    parser.add_argument("--prompt-tokens", type=int, default=6000)
    parser.add_argument("--engine", choices=["transformers", "llama.cpp"], help="itl: one engine only")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--mixed-kv-gb", type=float, default=1.0,
                        help="KV budget of the mixed run (1 GiB holds all 16 requests on the ragged layout)")
    parser.add_argument("--previous", default="62bb1c9", help="commit whose sampler is the baseline")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out: list[str] = []
    if args.only in (None, "itl"):
        out += ["### A long prompt arrives beside 15 running streams",
                "| layout | prompt tokens | stream ITL p50 s | p99 s | max s | long TTFT s | short TTFT s |",
                "|---|---|---|---|---|---|---|"]
        for layout in (*(("padded", "ragged") if args.engine in (None, "transformers") else ()),
                       *(LLAMA_LAYOUTS if args.engine in (None, "llama.cpp") else ())):
            out.append(itl(layout, args.prompt_tokens, layout if layout in LLAMA_LAYOUTS else None))
            print(out[-1], flush=True)
    if args.only in (None, "mixed"):
        out += ["", f"### 16 clients, mixed lengths, {args.seconds:.0f} s (13 short chats, 3 with ~4k-token prompts), "
                f"KV budget {args.mixed_kv_gb:g} GiB",
                "| layout | tok/s | short answers | long answers | short TTFT p50 s | long TTFT p50 s |",
                "|---|---|---|---|---|---|"]
        for layout in ("padded", "ragged"):
            out.append(mixed(layout, args.seconds, 4000, int(args.mixed_kv_gb * 2**30)))
            print(out[-1], flush=True)
    if args.only in (None, "sampling"):
        out += ["", f"### Sampling: previous (per-row, {args.previous}) vs vectorized, ms",
                "| what | rows | parameters | previous | vectorized | speed-up |", "|---|---|---|---|---|---|"]
        out += sampling(args.previous)
    print("\n".join(out))


if __name__ == "__main__":
    main()
