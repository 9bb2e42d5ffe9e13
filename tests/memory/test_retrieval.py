"""Hybrid retrieval and its storage, with the real embedder and a real on-disk store: passages live in
the session store's SQLite database, removals are atomic with the file record, an insert touches no
existing passage, a kill -9 while indexing leaves nothing half-done, BM25 statistics are the
session's own, a question no file answers cites nothing, and passages keep their structure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from llm_pool import faults
from memory import index as passages
from memory.chunking import chunk_document
from memory.store import SessionStore, StorageError
from parsing import Document, ParseLimits, Section
from service.documents import DocumentService
from tests import files

ROOT = Path(__file__).resolve().parents[2]

MANUAL = """# Frobnicator manual

## Installing

Run the installer as an ordinary user. The frobnicator keeps its settings in ~/.frob/config.

## Error codes

| Code | Name | Meaning |
|------|------|---------|
| E101 | FROB_NO_SPACE | The disk holding the spool is full |
| E102 | FROB_BAD_KEY | The licence key was rejected by the server |
| E103 | FROB_TIMEOUT | The spooler did not answer within 30 seconds |

## Maintenance

- Empty the spool once a week with `frob purge`.
- Rotate the logs each month; the frobnicator reopens them on SIGHUP.
- Replace the drive belt every 4000 hours of service.
"""


@pytest.fixture(params=["sqlite", "postgres"])
def docs(request, tmp_path, embedder):
    """Files and their passages in the embedded store and on a real PostgreSQL server."""
    url = request.getfixturevalue("postgres_server").new_database() if request.param == "postgres" else None
    store = SessionStore(tmp_path / "sessions", url)
    service = DocumentService(store, tmp_path, embedder, max_bytes=5_000_000, limits=ParseLimits(seconds=60))
    yield service, store
    faults.disarm_all()
    service.close()
    store.close()


def ready(service, user, sid, file_id, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = service.get(user, sid, file_id)
        if record["status"] in ("ready", "failed"):
            assert record["status"] == "ready", record
            return record
        time.sleep(0.02)
    raise AssertionError("the file never finished")


def rows(store, sid, file_id=None):
    return passages.count(store.sql, sid, file_id)


def test_passages_live_in_the_session_store_and_go_with_their_file_or_session(docs, tmp_path):
    service, store = docs
    sid = store.create("alice").id
    pdf = service.add("alice", sid, "story.pdf", files.pdf_bytes())["id"]
    md = service.add("alice", sid, "manual.md", MANUAL.encode())["id"]
    record = ready(service, "alice", sid, pdf)
    ready(service, "alice", sid, md)
    assert rows(store, sid, pdf) == record["chunks"] > 0
    assert not (tmp_path / "index").exists()  # no per-session index files any more
    service.remove("alice", sid, pdf)
    assert rows(store, sid, pdf) == 0 and rows(store, sid, md) > 0
    assert store.check() == []
    store.delete("alice", sid)
    service.delete_session(sid)
    assert rows(store, sid) == 0
    assert store.sql("SELECT count(*) FROM shoal_postings WHERE session_id = ?", (sid,)).fetchone()[0] == 0
    assert store.check() == []


def test_a_failed_removal_keeps_both_the_file_and_its_passages(docs):
    service, store = docs
    sid = store.create("alice").id
    md = service.add("alice", sid, "manual.md", MANUAL.encode())["id"]
    before = ready(service, "alice", sid, md)["chunks"]
    faults.arm("store.write")
    with pytest.raises(StorageError):
        service.remove("alice", sid, md)
    assert [r["id"] for r in service.list("alice", sid)] == [md]
    assert rows(store, sid, md) == before
    assert service.retrieve("alice", sid, "How often should the drive belt be changed?")


def test_adding_a_file_leaves_existing_passages_untouched(docs):
    service, store = docs
    sid = store.create("alice").id
    ready(service, "alice", sid, service.add("alice", sid, "manual.md", MANUAL.encode())["id"])
    before = store.sql("SELECT id, text, vector FROM shoal_passages WHERE session_id = ? ORDER BY id",
                       (sid,)).fetchall()
    ready(service, "alice", sid, service.add("alice", sid, "story.pdf", files.pdf_bytes())["id"])
    after = store.sql("SELECT id, text, vector FROM shoal_passages WHERE session_id = ? ORDER BY id",
                      (sid,)).fetchall()
    assert after[:len(before)] == before and len(after) > len(before)


def test_words_the_embedder_misses_are_found_by_the_lexical_index(docs):
    service, store = docs
    sid = store.create("alice").id
    for name, data in [("manual.md", MANUAL.encode()), ("story.pdf", files.pdf_bytes()),
                       ("minutes.txt", files.long_text().encode())]:
        ready(service, "alice", sid, service.add("alice", sid, name, data)["id"])
    hits = service.retrieve("alice", sid, "what does FROB_BAD_KEY mean")
    assert hits and "FROB_BAD_KEY" in hits[0].text and hits[0].meta["section"].endswith("Error codes")
    hits = service.retrieve("alice", sid, "E103")
    assert hits and "spooler did not answer" in hits[0].text


def test_a_question_no_file_answers_cites_nothing(docs):
    service, store = docs
    sid = store.create("alice").id
    for name, data in [("manual.md", MANUAL.encode()), ("story.pdf", files.pdf_bytes()),
                       ("budget.docx", files.docx_bytes())]:
        ready(service, "alice", sid, service.add("alice", sid, name, data)["id"])
    assert service.retrieve("alice", sid, "What is the capital city of Peru?") == []
    assert service.retrieve("alice", sid, "Recommend a good recipe for banana bread") == []
    assert service.retrieve("alice", sid, "How often should the drive belt be changed?")


def test_scores_depend_only_on_the_sessions_own_passages(docs):
    """Another user's uploads change neither what this session finds nor its scores."""
    service, store = docs
    mine = store.create("alice").id
    ready(service, "alice", mine, service.add("alice", mine, "manual.md", MANUAL.encode())["id"])
    query = "which error means the licence key was refused"
    vector = service.embedder.embed([query])[0]

    def ranking():
        return [(h.chunk.text, round(h.score, 9), round(h.coverage, 9))
                for h in service.searcher.search(mine, query, vector, k=8)]

    before = ranking()
    theirs = store.create("mallory").id
    flood = "\n\n".join(f"Licence key error {n}: the key was refused by the server." for n in range(200))
    ready(service, "mallory", theirs, service.add("mallory", theirs, "flood.txt", flood.encode())["id"])
    assert ranking() == before
    assert all("flood" not in (p.meta["file"] or "") for p in service.retrieve("alice", mine, query))
    with pytest.raises(Exception, match="not found"):
        service.retrieve("mallory", mine, query)


def test_a_turn_remembered_while_a_question_is_searched_is_no_server_error(docs):
    """A turn is remembered in the background while another question of the chat is searched:
    stored after the search read the vectors but before it read the word index, it was a
    KeyError (a 500 for the chat, seen once in CI). It is simply found by the next search."""
    from memory.chunking import Chunk
    from memory.index import Searcher
    service, store = docs
    sid = store.create("alice").id
    ready(service, "alice", sid, service.add("alice", sid, "manual.md", MANUAL.encode())["id"])
    query = "how often is the drive belt replaced"
    vector = service.embedder.embed([query])[0]
    turn = "User: when was the drive belt replaced?\nAssistant: the drive belt was replaced in March."
    stored = []

    def sql(statement, *args):
        if "avg(length)" in statement and not stored:  # the word index is read next
            stored.append(True)
            store.transaction(lambda tx: passages.insert(tx, sid, [Chunk(turn, "", "", kind="turn", turn=1)],
                                                         service.embedder.embed([turn])))
        return store.sql(statement, *args)

    searcher = Searcher(lambda: sql)
    hits = searcher.search(sid, query, vector)
    assert stored and hits and all(h.chunk.kind != "turn" for h in hits)
    assert any(h.chunk.kind == "turn" for h in searcher.search(sid, query, vector))


def test_chunks_keep_tables_lists_and_headings_together():
    document = Document("markdown", [Section(MANUAL, first_line=1)])
    chunks = chunk_document(document, "f", "manual.md", size=200)
    table = [c for c in chunks if "FROB_" in c.text]
    assert table and all(c.text.count("| Code | Name | Meaning |") == 1 for c in table)  # header in each piece
    assert all(line.startswith("|") for c in table for line in c.text.splitlines()[1:] if line.strip())
    rows_seen = [line for c in table for line in c.text.splitlines() if line.startswith("| E10")]
    assert sorted(rows_seen) == sorted(line for line in MANUAL.splitlines() if line.startswith("| E10"))
    belts = [c for c in chunks if "drive belt" in c.text]
    assert belts and "every 4000 hours of service" in belts[0].text  # a list item is never cut
    assert belts[0].context == "Frobnicator manual › Maintenance"
    assert belts[0].index_text().startswith("Frobnicator manual › Maintenance\n")
    lines = MANUAL.splitlines()
    header = {"| Code | Name | Meaning |", "|------|------|---------|"}
    for chunk in chunks:  # citations' line ranges hold the passage (a repeated table header aside)
        body = [line for line in chunk.text.splitlines() if line not in header or chunk is table[0]]
        assert body[0] in lines[chunk.first_line - 1] and body[-1] in lines[chunk.last_line - 1]


def test_pdf_headings_follow_their_numbering_and_page_furniture_is_dropped():
    titles = ["Introduction", "Installing", "Usage", "Errors", "Licence"]
    pages = [f"My Manual\n{n}. {title}\n7 CARD16 VERSION 1\nThe {title.lower()} chapter explains step {n}.\n{n}"
             for n, title in enumerate(titles, 1)]
    document = Document("pdf", [Section(text, page=n) for n, text in enumerate(pages, 1)], pages=5)
    chunks = chunk_document(document, "f", "m.pdf")
    assert [c.context for c in chunks] == [f"{n}. {title}" for n, title in enumerate(titles, 1)]
    assert [c.page for c in chunks] == [1, 2, 3, 4, 5]
    assert all("My Manual" not in c.text for c in chunks)  # a running header on every page
    assert all("7 CARD16 VERSION 1" in c.text for c in chunks)  # a number out of sequence is no heading
    assert all(not c.text.rstrip().endswith(str(c.page)) for c in chunks)  # nor the page number


KILLER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from memory.embeddings import Embedder
    from memory.store import SessionStore
    from service.documents import DocumentService
    folder = Path(sys.argv[1])
    store = SessionStore(folder / "sessions")
    service = DocumentService(store, folder, Embedder(), max_bytes=10**8, embed_batch=4)
    sid = store.create("alice").id
    text = "\\n\\n".join(f"Paragraph {{n}}: the committee reviewed item {{n}} of the agenda, then item {{n}} "
                        "was sent back for more work by the drafting group." for n in range(1500))
    record = service.add("alice", sid, "minutes.txt", text.encode())
    print(sid, record["id"], flush=True)
    time.sleep(600)
""")


def test_kill_minus_nine_while_indexing_leaves_no_half_file_and_resumes(tmp_path, embedder):
    proc = subprocess.Popen([sys.executable, "-c", KILLER.format(root=str(ROOT)), str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        sid, file_id = proc.stdout.readline().split()
        store = SessionStore(tmp_path / "sessions")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            record = store.file("alice", sid, file_id)
            if record["status"] == "indexing" and record["progress"] > 0.4:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"never saw the file half indexed: {record}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    assert store.file("alice", sid, file_id)["status"] == "indexing"
    assert rows(store, sid, file_id) == 0  # nothing of a half-embedded file
    assert store.check() == []
    service = DocumentService(store, tmp_path, embedder, max_bytes=10**8)  # a restart resumes it
    try:
        record = ready(service, "alice", sid, file_id, timeout=300)
        assert rows(store, sid, file_id) == record["chunks"] > 100
        assert service.retrieve("alice", sid, "what happened to item 1234 of the agenda")
    finally:
        service.close()
        store.close()


def test_an_index_of_an_older_version_moves_into_the_store(tmp_path, embedder):
    store = SessionStore(tmp_path / "sessions")
    sid = store.create("alice").id
    old = tmp_path / "index" / sid
    old.mkdir(parents=True)
    chunk = {"text": "The secret ingredient is smoked paprika.", "file_id": "a" * 32, "file_name": "notes.txt",
             "kind": "file", "page": None, "heading": None, "first_line": 3, "last_line": 3, "language": None,
             "turn": None}
    (old / "chunks.json").write_text(json.dumps([chunk]))
    np.save(old / "vectors.npy", embedder.embed([chunk["text"]]))
    store.add_file("alice", sid, {"id": "a" * 32, "name": "notes.txt", "status": "ready", "progress": 1.0})
    service = DocumentService(store, tmp_path, embedder, max_bytes=10**6)
    try:
        assert not (tmp_path / "index").exists()
        hits = service.retrieve("alice", sid, "which secret ingredient is in it")
        assert hits and hits[0].source == "notes.txt, lines 3-3"
    finally:
        service.close()
        store.close()


class RecordingEmbedder:
    """The real embedder, noting the size of every background batch."""

    def __init__(self, real):
        self.real, self.batches = real, []

    def embed(self, texts, background=False):
        if background:
            self.batches.append(len(texts))
        return self.real.embed(texts, background)


@pytest.mark.parametrize("chatting", [False, True])
def test_indexing_steps_aside_while_chats_generate(tmp_path, embedder, chatting):
    store = SessionStore(tmp_path / "sessions")
    recorder = RecordingEmbedder(embedder)
    service = DocumentService(store, tmp_path, recorder, max_bytes=10**7, embed_batch=16,
                              busy=lambda: chatting, yield_seconds=0.05)
    try:
        sid = store.create("alice").id
        text = "\n\n".join(f"Paragraph {n}: item {n} of the agenda was reviewed and approved by the board."
                           for n in range(1500))
        record = ready(service, "alice", sid, service.add("alice", sid, "minutes.txt", text.encode())["id"])
        assert sum(recorder.batches) == record["chunks"] > 60
        assert set(recorder.batches[:-1]) == ({4} if chatting else {16})  # small batches while chats run
    finally:
        service.close()
        store.close()
