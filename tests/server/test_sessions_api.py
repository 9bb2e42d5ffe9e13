"""Sessions over REST and gradio_client, with the real SmolLM2: a notebook's view of its chats."""

from __future__ import annotations

import json

import httpx
import pytest

from memory.store import StoredMessage
from service import build_services
from tests.conftest import CHAT_MODEL, make_settings, serve


def test_session_lifecycle_over_rest(live_server):
    url = live_server.url
    created = httpx.post(f"{url}/v1/sessions", json={"title": "Geography", "model": CHAT_MODEL,
                                                     "system_prompt": "Answer in one sentence.",
                                                     "params": {"temperature": 0, "max_new_tokens": 40}})
    assert created.status_code == 201
    session = created.json()
    sid = session["id"]
    first = httpx.post(f"{url}/v1/sessions/{sid}/messages",
                       json={"content": "What is the capital of France? Answer in one word."}, timeout=120).json()
    assert first["role"] == "assistant" and "Paris" in first["content"]
    second = httpx.post(f"{url}/v1/sessions/{sid}/messages", json={"content": "And of Italy?"}, timeout=120).json()
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"]  # the history went along
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # and its KV was reused
    stored = httpx.get(f"{url}/v1/sessions/{sid}").json()
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant", "user", "assistant"]
    assert stored["messages"][1]["content"] == first["content"]

    cleared = httpx.delete(f"{url}/v1/sessions/{sid}/messages")  # deleted, not hidden: gone from the context
    assert cleared.status_code == 200 and cleared.json()["messages"] == [] and cleared.json()["title"] == "Geography"
    assert httpx.get(f"{url}/v1/sessions/{sid}").json()["messages"] == []
    fresh = httpx.post(f"{url}/v1/sessions/{sid}/messages", json={"content": "And of Italy?"}, timeout=120).json()
    assert fresh["usage"]["prompt_tokens"] < first["usage"]["prompt_tokens"]  # no earlier turn went along
    assert not any(s["source"] == "earlier in this chat" for s in fresh["sources"])  # nor was recalled

    renamed = httpx.patch(f"{url}/v1/sessions/{sid}", json={"title": "Capitals", "params": {"temperature": 0.5}})
    assert renamed.json()["title"] == "Capitals" and renamed.json()["params"]["temperature"] == 0.5
    listed = httpx.get(f"{url}/v1/sessions").json()["data"]
    assert sid in [s["id"] for s in listed]
    assert httpx.delete(f"{url}/v1/sessions/{sid}").status_code == 200
    assert httpx.get(f"{url}/v1/sessions/{sid}").status_code == 404


def test_session_reply_streams_as_sse(live_server):
    url = live_server.url
    sid = httpx.post(f"{url}/v1/sessions", json={"params": {"temperature": 0, "max_new_tokens": 20}}).json()["id"]
    events = []
    with httpx.stream("POST", f"{url}/v1/sessions/{sid}/messages", timeout=120,
                      json={"content": "Name a colour.", "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    tokens = [e["text"] for e in events if isinstance(e, dict) and e["type"] == "token"]
    done = next(e for e in events if isinstance(e, dict) and e["type"] == "done")
    assert events[-1] == "[DONE]" and len(tokens) >= 2
    assert "".join(tokens) == done["message"]["content"]
    messages = httpx.get(f"{url}/v1/sessions/{sid}").json()["messages"]
    assert messages[-1]["content"] == done["message"]["content"]


def test_edit_and_regenerate_any_message_keep_versions_the_model_sees_only_the_chosen_one(live_server):
    url = live_server.url
    sid = httpx.post(f"{url}/v1/sessions", json={"params": {"temperature": 0, "max_new_tokens": 12}}).json()["id"]

    def send(content: str, **extra) -> dict:
        response = httpx.post(f"{url}/v1/sessions/{sid}/messages", json={"content": content, **extra}, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()

    def messages() -> list[dict]:
        return httpx.get(f"{url}/v1/sessions/{sid}").json()["messages"]

    first = send("My name is Ada. Say hi.")
    send("Name a fruit.")
    send("Name a colour.")
    # edit the FIRST message: the chat goes on from it, a new version; the rest is kept aside
    edited = send("My name is Grace. Say hi.", replace_from=0)
    now = messages()
    assert [m["content"] for m in now][0] == "My name is Grace. Say hi." and len(now) == 2
    assert now[0]["versions"] == {"selected": 1, "count": 2} and now[1]["content"] == edited["content"]
    # the model saw only this version: one turn, as long as the first one was, not the three of the other
    assert abs(edited["usage"]["prompt_tokens"] - first["usage"]["prompt_tokens"]) <= 2
    versions = httpx.get(f"{url}/v1/sessions/{sid}/messages/0/versions").json()["data"]
    assert [v["selected"] for v in versions] == [False, True]
    assert [m["content"] for m in versions[0]["messages"]][::2] == ["My name is Ada. Say hi.", "Name a fruit.",
                                                                    "Name a colour."]
    # regenerate a reply that is not the last: replace from its user message with the same text; the
    # versions are the reply's
    back = httpx.patch(f"{url}/v1/sessions/{sid}/messages/0", json={"version": 0}).json()
    assert len(back["messages"]) == 6 and back["messages"][0]["versions"] == {"selected": 0, "count": 2}
    again = send("Name a fruit.", replace_from=2, params={"temperature": 1.5, "seed": 7})
    now = messages()
    assert len(now) == 4 and now[3]["versions"] == {"selected": 1, "count": 2} and now[3]["content"] == again["content"]
    assert "versions" not in now[2] and now[0]["versions"] == {"selected": 0, "count": 2}
    # refused by name: an index that is not one of the user's messages, a version that does not exist
    for bad in (1, 99):
        response = httpx.post(f"{url}/v1/sessions/{sid}/messages", json={"content": "x", "replace_from": bad})
        assert response.status_code == 400 and response.json()["error"]["param"] == "replace_from"
    assert httpx.patch(f"{url}/v1/sessions/{sid}/messages/0", json={"version": 5}).status_code == 404
    assert httpx.patch(f"{url}/v1/sessions/{sid}/messages/1", json={"version": 0}).status_code == 404
    assert httpx.patch(f"{url}/v1/sessions/{sid}/messages/0", json={"versoin": 0}).status_code in (400, 422)
    # delete a turn (any message of it), then undo; a second undo finds nothing
    deleted = httpx.delete(f"{url}/v1/sessions/{sid}/messages/1").json()
    assert [m["content"] for m in deleted["messages"]] == ["Name a fruit.", again["content"]]
    assert deleted["messages"][1]["versions"] == {"selected": 1, "count": 2}
    follow = send("What is my name?")
    # the deleted turn is not in the context (it was in `again`'s; the new question is shorter than it)
    assert follow["usage"]["prompt_tokens"] < again["usage"]["prompt_tokens"] + again["usage"]["completion_tokens"]
    assert httpx.post(f"{url}/v1/sessions/{sid}/restore").status_code == 409  # the chat changed since
    httpx.delete(f"{url}/v1/sessions/{sid}/messages/2")
    restored = httpx.post(f"{url}/v1/sessions/{sid}/restore")
    assert restored.status_code == 200 and [m["content"] for m in restored.json()["messages"]][-2] == "What is my name?"
    assert httpx.post(f"{url}/v1/sessions/{sid}/restore").status_code == 404


@pytest.mark.parametrize("body, status, field", [
    ({"model": "no-such-model"}, 404, "model"),
    ({"params": {"temperature": 3}}, 400, "temperature"),
    ({"params": {"banana": 1}}, 400, "banana"),  # an unknown field: 400, as OpenAI answers it
    ({"title": 5}, 400, "title"),
])
def test_bad_session_input_is_refused_by_name(live_server, body, status, field):
    response = httpx.post(f"{live_server.url}/v1/sessions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert field in (error["param"] or "") + error["message"]


def test_bad_ids_and_empty_messages(live_server):
    url = live_server.url
    for bad in ("nope", "..%2F..%2Fapp.py", "0" * 32, "%00%01"):
        assert httpx.get(f"{url}/v1/sessions/{bad}").status_code == 404
    sid = httpx.post(f"{url}/v1/sessions", json={}).json()["id"]
    empty = httpx.post(f"{url}/v1/sessions/{sid}/messages", json={"content": ""})
    assert empty.status_code == 400 and "content" in empty.json()["error"]["message"]


def test_another_users_sessions_are_not_found(pool, tmp_path):
    server = serve(build_services(make_settings(tmp_path, api_keys=["key-alice", "key-bob"]), pool=pool),
                   with_ui=False)
    try:
        alice = {"Authorization": "Bearer key-alice"}
        bob = {"x-api-key": "key-bob"}
        sid = httpx.post(f"{server.url}/v1/sessions", json={"title": "mine"}, headers=alice).json()["id"]
        assert httpx.get(f"{server.url}/v1/sessions/{sid}", headers=bob).status_code == 404
        assert httpx.patch(f"{server.url}/v1/sessions/{sid}", json={"title": "x"}, headers=bob).status_code == 404
        assert httpx.delete(f"{server.url}/v1/sessions/{sid}", headers=bob).status_code == 404
        assert httpx.delete(f"{server.url}/v1/sessions/{sid}/messages", headers=bob).status_code == 404
        assert httpx.post(f"{server.url}/v1/sessions/{sid}/messages", json={"content": "hi"},
                          headers=bob).status_code == 404
        for method, path, body in (("PATCH", "messages/0", {"version": 0}), ("GET", "messages/0/versions", None),
                                   ("DELETE", "messages/0", None), ("POST", "restore", None)):
            response = httpx.request(method, f"{server.url}/v1/sessions/{sid}/{path}", json=body, headers=bob)
            assert response.status_code == 404, (method, path, response.text)
        assert httpx.get(f"{server.url}/v1/sessions", headers=bob).json()["data"] == []
        assert httpx.get(f"{server.url}/v1/sessions/{sid}", headers=alice).json()["title"] == "mine"
    finally:
        server.stop()


def test_searching_sessions_finds_only_my_own(pool, tmp_path):
    services = build_services(make_settings(tmp_path, api_keys=["key-alice", "key-bob"]), pool=pool)
    server = serve(services, with_ui=False)
    try:
        alice, bob = {"Authorization": "Bearer key-alice"}, {"Authorization": "Bearer key-bob"}
        url = f"{server.url}/v1/sessions"
        theirs = httpx.post(url, json={"title": "Lighthouse keeping"}, headers=alice).json()["id"]
        tides = httpx.post(url, json={"title": "Coast"}, headers=bob).json()["id"]
        other = httpx.post(url, json={"title": "Bread"}, headers=bob).json()["id"]
        # a message without a model's turn: search reads the store
        user = services.identity.caller(key="key-bob", cookie=None, host=None).user
        services.store.append(user, tides, [StoredMessage("user", "When is the LIGHTHOUSE lit at 100%?")])

        def found(query: str, headers: dict) -> list[str]:
            response = httpx.get(url, params={"q": query}, headers=headers)
            assert response.status_code == 200, response.text
            return [s["id"] for s in response.json()["data"]]

        assert found("lighthouse", bob) == [tides]  # a message of my chat; never alice's matching title
        assert found("lighthouse", alice) == [theirs]  # and alice finds only hers
        assert found("100%", bob) == [tides] and found("1_0", bob) == []  # LIKE's wildcards are plain text
        assert set(found("", bob)) == {tides, other}  # empty: all of mine
        assert httpx.get(url, params={"q": "x" * 201}, headers=bob).status_code in (400, 422)
    finally:
        server.stop()


def test_gradio_client_chats_in_a_session(live_server):
    from gradio_client import Client
    client = Client(live_server.url, verbose=False)
    named = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name in ("/chat", "/list_sessions", "/create_session", "/delete_session", "/list_models", "/complete"):
        assert name in named
    session = client.predict("From a notebook", CHAT_MODEL, "Answer briefly.", api_name="/create_session")
    reply = client.predict(session["id"], "What is the capital of France? Answer in one word.", api_name="/chat")
    assert reply.strip()
    messages = client.predict(session["id"], api_name="/session_messages")
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[1]["content"] == reply
    assert session["id"] in [s["id"] for s in client.predict(api_name="/list_sessions")]
    assert httpx.get(f"{live_server.url}/v1/sessions/{session['id']}").status_code == 200  # same local user
    client.predict(session["id"], api_name="/delete_session")
    assert session["id"] not in [s["id"] for s in client.predict(api_name="/list_sessions")]


def test_a_long_chat_reopened_after_its_model_was_unloaded_reads_its_history_from_disk(live_server, pool):
    """The KV of a chat's turn is kept on disk (kv_disk): after an unload (or a restart, see
    tests/llm_pool/test_kv_disk.py) the next turn reads only its new tokens, usage says how many came
    from disk, /metrics counts it, and deleting the chat deletes its files."""
    url, disk = live_server.url, pool.context.kv_disk
    sid = httpx.post(f"{url}/v1/sessions", json={"model": CHAT_MODEL, "params": {"temperature": 0,
                                                                                "max_new_tokens": 12}}).json()["id"]
    story = "The ferry to Skerry Island leaves at nine and returns at five, every day but Sunday. " * 20
    first = httpx.post(f"{url}/v1/sessions/{sid}/messages", json={"content": story + "When does the ferry leave?"},
                       timeout=120).json()
    assert first["usage"]["prompt_tokens"] > disk.min_tokens
    disk.flush()
    files = [disk.path(e) for e in list(disk._entries.values()) if e.chat == sid]
    assert files and all(f.is_file() for f in files)

    pool.unload(CHAT_MODEL)  # evicted, swapped or unloaded: its memory is gone
    second = httpx.post(f"{url}/v1/sessions/{sid}/messages", json={"content": "And when does it return?"},
                        timeout=120).json()
    details = second["usage"]["prompt_tokens_details"]
    assert details["cached_tokens_from_disk"] >= first["usage"]["prompt_tokens"] - 1
    assert details["cached_tokens"] >= details["cached_tokens_from_disk"]
    assert second["content"].strip()
    metrics = httpx.get(f"{url}/metrics").text
    assert "shoal_kv_disk_restores_total" in metrics and "shoal_kv_disk_bytes" in metrics

    disk.flush()
    assert httpx.delete(f"{url}/v1/sessions/{sid}").status_code in (200, 204)
    assert not [e for e in disk._entries.values() if e.chat == sid]
    assert not any(f.exists() for f in files)
