"""Documents in a session with the real embedder: background indexing with status, retrieval by
meaning (other words than the text), citations' positions, removal, hostile files."""

from __future__ import annotations

import time

import pytest

from memory.store import SessionStore
from parsing import ParseLimits
from service.documents import DocumentService
from tests import files


@pytest.fixture
def docs(tmp_path, embedder):
    store = SessionStore(tmp_path / "sessions")
    service = DocumentService(store, tmp_path, embedder, max_bytes=5_000_000, limits=ParseLimits(seconds=60))
    session = store.create("alice")
    yield service, store, session.id
    service.close()
    store.close()


def wait_ready(service, user, sid, file_id, timeout=120):
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = service.get(user, sid, file_id)
        if not seen or seen[-1] != record["status"]:
            seen.append(record["status"])
        if record["status"] in ("ready", "failed"):
            return record, seen
        time.sleep(0.02)
    raise AssertionError(f"file never finished: {seen}")


def test_upload_answers_at_once_then_moves_through_its_states(docs):
    service, _, sid = docs
    record = service.add("alice", sid, "story.pdf", files.pdf_bytes())
    assert record["status"] == "queued" and record["progress"] == 0.0
    final, seen = wait_ready(service, "alice", sid, record["id"])
    assert final["status"] == "ready" and final["chunks"] >= 3 and final["pages"] == 3
    order = ["queued", "parsing", "indexing", "ready"]
    assert [s for s in order if s in seen] == [s for s in seen if s in order]  # never backwards
    assert "parsing" in seen and seen[-1] == "ready"


def test_retrieval_finds_the_right_passage_for_questions_in_other_words(docs):
    service, _, sid = docs
    uploads = [("story.pdf", files.pdf_bytes()), ("budget.docx", files.docx_bytes()),
               ("minutes.txt", files.long_text().encode())] + [(n, c.encode()) for n, c in files.CODE.items()]
    ids = [service.add("alice", sid, name, data)["id"] for name, data in uploads]
    for file_id in ids:
        assert wait_ready(service, "alice", sid, file_id)[0]["status"] == "ready"
    expectations = [
        ("Who kept a written record of bad weather?", "story.pdf, page 2"),
        ("How much are we spending on advertising on the radio?", "budget.docx"),
        ("Which function computes the surface of a round shape?", "geometry.py, lines"),
        ("What spice gives the festival soup its flavour?", "minutes.txt, lines"),
        ("How does the program accept network connections?", "server.rs, lines"),
    ]
    for question, source in expectations:
        hits = service.retrieve("alice", sid, question)
        assert hits, question
        assert hits[0].source.startswith(source), (question, [h.source for h in hits])
    soup = service.retrieve("alice", sid, "What spice gives the festival soup its flavour?")[0]
    assert "paprika" in soup.text and soup.meta["lines"][0] <= soup.meta["lines"][1]


def test_removing_a_file_removes_its_passages_at_once(docs):
    service, _, sid = docs
    pdf = service.add("alice", sid, "story.pdf", files.pdf_bytes())["id"]
    docx = service.add("alice", sid, "budget.docx", files.docx_bytes())["id"]
    for file_id in (pdf, docx):
        wait_ready(service, "alice", sid, file_id)
    assert any("story.pdf" in h.source for h in service.retrieve("alice", sid, "lighthouse keeper storms"))
    service.remove("alice", sid, pdf)
    assert all("story.pdf" not in h.source for h in service.retrieve("alice", sid, "lighthouse keeper storms"))
    assert [r["name"] for r in service.list("alice", sid)] == ["budget.docx"]


def test_a_hostile_file_fails_with_a_reason_and_harms_nothing_else(docs):
    service, _, sid = docs
    bomb = service.add("alice", sid, "bomb.docx", files.zip_bomb_docx())["id"]
    good = service.add("alice", sid, "story.pdf", files.pdf_bytes())["id"]
    failed, _ = wait_ready(service, "alice", sid, bomb)
    assert failed["status"] == "failed" and "zip bomb" in failed["reason"]
    assert wait_ready(service, "alice", sid, good)[0]["status"] == "ready"
    assert service.retrieve("alice", sid, "lighthouse keeper")


def test_uploads_are_stored_under_server_chosen_names(docs, tmp_path):
    service, _, sid = docs
    record = service.add("alice", sid, "../../app.py", b"print('hello')\n")
    assert record["name"] == "app.py"
    stored = list((tmp_path / "files" / sid).iterdir())
    assert [p.name for p in stored] == [record["id"]]
    assert stored[0].resolve().is_relative_to(tmp_path.resolve())
