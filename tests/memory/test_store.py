"""The durable session store: per-user isolation, atomic turns, JSON on disk, restarts."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
import zlib
from pathlib import Path

import pytest

from llm_pool.errors import ConflictError, InvalidParamsError, NotFoundError
from memory.store import SessionNotFoundError, SessionStore, StoredMessage


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path):
    """Opens (again) one store: embedded SQLite, or a fresh database on a real PostgreSQL server
    (each call: another handle on the same data, as another process or replica would have)."""
    url = request.getfixturevalue("postgres_server").new_database() if request.param == "postgres" else None
    opened = []

    def open_() -> SessionStore:
        opened.append(SessionStore(tmp_path / "sessions", url))
        return opened[-1]
    yield open_
    for handle in opened:
        handle.close()


@pytest.fixture
def store(open_store):
    return open_store()


def turn(n: int) -> list[StoredMessage]:
    return [StoredMessage("user", f"question {n}"), StoredMessage("assistant", f"answer {n}")]


def test_sessions_belong_to_their_user(store):
    mine = store.create("alice", title="Alice's plans")
    store.create("bob", title="Bob's")
    assert [s.title for s in store.list("alice")] == ["Alice's plans"]
    for call in (lambda: store.get("bob", mine.id), lambda: store.messages("bob", mine.id),
                 lambda: store.append("bob", mine.id, turn(1)), lambda: store.update("bob", mine.id, title="x"),
                 lambda: store.delete("bob", mine.id), lambda: store.export("bob", mine.id)):
        with pytest.raises(SessionNotFoundError):
            call()
    assert store.get("alice", mine.id).title == "Alice's plans"  # untouched by bob's attempts


@pytest.mark.parametrize("bad_id", ["", "../../etc/passwd", "abc\x00def", "0" * 31, "Z" * 32, None, 42])
def test_bad_ids_are_not_found(store, bad_id):
    with pytest.raises(SessionNotFoundError):
        store.get("alice", bad_id)


def test_turns_append_atomically_and_survive_a_reopen(open_store):
    store = open_store()
    session = store.create("alice")
    store.append("alice", session.id, turn(1))
    store.update("alice", session.id, title="Renamed", params={"temperature": 0.1})
    store.close()
    again = open_store()
    assert again.get("alice", session.id).title == "Renamed"
    assert again.get("alice", session.id).params == {"temperature": 0.1}
    assert [m.content for m in again.messages("alice", session.id)] == ["question 1", "answer 1"]
    assert again.check() == []


def test_first_message_names_a_new_chat(store):
    session = store.create("alice")
    store.append("alice", session.id, [StoredMessage("user", "How do tides work?"), StoredMessage("assistant", "x")])
    assert store.get("alice", session.id).title == "How do tides work?"


def test_two_writers_never_lose_or_interleave_turns(open_store):
    store = open_store()
    session = store.create("alice")
    other = open_store()  # a second handle, as a second process (or replica) would have

    def writer(handle, offset):
        for n in range(offset, offset + 40):
            handle.append("alice", session.id, turn(n))

    threads = [threading.Thread(target=writer, args=(store, 0)), threading.Thread(target=writer, args=(other, 1000))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    messages = store.messages("alice", session.id)
    assert len(messages) == 160
    for question, answer in zip(messages[::2], messages[1::2]):
        assert question.role == "user" and answer.role == "assistant"
        assert question.content.split()[1] == answer.content.split()[1]  # each pair stayed together
    assert store.check() == []


def test_regenerate_replaces_the_last_turn(store):
    session = store.create("alice")
    store.append("alice", session.id, turn(1) + turn(2))
    store.append("alice", session.id, [StoredMessage("user", "question 2"), StoredMessage("assistant", "better")],
                 truncate_to=2)
    contents = [m.content for m in store.messages("alice", session.id)]
    assert contents == ["question 1", "answer 1", "question 2", "better"]


def texts(store, session_id, user="alice"):
    return [m.content for m in store.messages(user, session_id)]


def test_an_edit_or_regenerate_keeps_what_it_replaced_as_a_version_with_its_own_versions(store):
    session = store.create("alice")
    store.append("alice", session.id, turn(1) + turn(2) + turn(3))
    # regenerate the second answer (a version of the chat from message 2 on), then of the third in it
    store.append("alice", session.id, [StoredMessage("user", "question 2"), StoredMessage("assistant", "B")],
                 truncate_to=2)
    store.append("alice", session.id, turn(4))
    store.append("alice", session.id, [StoredMessage("user", "question 4"), StoredMessage("assistant", "D")],
                 truncate_to=4)
    assert texts(store, session.id) == ["question 1", "answer 1", "question 2", "B", "question 4", "D"]
    messages, forks = store.thread("alice", session.id)
    assert forks == {3: (1, 2), 5: (1, 2)}  # two regenerates: versions of the replies, 2 of 2 each
    # back to the first version from message 3: its whole tail, without the forks made inside the other
    store.select_version("alice", session.id, 3, 0)
    assert texts(store, session.id) == ["question 1", "answer 1", "question 2", "answer 2", "question 3", "answer 3"]
    assert store.thread("alice", session.id)[1] == {3: (0, 2)}
    assert store.get("alice", session.id).message_count == 6
    # and to the second again: its own fork at 5 comes back with it
    store.select_version("alice", session.id, 3, 1)
    assert texts(store, session.id)[-1] == "D"
    assert store.thread("alice", session.id)[1] == {3: (1, 2), 5: (1, 2)}
    listed = store.versions("alice", session.id, 5)
    assert [(v["version"], v["selected"], v["messages"][-1]["content"]) for v in listed] == \
        [(0, False, "answer 4"), (1, True, "D")]
    # an edit: a version whose first message differs
    store.append("alice", session.id, [StoredMessage("user", "edited"), StoredMessage("assistant", "E")],
                 truncate_to=0)
    assert texts(store, session.id) == ["edited", "E"]
    assert store.thread("alice", session.id)[1] == {0: (1, 2)}  # an edit: versions of the user's message
    store.append("alice", session.id, [StoredMessage("user", "edited"), StoredMessage("assistant", "F")],
                 truncate_to=0)
    assert store.thread("alice", session.id)[1] == {0: (1, 2), 1: (1, 2)}
    # a continued reply extends its version: no new one
    store.append("alice", session.id, [StoredMessage("user", "edited"), StoredMessage("assistant", "F, more")],
                 truncate_to=0, fork=False)
    assert store.thread("alice", session.id)[1] == {0: (1, 2), 1: (1, 2)}
    assert texts(store, session.id) == ["edited", "F, more"]
    with pytest.raises(NotFoundError):
        store.select_version("alice", session.id, 0, 7)
    with pytest.raises(NotFoundError):
        store.select_version("alice", session.id, 2, 0)
    with pytest.raises(SessionNotFoundError):
        store.select_version("bob", session.id, 0, 0)
    assert store.check() == []


def test_a_deleted_turn_is_gone_and_can_be_undone_while_the_chat_is_unchanged(store):
    session = store.create("alice")
    store.append("alice", session.id, turn(1) + turn(2) + turn(3))
    store.append("alice", session.id, [StoredMessage("user", "question 3"), StoredMessage("assistant", "C")],
                 truncate_to=4)
    store.delete_turn("alice", session.id, 3)  # the reply's index: its whole turn goes
    assert texts(store, session.id) == ["question 1", "answer 1", "question 3", "C"]
    assert store.thread("alice", session.id)[1] == {3: (1, 2)}  # the fork after it moved up
    with pytest.raises(SessionNotFoundError):
        store.restore("bob", session.id)
    store.restore("alice", session.id)
    assert texts(store, session.id) == ["question 1", "answer 1", "question 2", "answer 2", "question 3", "C"]
    assert store.thread("alice", session.id)[1] == {5: (1, 2)}
    with pytest.raises(NotFoundError):
        store.restore("alice", session.id)  # once
    store.delete_turn("alice", session.id, 0)
    store.append("alice", session.id, turn(9))  # the chat changed since: the delete stays
    with pytest.raises(ConflictError):
        store.restore("alice", session.id)
    store.clear_messages("alice", session.id)  # the trash icon: undone the same way
    assert texts(store, session.id) == []
    store.restore("alice", session.id)
    assert texts(store, session.id)[-1] == "answer 9"
    with pytest.raises(NotFoundError):
        store.delete_turn("alice", session.id, 99)
    assert store.check() == []


def test_values_on_disk_are_json_not_pickle(tmp_path):
    store = SessionStore(tmp_path / "s")
    session = store.create("alice", title="secret plans")
    store.append("alice", session.id, turn(1))
    store.close()
    rows = sqlite3.connect(tmp_path / "s" / "cache.db").execute("SELECT value FROM Cache").fetchall()
    decoded = [zlib.decompress(value).decode() for (value,) in rows if value is not None]
    assert any("secret plans" in text for text in decoded)
    assert all(not text.startswith("\x80") for text in decoded)  # no pickle protocol header


def test_export_and_import_round_trip(store):
    session = store.create("alice", title="Trip", system_prompt="Be brief.", params={"temperature": 0.2})
    store.append("alice", session.id, turn(1))
    exported = store.export("alice", session.id)
    copy = store.import_session("bob", exported)
    assert copy.id != session.id and copy.title == "Trip" and copy.system_prompt == "Be brief."
    assert [m.content for m in store.messages("bob", copy.id)] == ["question 1", "answer 1"]
    with pytest.raises(InvalidParamsError):
        store.import_session("bob", {"format": "something-else"})
    with pytest.raises(InvalidParamsError):
        store.import_session("bob", {"format": "shoal-session/1", "messages": [{"role": "robot", "content": 1}]})


def test_bulk_delete_by_age(store):
    old = store.create("alice", title="old")
    fresh = store.create("alice", title="fresh")
    store.update("alice", fresh.id, title="fresh!")
    gone = store.delete_many("alice", older_than=store.get("alice", fresh.id).updated - 1e-6)
    assert gone == [old.id]
    assert [s.id for s in store.list("alice")] == [fresh.id]


def test_search_finds_a_users_chats_by_title_or_message_and_only_theirs(store):
    tides = store.create("alice", title="Ocean notes")
    store.append("alice", tides.id, [StoredMessage("user", "How do TIDES work?"), StoredMessage("assistant", "Moon.")])
    bread = store.create("alice", title="Baking")
    store.append("alice", bread.id, [StoredMessage("user", "Sourdough: 100% hydration_ok?"),
                                     StoredMessage("assistant", "Élan and patience.")])
    theirs = store.create("bob", title="Tides of Bob")
    store.append("bob", theirs.id, [StoredMessage("user", "tides again, 100% sure")])
    ids = lambda query: [s.id for s in store.search("alice", query)]  # noqa: E731
    assert ids("tides") == [tides.id]  # a message, any case; never bob's chat
    assert ids("ocean") == [tides.id]  # a title
    assert ids("moon") == [tides.id]  # a reply
    assert ids("élan") == [bread.id]  # case-insensitive beyond ASCII
    assert ids("100%") == [bread.id] and ids("d_u") == [] and ids("%") == [bread.id]  # wildcards are text
    assert ids("0%_h") == [] and ids("hydration_ok") == [bread.id]
    assert ids("") == ids("  ") == [bread.id, tides.id]  # empty: all, most recent first
    assert ids("nothing like it") == []
    store.update("alice", bread.id, title="Bread")
    assert ids("baking") == [] and ids("bread") == [bread.id]
    store.clear_messages("alice", bread.id)
    assert ids("sourdough") == []
    store.delete("alice", tides.id)
    assert ids("tides") == [] and [s.id for s in store.search("bob", "TIDES")] == [theirs.id]
    with pytest.raises(InvalidParamsError):
        store.search("alice", "x" * 201)
    assert store.check() == []


def test_a_store_made_before_search_has_its_chats_indexed_when_opened(open_store):
    store = open_store()
    session = store.create("alice", title="Old chat")
    store.append("alice", session.id, [StoredMessage("user", "about lighthouses")])
    store.sql("DROP TABLE shoal_chat_text")  # as a store written by an older Shoal
    store.close()
    again = open_store()
    assert [s.id for s in again.search("alice", "lighthouse")] == [session.id]
    assert again.search("bob", "lighthouse") == [] and again.check() == []


def test_a_store_written_by_a_newer_shoal_is_refused_not_misread(open_store):
    store = open_store()
    store.transaction(lambda sql: store._kv.set("meta:schema", 99))
    store.close()
    with pytest.raises(RuntimeError, match="newer Shoal"):
        open_store()


def test_text_with_nul_and_any_unicode_is_kept(store):
    session = store.create("alice", title="Zeros")
    store.append("alice", session.id, [StoredMessage("user", "a\x00b 🐟 \\u0000 ü"),
                                       StoredMessage("assistant", "ok", meta={"k": "v\x00"})])
    stored = store.messages("alice", session.id)
    # SQLite keeps a NUL as sent; PostgreSQL's text cannot hold one: U+FFFD in its place, nothing lost around it
    assert stored[0].content in ("a\x00b 🐟 \\u0000 ü", "a\ufffdb 🐟 \\u0000 ü")
    assert [s.id for s in store.search("alice", "🐟")] == [session.id]


def test_postgresql_dropping_its_connections_goes_unnoticed_and_one_that_is_down_is_a_503(postgres_server,
                                                                                            tmp_path):
    import psycopg

    from llm_pool.errors import ServiceUnavailableError
    from memory.store import StorageError
    from tests.conftest import PostgresProcess

    url = postgres_server.new_database()
    store = SessionStore(tmp_path / "sessions", url)
    try:
        session = store.create("alice")
        store.append("alice", session.id, turn(1))
        with psycopg.connect(postgres_server.url, autocommit=True) as admin:  # as a restart or failover does
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                          (url.rsplit("/", 1)[1],))
        assert [m.content for m in store.messages("alice", session.id)] == ["question 1", "answer 1"]
        store.append("alice", session.id, turn(2))
    finally:
        store.close()

    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="shoal-postgres-down-"))
    down = PostgresProcess(folder)  # a database of its own, stopped under the store
    store = SessionStore(tmp_path / "other", down.url)
    try:
        session = store.create("alice")
        down.stop()
        started = time.monotonic()
        with pytest.raises(ServiceUnavailableError) as read:  # a 503 with Retry-After, not a 500 or a hang
            store.messages("alice", session.id)
        assert time.monotonic() - started < 10
        assert read.value.retry_after and str(down.port) not in read.value.message
        with pytest.raises(StorageError) as write:
            store.append("alice", session.id, turn(1))
        assert "nothing was changed" in write.value.message and str(down.port) not in write.value.message
    finally:
        store.close()
        shutil.rmtree(folder, ignore_errors=True)
