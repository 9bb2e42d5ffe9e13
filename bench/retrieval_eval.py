"""Retrieval evaluation over real documents: recall@1/4/8, MRR and no-answer precision, per variant.

    .venv/bin/python bench/retrieval_eval.py [--variants all|default] [--sweep] [--json out.json]
                                             [--engine sentence-transformers|llama.cpp]

The documents are real files that ship on a Debian machine or in the installed packages (two PDF
manuals, a licence, a package README, source files, a docx built from a real text); the
questions, each with where its answer is, live in bench/retrieval/eval_set.json (extend them
there; `python -m bench.retrieval.corpus --check` checks every answer is where it says). Each
document is parsed by the real sandboxed parser, chunked, embedded with all-MiniLM-L6-v2 and
stored in a real session store; each variant then asks every question.

A question is answered at rank r when the passages up to r hold its answer (for a question whose
answer spans two places, both). A question answered by no file is right when nothing is cited.
"no-answer precision" is the share of the questions where nothing was cited that really had no
answer; "no-answer recall" the share of unanswerable questions where nothing was cited.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.retrieval import corpus  # noqa: E402
from memory import index as passages  # noqa: E402
from memory.chunking import _code_chunks, chunk_document  # noqa: E402
from memory.embeddings import Embedder  # noqa: E402
from memory.index import Retrieval, Searcher  # noqa: E402
from memory.store import SessionStore  # noqa: E402
from parsing import ParseLimits, parse_isolated  # noqa: E402

DEPTH = 8


def old_chunks(document, file_id, name):
    """The chunker before structure-aware chunking: the recursive splitter on each section."""
    language = document.language or ("markdown" if document.kind == "markdown" else None)
    return _code_chunks(replace(document, language=language), file_id, name, 800)


CHUNKERS = {
    "structure": lambda d, f, n: chunk_document(d, f, n),  # CHUNK_CHARS (1200)
    "structure-500": lambda d, f, n: chunk_document(d, f, n, size=500),
    "structure-800": lambda d, f, n: chunk_document(d, f, n, size=800),
    "structure-1600": lambda d, f, n: chunk_document(d, f, n, size=1600),
    "recursive (before)": old_chunks,
}
DEFAULT = Retrieval()
BEFORE = Retrieval(mode="dense", min_similarity=0.2, k=4)  # what Shoal did before (threshold 0.2)
VARIANTS = [  # (name, chunker, embed the heading path?, retrieval)
    ("before: recursive chunks of 800, dense only", "recursive (before)", False, BEFORE),
    ("structure chunks, dense only", "structure", True, replace(DEFAULT, mode="dense")),
    ("structure chunks, BM25 only (no gate)", "structure", True, replace(DEFAULT, mode="lexical", min_coverage=0)),
    ("structure chunks, hybrid (RRF) = default", "structure", True, DEFAULT),
    ("structure chunks, hybrid, BM25 weight 0.5", "structure", True, replace(DEFAULT, lexical_weight=0.5)),
    ("structure chunks, hybrid, BM25 weight 2", "structure", True, replace(DEFAULT, lexical_weight=2.0)),
    ("structure chunks without heading path, hybrid", "structure", False, DEFAULT),
    ("recursive chunks, hybrid", "recursive (before)", False, DEFAULT),
    ("structure chunks of 500, hybrid", "structure-500", True, DEFAULT),
    ("structure chunks of 800, hybrid", "structure-800", True, DEFAULT),
    ("structure chunks of 1600, hybrid", "structure-1600", True, DEFAULT),
]


def build(store: SessionStore, embedder: Embedder, documents, chunker: str, heading_path: bool) -> tuple[str, int]:
    session = store.create("eval").id
    total = 0
    for file_id, (name, document) in enumerate(documents):
        chunks = CHUNKERS[chunker](document, f"{file_id:032x}", name)
        if not heading_path:
            for chunk in chunks:
                chunk.context = None
        vectors = embedder.embed([c.index_text() for c in chunks])
        store.transaction(lambda sql, c=chunks, v=vectors: passages.insert(sql, session, c, v))
        total += len(chunks)
    return session, total


def rank_of(question: dict, hits) -> int | None:
    """The rank at which the hits hold the answer (all of it for need=all), or None."""
    found = []
    for answer in question["answers"]:
        rank = next((n for n, h in enumerate(hits, 1) if corpus.matches(
            h.chunk.file_name, h.chunk.text, h.chunk.page,
            (h.chunk.first_line, h.chunk.last_line) if h.chunk.first_line is not None else None, answer)), None)
        found.append(rank)
    if question.get("need", "any") == "all":
        return None if any(r is None for r in found) else max(found)
    ranks = [r for r in found if r is not None]
    return min(ranks) if ranks else None


def evaluate(searcher: Searcher, session: str, questions, vectors, how: Retrieval, doc_type) -> dict:
    rows = []
    for question in questions:
        hits = searcher.search(session, question["question"], vectors[question["id"]], how, k=DEPTH)
        rows.append({"id": question["id"], "type": question["type"],
                     "doc": doc_type(question), "rank": rank_of(question, hits) if question["answers"] else None,
                     "cited": bool(hits), "answerable": bool(question["answers"]),
                     "top": f"{hits[0].chunk.source()} ({hits[0].similarity:.2f})" if hits else "-"})
    return {"rows": rows, **metrics(rows)}


def metrics(rows) -> dict:
    answerable = [r for r in rows if r["answerable"]]
    silent = [r for r in rows if not r["cited"]]
    unanswerable = [r for r in rows if not r["answerable"]]
    out = {f"r@{k}": sum(1 for r in answerable if r["rank"] and r["rank"] <= k) / max(1, len(answerable))
           for k in (1, 4, 8)}
    out["mrr"] = sum(1 / r["rank"] for r in answerable if r["rank"]) / max(1, len(answerable))
    out["na_precision"] = (sum(1 for r in silent if not r["answerable"]) / len(silent)) if silent else float("nan")
    out["na_recall"] = sum(1 for r in unanswerable if not r["cited"]) / max(1, len(unanswerable))
    out["n"] = len(answerable)
    return out


def table(title: str, results: dict[str, dict]) -> str:
    lines = [f"### {title}", "", "| variant | recall@1 | recall@4 | recall@8 | MRR | no-answer precision | "
             "no-answer recall |", "|---|---|---|---|---|---|---|"]
    for name, m in results.items():
        lines.append(f"| {name} | {m['r@1']:.2f} | {m['r@4']:.2f} | {m['r@8']:.2f} | {m['mrr']:.2f} | "
                     f"{m['na_precision']:.2f} | {m['na_recall']:.2f} |")
    return "\n".join(lines)


def breakdown(rows, key: str) -> str:
    groups = defaultdict(list)
    for row in rows:
        if row["answerable"]:
            groups[row[key]].append(row)
    lines = [f"| {key} | questions | recall@1 | recall@4 | recall@8 | MRR |", "|---|---|---|---|---|---|"]
    for name, group in sorted(groups.items()):
        m = metrics(group)
        lines.append(f"| {name} | {len(group)} | {m['r@1']:.2f} | {m['r@4']:.2f} | {m['r@8']:.2f} | {m['mrr']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", choices=["all", "default"], default="all")
    parser.add_argument("--sweep", action="store_true", help="also sweep the relevance gate of the default")
    parser.add_argument("--misses", action="store_true", help="list the questions the default misses")
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument("--engine", choices=("sentence-transformers", "llama.cpp"), default="sentence-transformers",
                        help="embed with sentence-transformers in this process, or with the pool's model on llama.cpp")
    args = parser.parse_args()
    data = json.loads((Path(corpus.__file__).parent / "eval_set.json").read_text())
    uploads = corpus.materialize()
    present = {name for name, _, _ in uploads}
    types = {d["name"]: d["type"] for d in data["documents"]}
    questions = [q for q in data["questions"] if all(a["file"] in present for a in q["answers"])]
    skipped = len(data["questions"]) - len(questions)

    def doc_type(question):
        return types[question["answers"][0]["file"]] if question["answers"] else "none"

    started = time.monotonic()
    documents = [(name, parse_isolated(name, blob, ParseLimits(seconds=120))) for name, blob, _ in uploads]
    parsed = time.monotonic() - started
    embedder, services = Embedder(), None
    if args.engine == "llama.cpp":  # what Shoal uses where llama.cpp is built: the pool's model on llama.cpp
        from service import Settings, build_services
        from service.services import retrieval_embedder
        services = build_services(Settings(data_dir=Path(tempfile.mkdtemp()), preload=[]))
        embedder = retrieval_embedder(services.pool)
        embedder.embed(["warm up"])
        print(f"embedding engine: {services.pool.status(embedder.model).get('engine')}")
    vectors = dict(zip([q["id"] for q in questions], embedder.embed([q["question"] for q in questions]), strict=True))
    chosen = VARIANTS if args.variants == "all" else [v for v in VARIANTS if v[0].endswith("= default")]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        store = SessionStore(Path(folder) / "sessions")
        searcher = Searcher(lambda: store.sql)
        sessions: dict[tuple[str, bool], tuple[str, int, float]] = {}
        for name, chunker, heading_path, how in chosen:
            if (chunker, heading_path) not in sessions:
                began = time.monotonic()
                session, count = build(store, embedder, documents, chunker, heading_path)
                sessions[chunker, heading_path] = (session, count, time.monotonic() - began)
            results[name] = evaluate(searcher, sessions[chunker, heading_path][0], questions, vectors, how, doc_type)
        sweep = []
        if args.sweep:
            session = sessions[("structure", True)][0]
            for similarity in (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5):
                for coverage in (0.6, 0.8, 1.01):
                    how = replace(DEFAULT, min_similarity=similarity, min_coverage=coverage)
                    m = evaluate(searcher, session, questions, vectors, how, doc_type)
                    cited = sum(1 for r in m["rows"] if r["answerable"] and r["cited"]) / max(1, m["n"])
                    sweep.append((similarity, coverage, m["r@4"], cited, m["na_precision"], m["na_recall"]))
        store.close()
    counts = defaultdict(int)
    for q in questions:
        counts[q["type"]] += 1
    print(f"{len(uploads)} documents ({', '.join(sorted(present))}), parsed in {parsed:.1f} s; "
          f"{len(questions)} questions ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})"
          + (f"; {skipped} skipped (their document is missing)" if skipped else ""))
    for (chunker, heading_path), (_, count, seconds) in sessions.items():
        print(f"- chunking {chunker}{' + heading path' if heading_path else ''}: {count} passages, "
              f"chunked and embedded in {seconds:.1f} s")
    print()
    print(table("Variants (k up to 8; a passage is cited only when it passes the relevance gate)", results))
    default = next(iter(r for n, r in results.items() if n.endswith("= default")), next(iter(results.values())))
    print("\n### The default (structure chunks, hybrid), by document type\n")
    print(breakdown(default["rows"], "doc"))
    print("\n### The default, by question type\n")
    print(breakdown(default["rows"], "type"))
    if sweep:
        print("\n### Relevance gate of the default: similarity and word-coverage thresholds\n")
        print("| min similarity | min coverage | recall@4 | answerable questions citing something | "
              "no-answer precision | no-answer recall |\n|---|---|---|---|---|---|")
        for row in sweep:
            print("| {} | {} | {:.2f} | {:.2f} | {:.2f} | {:.2f} |".format(*row))
    if args.misses:
        print("\n### Questions the default misses at 4\n")
        by_id = {q["id"]: q for q in questions}
        for row in default["rows"]:
            missed = row["answerable"] and not (row["rank"] and row["rank"] <= 4)
            if missed or (not row["answerable"] and row["cited"]):
                print(f"- {row['id']} ({row['type']}): {by_id[row['id']]['question']} -> top {row['top']}, "
                      f"rank {row['rank']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if services is not None:
        services.close()


if __name__ == "__main__":
    main()
