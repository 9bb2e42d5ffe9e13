"""Retrieval evaluation: recall@k and MRR of Shoal's document memory on a small fixed set.

    .venv/bin/python bench/retrieval_eval.py [--k 4]

Indexes the test documents (a pdf, a docx, code in three languages, a long text) through the real
pipeline (sandboxed parsing, chunking, all-MiniLM-L6-v2) and asks questions written in other
words than the text; a question is answered when a retrieved passage comes from the expected
source and contains the expected words. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memory.embeddings import Embedder  # noqa: E402
from memory.store import SessionStore  # noqa: E402
from service.documents import DocumentService  # noqa: E402
from tests import files  # noqa: E402

# (question, source prefix, words the passage must contain)
QUESTIONS = [
    ("Who kept a written record of bad weather?", "story.pdf, page 2", "notebook"),
    ("When was the port constructed?", "story.pdf, page 1", "1874"),
    ("How wet is the valley each year?", "story.pdf, page 3", "1200"),
    ("How much are we spending on advertising on the radio?", "budget.docx", "12,900"),
    ("What does printing cost?", "budget.docx", "4,300"),
    ("Who is being hired next spring?", "budget.docx", "engineers"),
    ("Which function computes the surface of a round shape?", "geometry.py", "circle_area"),
    ("How do I add more units of a product to the stock?", "geometry.py", "restock"),
    ("How does the program accept network connections?", "server.rs", "TcpListener"),
    ("How is the sum of a shopping basket calculated?", "cart.js", "totalPrice"),
    ("How do I reduce a price by a percentage?", "cart.js", "applyDiscount"),
    ("What spice gives the festival soup its flavour?", "minutes.txt", "paprika"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        store = SessionStore(Path(folder) / "sessions")
        service = DocumentService(store, Path(folder), Embedder(), max_bytes=10**8, threshold=0.0)
        sid = store.create("eval").id
        uploads = [("story.pdf", files.pdf_bytes()), ("budget.docx", files.docx_bytes()),
                   ("minutes.txt", files.long_text().encode())] + [(n, c.encode()) for n, c in files.CODE.items()]
        started = time.monotonic()
        ids = [service.add("eval", sid, name, data)["id"] for name, data in uploads]
        while any(service.get("eval", sid, i)["status"] not in ("ready", "failed") for i in ids):
            time.sleep(0.05)
        indexed = time.monotonic() - started
        chunks = sum(service.get("eval", sid, i)["chunks"] for i in ids)
        hits_at = {1: 0, args.k: 0}
        reciprocal = 0.0
        rows = []
        for question, source, words in QUESTIONS:
            passages = service.retrieve("eval", sid, question, k=args.k)
            rank = next((n for n, p in enumerate(passages, 1) if p.source.startswith(source) and words in p.text),
                        None)
            for cutoff in hits_at:
                hits_at[cutoff] += int(rank is not None and rank <= cutoff)
            reciprocal += 1 / rank if rank else 0.0
            top = f"{passages[0].source} ({passages[0].score:.2f})" if passages else "-"
            rows.append(f"| {question} | {source} | {rank or '-'} | {top} |")
        service.close()
        store.close()
    n = len(QUESTIONS)
    print(f"Indexed {len(uploads)} files ({chunks} passages) in {indexed:.1f} s\n")
    print("| question | expected source | rank | top passage (score) |\n|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nrecall@1: {hits_at[1] / n:.2f}   recall@{args.k}: {hits_at[args.k] / n:.2f}   MRR: {reciprocal / n:.2f}")


if __name__ == "__main__":
    main()
