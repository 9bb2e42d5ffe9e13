"""Does indexing a large file slow other users' chats? Inter-token latency of running streams while a
300-page PDF is read and embedded, against the same streams with nothing being indexed.

    .venv/bin/python bench/indexing_itl.py [--pages 300] [--clients 2] [--niceness 0 10]

Starts `python app.py` on loopback once per run (SmolLM2 on llama.cpp, where it is built, with indexing
as it was before (same CPU priority as chats, never stepping aside) and as it is now; and on the
transformers engine), keeps `clients` streaming chats running, measures their token gaps for a
baseline window, then uploads a PDF of `pages` real pages (the libtasn1 manual's pages repeated;
a real Debian PDF) into another session and measures the same streams while it is read (parsed)
and while it is embedded. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import throughput  # noqa: E402
from bench.throughput import PROMPTS, api_stream, free_port, percentile, start_server  # noqa: E402

SOURCES = ["/usr/share/doc/libtasn1-doc/libtasn1.pdf", "/usr/share/doc/shared-mime-info/shared-mime-info-spec.pdf"]


RUNS = [  # label=model=flags: before (same priority, no stepping aside) and after, on both engines
    "before=smollm2-135m=--index-niceness 0 --index-yield-seconds 0",
    "after=smollm2-135m=",
    "after=smollm2-135m@instruct-transformers=",
]


def big_pdf(pages: int) -> bytes:
    from pypdf import PdfReader, PdfWriter
    source = next((p for p in SOURCES if Path(p).exists()), None)
    if source is None:
        raise SystemExit("needs a real PDF: apt-get install libtasn1-doc (or shared-mime-info)")
    reader = PdfReader(source)
    writer = PdfWriter()
    while len(writer.pages) < pages:
        for page in reader.pages[: pages - len(writer.pages)]:
            writer.add_page(page)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


async def keep_streaming(url: str, model: str, clients: int, max_tokens: int, until: asyncio.Event,
                         gaps: list[tuple[float, float]]) -> int:
    """`clients` chats, each sending a new request when its previous one ends, until `until` is set."""
    done: list[int] = []

    async def client_loop(i: int, client: httpx.AsyncClient) -> None:
        n = i
        while not until.is_set():
            stream = await api_stream(client, url, PROMPTS[n % len(PROMPTS)], max_tokens, model)
            gaps.extend(zip(stream.at, stream.gaps, strict=True))
            done.append(stream.tokens)
            n += clients

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
    return sum(done)


async def measure(url: str, model: str, clients: int, max_tokens: int, seconds: float,
                  pdf: bytes | None) -> dict[str, tuple[int, list[float], float]]:
    """Windows ("baseline", or "reading" and "embedding" of the upload): tokens, gaps, seconds."""
    stop = asyncio.Event()
    gaps: list[tuple[float, float]] = []
    started = time.perf_counter()
    streaming = asyncio.create_task(keep_streaming(url, model, clients, max_tokens, stop, gaps))
    marks = [started]
    if pdf is None:
        await asyncio.sleep(seconds)
        marks.append(time.perf_counter())
        names = ["baseline"]
    else:
        names = ["reading (parse)", "embedding"]
        async with httpx.AsyncClient(timeout=600) as client:
            session = (await client.post(f"{url}/v1/sessions", json={"title": "manual"})).json()["id"]
            began = time.perf_counter()
            response = await client.post(f"{url}/v1/sessions/{session}/files",
                                         files={"file": ("manual.pdf", pdf, "application/pdf")})
            response.raise_for_status()
            file_id = response.json()["id"]
            marks = [began]
            while True:
                record = (await client.get(f"{url}/v1/sessions/{session}/files/{file_id}")).json()
                if record["status"] == "indexing" and len(marks) == 1:
                    marks.append(time.perf_counter())
                if record["status"] in ("ready", "failed"):
                    break
                await asyncio.sleep(0.2)
            marks.append(time.perf_counter())
            if record["status"] != "ready":
                raise SystemExit(f"indexing failed: {record['reason']}")
            print(f"  indexed {record['pages']} pages ({record['chunks']} passages) in {marks[-1] - began:.1f} s",
                  flush=True)
    stop.set()
    await streaming
    windows = {}
    for name, start, end in zip(names, marks, marks[1:], strict=False):
        inside = [g for t, g in gaps if start <= t < end]
        # tokens in the window: every gap is one token; the first tokens of streams are not counted
        windows[name] = (len(inside), inside, end - start)
    return windows


def row(label: str, tokens: int, gaps: list[float], seconds: float) -> str:
    return (f"| {label} | {seconds:.0f} | {tokens / seconds:.1f} | {percentile(gaps, 50) * 1000:.0f} | "
            f"{percentile(gaps, 99) * 1000:.0f} | {max(gaps, default=float('nan')) * 1000:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", type=int, default=300)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--baseline-seconds", type=float, default=40)
    parser.add_argument("--runs", nargs="+", default=RUNS, help="label=model=app.py flags, one server each")
    args = parser.parse_args()
    pdf = big_pdf(args.pages)
    print(f"PDF: {args.pages} pages, {len(pdf) / 1e6:.1f} MB", flush=True)
    rows = []
    for run in args.runs:
        label, model, flags = run.split("=", 2)
        port = free_port()
        with tempfile.TemporaryDirectory() as data:
            throughput.MODEL = model.split("@")[0]  # what start_server preloads (a name, not a version)
            proc = start_server(port, Path(data), ["--parse-timeout", "900", "--max-upload-mb", "500",
                                                   *flags.split()])
            try:
                url = f"http://127.0.0.1:{port}"
                asyncio.run(measure(url, model, args.clients, 16, 3, None))  # warm up (loads the version)
                listed = httpx.get(f"{url}/v1/models").json()["data"]
                engine = next((v["engine"] for m in listed for v in [m, *m.get("versions", [])]
                               if v["id"] == model), "?")
                print(f"{model}: baseline", flush=True)
                windows = asyncio.run(measure(url, model, args.clients, args.max_tokens, args.baseline_seconds, None))
                print(f"{model}: while indexing", flush=True)
                windows |= asyncio.run(measure(url, model, args.clients, args.max_tokens, 0, pdf))
                for name, (tokens, gaps, seconds) in windows.items():
                    rows.append(row(f"{label}, {model} ({engine}): {name}", tokens, gaps, seconds))
                    print(rows[-1], flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
    print(f"\n{args.clients} streaming chats, {args.max_tokens} tokens each, one after another; "
          f"a {args.pages}-page PDF uploaded into another session\n")
    print("| run, model: window | seconds | chat tok/s | ITL p50 ms | ITL p99 ms | ITL max ms |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
