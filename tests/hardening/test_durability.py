"""Durability: kill -9 during chat traffic loses no acknowledged turn and leaves a clean store;
a full disk gives a clear error and no half-written session.

The kill loop runs SHOAL_SOAK_ITERATIONS times (default 3 here; `bench/soak.py` runs it longer)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time

import httpx

from llm_pool.errors import InsufficientStorageError
from memory.store import SessionStore, StoredMessage
from tests.conftest import ROOT
from tests.hardening.conftest import AppProcess


def test_kill_minus_nine_during_chat_loses_no_acknowledged_turn(tiny_catalog, tmp_path):
    iterations = int(os.environ.get("SHOAL_SOAK_ITERATIONS", "3"))
    data = tmp_path / "data"
    acknowledged: dict[str, list[str]] = {}
    rng = random.Random(7)
    for iteration in range(iterations):
        app = AppProcess(data, "--catalog", str(tiny_catalog), "--preload", '["tiny"]').start()
        sessions = [httpx.post(f"{app.url}/v1/sessions", json={"params": {"max_new_tokens": 20}}).json()["id"]
                    for _ in range(2)]
        stop = threading.Event()

        def chat(sid: str, app=app, stop=stop, iteration=iteration) -> None:
            n = 0
            while not stop.is_set():
                text = f"iteration {iteration} message {n}"
                try:
                    response = httpx.post(f"{app.url}/v1/sessions/{sid}/messages", json={"content": text}, timeout=10)
                except httpx.HTTPError:
                    return  # the server died under us: this turn was never acknowledged
                if response.status_code == 200:
                    acknowledged.setdefault(sid, []).append(text)
                n += 1

        threads = [threading.Thread(target=chat, args=(sid,)) for sid in sessions]
        for thread in threads:
            thread.start()
        time.sleep(rng.uniform(1.0, 2.5))
        app.stop()  # SIGKILL
        stop.set()
        for thread in threads:
            thread.join(30)

    store = SessionStore(data / "sessions")
    try:
        assert store.check() == []
        assert sum(len(v) for v in acknowledged.values()) >= iterations * 2
        for sid, texts in acknowledged.items():
            stored = [m.content for m in store.messages("local", sid) if m.role == "user"]
            assert all(text in stored for text in texts), (sid, set(texts) - set(stored))
            roles = [m.role for m in store.messages("local", sid)]
            assert roles == ["user", "assistant"] * (len(roles) // 2)  # whole turns only
    finally:
        store.close()


DISK_FULL = r"""
import resource, signal, sys
sys.path.insert(0, sys.argv[1])
from memory.store import SessionStore, StoredMessage, StorageError
store = SessionStore(__import__("pathlib").Path(sys.argv[2]))
sid = store.list("u")[0].id
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    noise = __import__("base64").b64encode(__import__("os").urandom(3_000_000)).decode()  # does not compress
    store.append("u", sid, [StoredMessage("user", noise), StoredMessage("assistant", noise)])
    print("WROTE")
except StorageError as exc:
    print("REFUSED", exc.status, exc.message)
"""


def test_a_full_disk_gives_a_clear_error_and_no_half_written_session(tmp_path):
    folder = tmp_path / "sessions"
    store = SessionStore(folder)
    session = store.create("u", title="precious")
    store.append("u", session.id, [StoredMessage("user", "a"), StoredMessage("assistant", "b")])
    store.close()
    biggest = max(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    out = subprocess.run([sys.executable, "-c", DISK_FULL, str(ROOT), str(folder), str(biggest + 100_000)],
                         capture_output=True, text=True, timeout=120)
    assert "REFUSED 503" in out.stdout, out.stdout + out.stderr
    assert "nothing was changed" in out.stdout
    store = SessionStore(folder)
    try:
        assert store.check() == []
        assert [m.content for m in store.messages("u", session.id)] == ["a", "b"]
        assert store.get("u", session.id).message_count == 2
    finally:
        store.close()


def _mount_small_tmpfs(path, size: str) -> bool:
    if os.geteuid() != 0 or sys.platform != "linux":
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_really_full_filesystem_gives_a_clear_error_and_no_half_written_session(tmp_path):
    """The same through a real ENOSPC (a 507 that says the disk is full): the store lives on a 4 MiB
    tmpfs that a turn overfills.
    (Needs root and mount, as in CI here; elsewhere the write-size test above stands in.)"""
    disk = tmp_path / "small-disk"
    if not _mount_small_tmpfs(disk, "4m"):
        import pytest
        pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN)")
    try:
        store = SessionStore(disk / "sessions")
        session = store.create("u", title="precious")
        long_reply = __import__("base64").b64encode(os.urandom(150_000)).decode()  # a long history
        store.append("u", session.id, [StoredMessage("user", "a"), StoredMessage("assistant", long_reply)])
        noise = __import__("base64").b64encode(os.urandom(3_000_000)).decode()  # does not compress
        refused = None
        try:
            store.append("u", session.id, [StoredMessage("user", noise), StoredMessage("assistant", noise)])
        except InsufficientStorageError as exc:
            refused = exc
        assert refused is not None and refused.status == 507  # a full disk says so (not a 503 "retry")
        assert "disk is full" in refused.message and "nothing was changed" in refused.message
        # the store still works for small writes once space is back, and nothing half-written shows
        store.close()
        store = SessionStore(disk / "sessions")
        assert store.check() == []
        assert [m.content for m in store.messages("u", session.id)] == ["a", long_reply]
        store.append("u", session.id, [StoredMessage("user", "c"), StoredMessage("assistant", "d")])
        assert [m.content for m in store.messages("u", session.id)] == ["a", long_reply, "c", "d"]
        store.close()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
