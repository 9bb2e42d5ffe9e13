"""Decode-step time with plain `nn.Linear` (MKL) against weights prepacked for oneDNN
(`llm_pool/cpu_linear.py`), in the same process, at batch sizes 1, 4, 16 and 32.

    .venv/bin/python bench/cpu_linear.py [--model smollm2-135m] [--dtype float32] [--rounds 5]

Both copies of the model are loaded from the pool's converted cache and run the engine's own
KV-cache buffers over a 200-token prompt; rounds alternate between the two so that load from
other processes on the machine falls on both. Prints the median step time of each, their ratio,
and whether the greedy tokens were the same.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

from llm_pool import Catalog  # noqa: E402
from llm_pool.cpu_linear import pack_linears  # noqa: E402
from llm_pool.kv import cache_from, layers  # noqa: E402
from llm_pool.sources import prepare  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def step_times(model, batch: int, prompt: int = 200, steps: int = 25) -> tuple[list[float], torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (batch, prompt))
    mask = torch.ones(batch, prompt, dtype=torch.long)
    out = model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(), use_cache=True,
                logits_to_keep=1)
    cache = cache_from(layers(out.past_key_values), prompt + steps + 5)
    token, position, tokens, times = out.logits[:, -1].argmax(-1, keepdim=True), prompt, [], []
    for _ in range(steps + 2):
        started = time.perf_counter()
        mask = torch.cat([mask, mask.new_ones((batch, 1))], 1)
        out = model(input_ids=token, attention_mask=mask, position_ids=torch.full((batch, 1), position),
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].float().argmax(-1, keepdim=True)
        position += 1
        tokens.append(token)
        times.append(time.perf_counter() - started)
    return times[2:], torch.cat(tokens, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "test-models"),
                        help="converted-model cache (the tests' by default; converts if empty)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    spec = Catalog.from_toml(ROOT / "models.toml").get(args.model)
    folder = prepare(spec, Path(args.cache or tempfile.mkdtemp()), lambda *a: None).location
    dtype = getattr(torch, args.dtype)
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    packed = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    packed_count = pack_linears(packed)
    print(f"{args.model} {args.dtype}: {packed_count} linear layers packed; {torch.get_num_threads()} threads\n")
    print("| batch | plain Linear ms/step | packed ms/step | ratio packed/plain | same greedy tokens |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for batch in (1, 4, 16, 32):
            plain_t, packed_t, same = [], [], True
            for _ in range(args.rounds):
                a, tokens_a = step_times(plain, batch)
                b, tokens_b = step_times(packed, batch)
                plain_t += a
                packed_t += b
                same &= torch.equal(tokens_a, tokens_b)
            p, q = statistics.median(plain_t) * 1000, statistics.median(packed_t) * 1000
            print(f"| {batch} | {p:.1f} | {q:.1f} | {q / p:.2f} | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
