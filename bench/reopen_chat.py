"""Reopening a long chat after a restart: the next turn's time to first token with the chats' KV
kept on disk (`--kv-disk-budget`, the default 2GiB) and without it (`--kv-disk-budget 0`), on
each engine, in one run.

    .venv/bin/python bench/reopen_chat.py                 # both engines, ~10 minutes on 2 cores
    .venv/bin/python bench/reopen_chat.py --engines llama

For each engine: start `python app.py` (a separate process, as users run it) with the model
preloaded, make a chat whose first message is ~5k tokens, stop Shoal; copy its data directory;
start Shoal again on one copy with the disk cache and on the other without it, and send the next
turn (streamed over the sessions API). Reported: the next turn's TTFT (client side, from sending
to the first token), its prompt tokens, how many came from disk, and the first turn's TTFT (the
cold prefill of the whole chat) for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"llama": "smollm2-135m@instruct-q4_1", "transformers": "smollm2-135m@instruct-transformers"}
# ~5.2k tokens of varied text: the README (a chat about a long document)
STORY = (ROOT / "README.md").read_text()[:15_300]


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(data_dir: Path, model: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--data-dir", str(data_dir),
               "--preload", json.dumps([model]), "--log-level", "warning", "--no-build-llama-cpp", *extra]
    proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/models/{model}", timeout=2).json().get("state") == "ready":
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited ({proc.returncode})")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("Shoal did not become ready")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def turn(url: str, sid: str, text: str) -> dict:
    """Send a message, streamed; (TTFT seconds, the done event's message)."""
    began = time.perf_counter()
    ttft = None
    with httpx.stream("POST", f"{url}/v1/sessions/{sid}/messages", timeout=900,
                      json={"content": text, "stream": True}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event["type"] == "token" and ttft is None:
                ttft = time.perf_counter() - began
            elif event["type"] == "done":
                return {"ttft": ttft, "message": event["message"]}
            elif event["type"] == "error":
                raise RuntimeError(event["error"])
    raise RuntimeError("the stream ended without a reply")


def run_engine(name: str, work: Path) -> list[dict]:
    model = MODELS[name]
    base = work / f"{name}-chat"
    proc, url = start(base, model, [])
    try:
        sid = httpx.post(f"{url}/v1/sessions", json={"model": model, "params": {"temperature": 0,
                                                                               "max_new_tokens": 32}}).json()["id"]
        first = turn(url, sid, STORY + "\n\nIn two sentences: what is this document about?")
    finally:
        stop(proc)
    rows = []
    for label, extra in (("without the disk cache", ["--kv-disk-budget", "0"]), ("with the disk cache", [])):
        data = work / f"{name}-{'off' if extra else 'on'}"
        shutil.copytree(base, data)
        proc, url = start(data, model, extra)
        try:
            nxt = turn(url, sid, "Which command starts it?")
        finally:
            stop(proc)
        usage = nxt["message"]["usage"]
        rows.append({"engine": name, "case": label, "ttft": nxt["ttft"], "prompt": usage["prompt_tokens"],
                     "from_disk": usage["prompt_tokens_details"].get("cached_tokens_from_disk", 0),
                     "first_ttft": first["ttft"], "first_prompt": first["message"]["usage"]["prompt_tokens"]})
        print(f"{name:12s} {label:24s} next-turn TTFT {nxt['ttft']:7.2f} s  prompt {usage['prompt_tokens']} "
              f"from disk {rows[-1]['from_disk']}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", choices=sorted(MODELS), default=["llama", "transformers"])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="shoal-reopen-") as work:
        for name in args.engines:
            rows += run_engine(name, Path(work))
    print("\n| engine | after a restart | next turn's TTFT s | prompt tokens | from disk | first turn's TTFT s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['case']} | {r['ttft']:.2f} | {r['prompt']} | {r['from_disk']} | "
              f"{r['first_ttft']:.2f} |")
    for name in args.engines:
        on = next(r for r in rows if r["engine"] == name and r["from_disk"])
        off = next(r for r in rows if r["engine"] == name and r is not on)
        print(f"{name}: {off['ttft'] / on['ttft']:.0f}x shorter wait with the disk cache")


if __name__ == "__main__":
    main()
