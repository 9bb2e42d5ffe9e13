"""Per-user quotas, played against real servers on loopback. The findings: one user made 320
sessions with 100 KB system prompts in 45 s through the UI and 4,408 (347 MB) over REST, none
refused; one user's uploads filled the data dir, and the next upload got a 500 "internal error".

Each test is its own user (an API key of its own), so none depends on another's usage; the server
has tiny quotas so the limits are reached in a few requests."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid

import httpx
import pytest

from tests.conftest import CHAT_MODEL, make_settings, serve
from tests.security.conftest import bearer, services_of

KEYS = {name: f"sk-quota-{name}-0123456789" for name in (
    "sessions", "ui", "prompt", "messages", "ui-send", "files", "bytes", "rate")}
LIMITS = {"max_sessions_per_user": 3, "max_messages_per_session": 4, "max_system_prompt_chars": 1000,
          "max_files_per_user": 3, "max_stored_mb_per_user": 0.05, "max_uploads_per_minute": 5,
          "min_free_disk_mb": 0}


@pytest.fixture(scope="module")
def quota_server(pool, embedder, tmp_path_factory):
    from service import build_services
    settings = make_settings(tmp_path_factory.mktemp("quotas"), api_keys=list(KEYS.values()),
                             trust_loopback=False, **LIMITS)
    server = serve(build_services(settings, pool=pool, embedder=embedder))
    yield server
    server.stop()


def as_user(name: str) -> dict:
    return bearer(KEYS[name])


def create(server, who: str, **body) -> httpx.Response:
    body.setdefault("model", CHAT_MODEL)
    return httpx.post(f"{server.url}/v1/sessions", headers=as_user(who), json=body, timeout=30)


def upload(server, who: str, sid: str, size: int, name: str = "notes.txt") -> httpx.Response:
    return httpx.post(f"{server.url}/v1/sessions/{sid}/files", headers=as_user(who), timeout=60,
                      files={"file": (name, b"x" * size)})


def refusal(response: httpx.Response, status: int, setting: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert setting in error["message"], error
    return error


def test_the_defaults_bound_every_user_on_a_space():
    from service import Settings
    defaults = Settings()
    for name in LIMITS:
        assert getattr(defaults, name) > 0, name


def test_sessions_per_user_are_capped_over_rest(quota_server):
    made = [create(quota_server, "sessions", system_prompt="Be brief.") for _ in range(3)]
    assert [r.status_code for r in made] == [201, 201, 201]
    error = refusal(create(quota_server, "sessions"), 429, "--max-sessions-per-user")
    assert "3" in error["message"]
    listed = httpx.get(f"{quota_server.url}/v1/sessions", headers=as_user("sessions")).json()["data"]
    assert len(listed) == 3  # nothing half-made
    assert create(quota_server, "prompt").status_code == 201  # another user is not affected
    httpx.delete(f"{quota_server.url}/v1/sessions/{made[0].json()['id']}", headers=as_user("sessions"))
    assert create(quota_server, "sessions").status_code == 201  # room again once one is deleted


def test_sessions_per_user_are_capped_through_the_uis_create_session(quota_server):
    from tests.security.conftest import gradio_call
    config = httpx.get(f"{quota_server.url}/config", headers=as_user("ui"), timeout=30).json()
    index = next(dep.get("id", i) for i, dep in enumerate(config["dependencies"])
                 if dep.get("api_name") == "create_session")
    assert create(quota_server, "ui").status_code == 201  # made over REST: the same user's quota
    outcomes = [gradio_call(quota_server.url, index, ["chat", CHAT_MODEL, "Be brief."], headers=as_user("ui"))
                for _ in range(3)]
    assert [o["success"] for o in outcomes] == [True, True, False]
    assert "--max-sessions-per-user" in str(outcomes[-1]["output"].get("error"))
    assert len(services_of(quota_server).store.list(
        services_of(quota_server).identity.caller(key=KEYS["ui"], cookie=None, host=None).user)) == 3


def test_a_system_prompt_over_the_limit_is_a_413_naming_it(quota_server):
    huge = "Answer like a pirate. " * 5000  # 110 KB, as in the finding
    refusal(create(quota_server, "prompt", system_prompt=huge), 413, "--max-system-prompt-chars")
    refusal(create(quota_server, "prompt", system_prompt="x" * 1001), 413, "--max-system-prompt-chars")
    sid = create(quota_server, "prompt", system_prompt="x" * 1000).json()["id"]  # at the limit: fine
    changed = httpx.patch(f"{quota_server.url}/v1/sessions/{sid}", headers=as_user("prompt"),
                          json={"system_prompt": huge}, timeout=30)
    refusal(changed, 413, "--max-system-prompt-chars")
    stored = httpx.get(f"{quota_server.url}/v1/sessions/{sid}", headers=as_user("prompt")).json()
    assert stored["system_prompt"] == "x" * 1000  # unchanged


def send(server, who: str, sid: str, text: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/sessions/{sid}/messages", headers=as_user(who), timeout=120,
                      json={"content": text, "params": {"max_new_tokens": 3, "temperature": 0}})


def test_messages_per_session_are_capped(quota_server):
    sid = create(quota_server, "messages").json()["id"]
    assert send(quota_server, "messages", sid, "Say hi.").status_code == 200
    assert send(quota_server, "messages", sid, "Say bye.").status_code == 200  # 4 messages: the limit
    refusal(send(quota_server, "messages", sid, "One more?"), 429, "--max-messages-per-session")
    stored = httpx.get(f"{quota_server.url}/v1/sessions/{sid}", headers=as_user("messages")).json()
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"] * 2  # nothing lost


def gradio_messages(url: str, fn_index: int, data: list, headers: dict, session: str) -> list[dict]:
    """Every message of one UI event (what the page receives), up to process_completed; events
    of one `session` (page) share its state, as on the page."""
    joined = httpx.post(f"{url}/gradio_api/queue/join", headers=headers, timeout=60, json={
        "data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None})
    joined.raise_for_status()
    out = []
    with httpx.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session},
                      headers=headers, timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                out.append(json.loads(line[5:]))
                if out[-1].get("msg") == "process_completed":
                    return out
    raise AssertionError("the event never completed")


def component_id(config: dict, elem_id: str) -> int:
    return next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id)


def test_the_ui_shows_a_refused_turn_and_gives_the_text_back(quota_server):
    """Over the message quota in the web UI: an error the user sees, and the message they typed is
    back in the box (not lost), the stored chat as it was."""
    sid = create(quota_server, "ui-send").json()["id"]
    for text in ("Say hi.", "Say bye."):
        assert send(quota_server, "ui-send", sid, text).status_code == 200
    config = httpx.get(f"{quota_server.url}/config", headers=as_user("ui-send"), timeout=30).json()
    page = uuid.uuid4().hex
    start = next(dep.get("id", i) for i, dep in enumerate(config["dependencies"])
                 if any(t[1] == "load" for t in dep.get("targets", [])) and len(dep.get("outputs", [])) > 10)
    opened = gradio_messages(quota_server.url, start, [None], as_user("ui-send"), page)  # the page opens
    assert opened[-1]["success"] and opened[-1]["output"]["data"][2]["value"] == sid  # on the only chat
    typed = "A long message I typed with care"
    accept = next(dep.get("id", i) for i, dep in enumerate(config["dependencies"])  # Send: the message is queued
                  if dep.get("backend_fn") and len(dep.get("outputs", [])) == 5
                  and [component_id(config, "send"), "click"] in [list(t) for t in dep.get("targets", [])])
    accepted = httpx.post(f"{quota_server.url}/gradio_api/run/predict", headers=as_user("ui-send"), timeout=60,
                          json={"data": [None, None, typed, None], "fn_index": accept, "session_hash": page})
    assert accepted.status_code == 200 and accepted.json()["data"][0] == ""  # taken from the box
    drain = next(dep.get("id", i) for i, dep in enumerate(config["dependencies"]) if dep.get("trigger_after") == accept)
    data = [None, None, "", None, CHAT_MODEL, "", 0.3, 0.9, 0, 3, 1.1, -1, "", 0, False, "", "", "auto", []]
    messages = gradio_messages(quota_server.url, drain, data, as_user("ui-send"), page)  # ...and sent
    final = messages[-1]
    assert not final["success"] and "--max-messages-per-session" in str(final["output"].get("error"))
    last_update = [m for m in messages if m.get("msg") == "process_generating"][-1]
    assert typed in json.dumps(last_update["output"]["data"][1])  # the message box has the text again
    stored = httpx.get(f"{quota_server.url}/v1/sessions/{sid}", headers=as_user("ui-send")).json()
    assert len(stored["messages"]) == 4


def test_files_per_user_are_capped_over_all_their_sessions(quota_server):
    first = create(quota_server, "files").json()["id"]
    second = create(quota_server, "files").json()["id"]
    assert [upload(quota_server, "files", sid, 1000).status_code for sid in (first, first, second)] == [202] * 3
    refusal(upload(quota_server, "files", second, 1000), 429, "--max-files-per-user")
    listed = httpx.get(f"{quota_server.url}/v1/sessions/{second}/files", headers=as_user("files")).json()["data"]
    assert len(listed) == 1
    httpx.delete(f"{quota_server.url}/v1/sessions/{second}/files/{listed[0]['id']}", headers=as_user("files"))
    assert upload(quota_server, "files", second, 1000).status_code == 202  # room again


def test_stored_bytes_per_user_are_capped(quota_server):
    sid = create(quota_server, "bytes").json()["id"]
    assert upload(quota_server, "bytes", sid, 30_000).status_code == 202
    refusal(upload(quota_server, "bytes", sid, 30_000), 413, "--max-stored-mb-per-user")
    assert upload(quota_server, "bytes", sid, 15_000).status_code == 202  # what still fits is taken


def test_uploads_per_minute_are_limited(quota_server):
    sid = create(quota_server, "rate").json()["id"]
    for _ in range(5):
        response = upload(quota_server, "rate", sid, 100)
        assert response.status_code == 202
        httpx.delete(f"{quota_server.url}/v1/sessions/{sid}/files/{response.json()['id']}", headers=as_user("rate"))
    limited = upload(quota_server, "rate", sid, 100)
    refusal(limited, 429, "--max-uploads-per-minute")
    assert int(limited.headers["Retry-After"]) >= 1


def test_a_disk_below_the_floor_is_a_507_and_the_chat_goes_on(pool, embedder, tmp_path_factory):
    """The finding: a full data dir made the next upload a 500 "internal error". With less free
    space than --min-free-disk-mb the upload is a 507 saying so; nothing of it is kept, and the
    session's chat goes on and is stored."""
    from service import build_services
    folder = tmp_path_factory.mktemp("floor")
    floor = shutil.disk_usage(folder).free / 1e6 + 100_000  # 100 GB more than this disk has free
    server = serve(build_services(make_settings(folder, min_free_disk_mb=floor), pool=pool, embedder=embedder))
    try:
        sid = httpx.post(f"{server.url}/v1/sessions", json={"model": CHAT_MODEL}, timeout=30).json()["id"]
        response = httpx.post(f"{server.url}/v1/sessions/{sid}/files", files={"file": ("a.txt", b"hello" * 100)},
                              timeout=60)
        error = refusal(response, 507, "--min-free-disk-mb")
        assert "disk" in error["message"]
        assert httpx.get(f"{server.url}/v1/sessions/{sid}/files").json()["data"] == []
        assert not any((folder / "files").rglob("*")) if (folder / "files").exists() else True
        reply = httpx.post(f"{server.url}/v1/sessions/{sid}/messages", timeout=120,
                           json={"content": "Say hi.", "params": {"max_new_tokens": 3, "temperature": 0}})
        assert reply.status_code == 200, reply.text
        stored = httpx.get(f"{server.url}/v1/sessions/{sid}").json()["messages"]
        assert [m["role"] for m in stored] == ["user", "assistant"]
    finally:
        server.stop()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MB filesystem of its own (tmpfs), where the OS really answers ENOSPC."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs is not permitted here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_a_507_and_keeps_nothing_half_written(tiny_disk, tmp_path, embedder):
    from llm_pool.errors import InsufficientStorageError
    from memory.store import SessionStore
    from service.documents import DocumentService
    store = SessionStore(tmp_path / "sessions")
    documents = DocumentService(store, tiny_disk, embedder, max_bytes=10**7)
    try:
        sid = store.create("alice").id
        kept = documents.add("alice", sid, "first.bin", b"\x00" * 1_400_000)
        with pytest.raises(InsufficientStorageError) as refused:
            documents.add("alice", sid, "second.bin", b"\x01" * 1_400_000)
        assert refused.value.status == 507 and "disk is full" in refused.value.message
        assert [r["id"] for r in documents.list("alice", sid)] == [kept["id"]]
        assert sorted(p.name for p in (tiny_disk / "files" / sid).iterdir()) == [kept["id"]]  # no partial file
        documents.remove("alice", sid, kept["id"])
        assert documents.add("alice", sid, "second.bin", b"\x01" * 1_400_000)["status"] == "queued"
    finally:
        documents.close()
        store.close()
