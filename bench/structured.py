"""What structured output costs: decode speed of JSON-schema-constrained requests against free
ones, and of free requests that share their batches with constrained ones, on both engines (same
model, same process, rounds alternated so drift on this shared machine hits every mode alike).

    .venv/bin/python bench/structured.py [--rounds 3] [--clients 4] [--tokens 64]

Modes, each a batch of `--clients` concurrent greedy requests for SmolLM2:
- free: no request constrained (the path every ordinary request takes);
- constrained: every request constrained to a JSON schema;
- mixed: half constrained, half free; the free half's speed is reported.
Speed is each request's decode rate (tokens after the first / time after the first), the median
over requests and rounds; every constrained answer is validated against the schema.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jsonschema  # noqa: E402

from llm_pool import Catalog, GenerationParams, GenerationRequest, Message, ModelPool  # noqa: E402
from llm_pool.backends import BackendContext  # noqa: E402
from llm_pool.constraints import OutputFormat  # noqa: E402

VERSIONS = ["smollm2-135m@instruct-transformers", "smollm2-135m@instruct-q4_1"]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 60},
                   "age": {"type": "integer", "minimum": 0, "maximum": 130},
                   "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 4},
                   "city": {"type": "string", "maxLength": 40}},
    "required": ["name", "age", "hobbies", "city"], "additionalProperties": False,
}
PROMPTS = ["Describe a fictional sailor.", "Describe a fictional baker.", "Describe a fictional pilot.",
           "Describe a fictional teacher.", "Describe a fictional painter.", "Describe a fictional farmer.",
           "Describe a fictional doctor.", "Describe a fictional poet."]


def batch(pool, model: str, constrained: list[bool], tokens: int) -> list[tuple[bool, float, bool]]:
    """One batch of concurrent requests; (constrained, decode tok/s, answer valid) per request:
    a constrained answer is valid when it finished and validates against the schema."""
    params = GenerationParams.validated(temperature=0, max_new_tokens=tokens)
    handles = []
    for i, strict in enumerate(constrained):
        fmt = OutputFormat.json(SCHEMA) if strict else None
        prompt = PROMPTS[i % len(PROMPTS)] + (" Answer as JSON." if strict else "")
        handles.append(pool.submit(model, GenerationRequest(params, messages=[Message("user", prompt)],
                                                            output_format=fmt)))
    out = []
    for strict, handle in zip(constrained, handles):
        final = handle.result(600)
        valid = False
        if strict and final.reason == "stop":
            try:
                jsonschema.validate(json.loads(final.text), SCHEMA)
                valid = True
            except (ValueError, jsonschema.ValidationError):
                pass
        out.append((strict, final.tokens_per_second, valid))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    cache = ROOT / ".cache" / "test-models"
    pool = ModelPool(Catalog.from_toml(ROOT / "models.toml"),
                     BackendContext(cache_dir=cache if cache.exists() else ROOT / "data" / "models"), 8 * 2**30)
    half = args.clients // 2
    modes = {"free": [False] * args.clients, "constrained": [True] * args.clients,
             "mixed": [True] * half + [False] * (args.clients - half)}
    started = time.monotonic()
    print(f"{args.clients} concurrent greedy requests, up to {args.tokens} new tokens, {args.rounds} rounds\n")
    print("| engine | free tok/s per request | constrained | ratio constrained/free | free ones in a mixed batch "
          "| ratio mixed-free/free | constrained answers that validated |\n|---|---|---|---|---|---|---|")
    for model in VERSIONS:
        pool.load(model)
        batch(pool, model, modes["mixed"], 16)  # warm-up: compiles the grammar machinery once
        rates: dict[str, list[float]] = {m: [] for m in modes}
        mixed_free: list[float] = []
        validated = asked = 0
        for _ in range(args.rounds):
            for mode, constrained in modes.items():
                for strict, rate, valid in batch(pool, model, constrained, args.tokens):
                    if mode == "mixed" and not strict:
                        mixed_free.append(rate)
                    elif mode != "mixed" or strict:
                        rates[mode].append(rate)
                    asked += strict
                    validated += valid
        free, strict, mixed = (statistics.median(v) for v in (rates["free"], rates["constrained"], mixed_free))
        engine = "llama.cpp" if model.endswith("q4_1") else "transformers"
        print(f"| {engine} | {free:.1f} | {strict:.1f} | {strict / free:.2f} | {mixed:.1f} | {mixed / free:.2f} "
              f"| {validated} of {asked} |")
        pool.unload(model)
    pool.shutdown()
    print(f"\n({time.monotonic() - started:.0f} s run)")


if __name__ == "__main__":
    main()
