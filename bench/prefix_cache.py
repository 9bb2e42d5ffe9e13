"""What the prefix cache saves: a conversation's later turns with and without reusing the KV of
earlier turns (same model, same process, same prompts).

    .venv/bin/python bench/prefix_cache.py [--turns 12]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm_pool import Catalog, GenerationParams, GenerationRequest, Message, ModelPool  # noqa: E402
from llm_pool.backends import BackendContext  # noqa: E402

QUESTIONS = [
    "Tell me about the ocean.",
    "What lives in it?",
    "How deep is it?",
    "Is it cold down there?",
    "What about whales?",
    "How do they breathe?",
    "And sharks?",
    "Are they dangerous?",
    "What do they eat?",
    "How old can they get?",
    "Which is the biggest fish?",
    "Thanks, summarise.",
]


def conversation(pool, turns: int, reuse: bool) -> list[tuple[int, int, float]]:
    engine = pool.backend("smollm2-135m").engine
    engine.prefix_cache.clear()
    params = GenerationParams.validated(temperature=0, max_new_tokens=48)
    history: list[Message] = [Message("system", "You are a patient teacher. " * 20)]
    out = []
    for question in (QUESTIONS * 2)[:turns]:
        if not reuse:
            engine.prefix_cache.clear()
        history.append(Message("user", question))
        final = pool.submit("smollm2-135m", GenerationRequest(params, messages=list(history),
                                                               cache_scope="bench-user")).result(300)
        history.append(Message("assistant", final.text))
        out.append((final.usage.prompt_tokens, final.usage.cached_tokens, final.ttft))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=12)
    args = parser.parse_args()
    cache = ROOT / ".cache" / "test-models"
    pool = ModelPool(
        Catalog.from_toml(ROOT / "models.toml"),
        BackendContext(cache_dir=cache if cache.exists() else ROOT / "data" / "models"),
        8 * 2**30,
    )
    pool.load("smollm2-135m")
    conversation(pool, 2, True)  # warm-up
    started = time.monotonic()
    with_cache = conversation(pool, args.turns, True)
    without = conversation(pool, args.turns, False)
    pool.shutdown()
    print(
        "| turn | prompt tokens | reused from cache | TTFT with reuse s | TTFT recomputing s |\n|---|---|---|---|---|"
    )
    for n, ((prompt, cached, ttft), (_, _, ttft0)) in enumerate(zip(with_cache, without), 1):
        print(f"| {n} | {prompt} | {cached} | {ttft:.2f} | {ttft0:.2f} |")
    late = slice(args.turns // 2, None)
    saved = sum(c for _, c, _ in with_cache) / max(1, sum(p for p, _, _ in with_cache))
    print(
        f"\nprompt tokens served from the cache: {saved:.0%}; median TTFT of the later half: "
        f"{statistics.median(t for *_, t in with_cache[late]):.2f} s with reuse vs "
        f"{statistics.median(t for *_, t in without[late]):.2f} s recomputing ({time.monotonic() - started:.0f} s run)"
    )


if __name__ == "__main__":
    main()
