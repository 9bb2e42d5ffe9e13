"""Files over REST with the real model and embedder: upload answers at once, answers cite the
file and page, a removed file is never cited again, asking while a file is read says so, limits
and ownership hold, and a fact from 30 turns ago is recalled from the session's memory."""

from __future__ import annotations

import time

import httpx
import pytest

from service import build_services
from tests import files
from tests.conftest import CHAT_MODEL, make_settings, serve


def new_session(url: str, **body) -> str:
    body.setdefault("params", {"temperature": 0, "max_new_tokens": 24})
    return httpx.post(f"{url}/v1/sessions", json={"model": CHAT_MODEL, **body}).json()["id"]


def upload(url: str, sid: str, name: str, data: bytes, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/sessions/{sid}/files", files={"file": (name, data)}, timeout=60, **kw)


def wait_ready(url: str, sid: str, file_id: str, **kw) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        record = httpx.get(f"{url}/v1/sessions/{sid}/files/{file_id}", **kw).json()
        if record["status"] in ("ready", "failed"):
            return record
        time.sleep(0.1)
    raise AssertionError("file never finished")


def ask(url: str, sid: str, text: str) -> dict:
    response = httpx.post(f"{url}/v1/sessions/{sid}/messages", json={"content": text}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_answers_cite_the_file_and_page_and_forget_a_removed_file(live_server):
    url = live_server.url
    sid = new_session(url)
    response = upload(url, sid, "story.pdf", files.pdf_bytes())
    assert response.status_code == 202
    record = response.json()
    assert record["status"] == "queued" and record["name"] == "story.pdf"
    assert wait_ready(url, sid, record["id"])["status"] == "ready"
    answer = ask(url, sid, "Who wrote down every storm?")
    assert answer["sources"] and answer["sources"][0]["file"] == "story.pdf"
    assert answer["sources"][0]["page"] == 2 and answer["sources"][0]["source"] == "story.pdf, page 2"
    stored = httpx.get(f"{url}/v1/sessions/{sid}").json()["messages"][-1]
    assert stored["sources"][0]["source"] == "story.pdf, page 2"  # kept with the message

    assert httpx.delete(f"{url}/v1/sessions/{sid}/files/{record['id']}").status_code == 200
    again = ask(url, sid, "Who wrote down every storm?")
    assert all(s.get("file") != "story.pdf" for s in again["sources"])
    assert httpx.get(f"{url}/v1/sessions/{sid}/files").json()["data"] == []


def test_a_responses_conversation_answers_from_its_chats_files(live_server):
    """A stored Responses conversation is a chat: a file uploaded to it is searched on that route too."""
    from openai import OpenAI
    client = OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0, timeout=180)
    greedy = {"model": CHAT_MODEL, "temperature": 0}
    chat = client.responses.create(input="Hello.", max_output_tokens=8, **greedy).conversation.id
    record = upload(live_server.url, chat, "story.pdf", files.pdf_bytes()).json()
    assert wait_ready(live_server.url, chat, record["id"])["status"] == "ready"
    answer = client.responses.create(input="Who logged every storm?", conversation=chat, max_output_tokens=40,
                                     **greedy)
    assert "Marta" in answer.output_text  # only the file says so
    stored = httpx.get(f"{live_server.url}/v1/sessions/{chat}").json()["messages"][-1]
    assert stored["sources"][0]["source"] == "story.pdf, page 2"
    for note in answer.output[0].content[0].annotations:  # where the answer cites a passage by number
        assert note.type == "file_citation" and note.filename == "story.pdf"


def test_asking_while_a_file_is_being_read_says_so(live_server, services):
    url = live_server.url
    sid = new_session(url)
    services.chat.wait_for_files, before = 0.0, services.chat.wait_for_files
    try:
        big = ("A long line of minutes about nothing in particular, item after item. " * 40 + "\n") * 800
        record = upload(url, sid, "minutes.txt", big.encode()).json()
        response = httpx.post(f"{url}/v1/sessions/{sid}/messages", json={"content": "What is in the minutes?"},
                              timeout=60)
        assert response.status_code == 409
        assert "minutes.txt" in response.json()["error"]["message"] and response.headers["retry-after"]
        # or, asked not to wait, answered at once from what is ready
        now = httpx.post(f"{url}/v1/sessions/{sid}/messages", timeout=60,
                         json={"content": "Say hi.", "wait_for_files": False, "params": {"max_new_tokens": 4}})
        assert now.status_code == 200 and now.json()["role"] == "assistant"
        assert httpx.get(f"{url}/v1/sessions/{sid}/files/{record['id']}").json()["status"] != "ready"
        httpx.delete(f"{url}/v1/sessions/{sid}/files/{record['id']}")
    finally:
        services.chat.wait_for_files = before


def test_bad_uploads_are_refused_clearly(live_server, services):
    url = live_server.url
    sid = new_session(url)
    too_big = upload(url, sid, "huge.txt", b"x" * (services.documents.max_bytes + 1))
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]["message"]
    empty = upload(url, sid, "empty.txt", b"")
    assert empty.status_code == 400
    binary = upload(url, sid, "notes.txt", files.binary_bytes()).json()
    assert wait_ready(url, sid, binary["id"])["reason"] == "this looks like a binary file, not text"
    sneaky = upload(url, sid, "../../app.py", b"print('hi')\n").json()
    assert sneaky["name"] == "app.py"
    assert httpx.get(f"{url}/v1/sessions/{sid}/files/{'f' * 32}").status_code == 404
    assert httpx.get(f"{url}/v1/sessions/{'0' * 32}/files").status_code == 404


def test_another_users_files_are_not_found(pool, embedder, tmp_path):
    server = serve(build_services(make_settings(tmp_path, api_keys=["key-a", "key-b"]), pool=pool, embedder=embedder),
                   with_ui=False)
    try:
        a, b = {"x-api-key": "key-a"}, {"x-api-key": "key-b"}
        sid = httpx.post(f"{server.url}/v1/sessions", json={}, headers=a).json()["id"]
        record = upload(server.url, sid, "story.pdf", files.pdf_bytes(), headers=a).json()
        assert upload(server.url, sid, "x.txt", b"hello", headers=b).status_code == 404
        assert httpx.get(f"{server.url}/v1/sessions/{sid}/files", headers=b).status_code == 404
        assert httpx.get(f"{server.url}/v1/sessions/{sid}/files/{record['id']}", headers=b).status_code == 404
        assert httpx.delete(f"{server.url}/v1/sessions/{sid}/files/{record['id']}", headers=b).status_code == 404
        assert wait_ready(server.url, sid, record["id"], headers=a)["status"] == "ready"
    finally:
        server.stop()


@pytest.mark.parametrize("turns", [30])
def test_a_fact_from_thirty_turns_ago_is_recalled(live_server, turns):
    url = live_server.url
    sid = new_session(url, params={"temperature": 0, "max_new_tokens": 3},
                      context_policy={"max_history_messages": 6})
    ask(url, sid, "Remember this: my sister's cat is called Biscuit and she is orange.")
    for n in range(turns):
        ask(url, sid, f"Filler question number {n}: name a number.")
    answer = ask(url, sid, "What is the name of my sister's cat?")
    assert answer["history_dropped"] >= 50  # the first turn is far outside the window
    recalled = [s for s in answer["sources"] if s["kind"] == "turn"]
    assert recalled and recalled[0]["source"] == "earlier in this chat"
    assert "Biscuit" in recalled[0]["excerpt"]
