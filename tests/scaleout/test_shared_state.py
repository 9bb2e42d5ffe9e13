"""More than one Shoal (issue 29): two real `python app.py` replicas on one PostgreSQL and one Redis
(Debian's servers, started on loopback) behind a real haproxy. A chat made on one replica is listed
and continued on the other; `--rate-limit-rpm 2` allows two requests in all, not two per replica;
a `kill -9` of a replica loses no acknowledged turn, ends only its own streams, and the other
replica goes on serving through the load balancer."""

from __future__ import annotations

import subprocess
import threading
import time

import httpx
import pytest

from tests.conftest import free_port
from tests.scaleout.test_replicas import Node

KEYS = [f"sk-replica-{i:02d}-0123456789" for i in range(12)]
SECRET = "a-secret-every-replica-is-given-0123456789"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


class Haproxy:
    """Debian's haproxy on a free loopback port in front of the replicas: round robin, health checks
    on /health/ready, a request whose replica refuses the connection is sent to another one."""

    def __init__(self, folder, servers: list[tuple[str, int]]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        lines = "\n".join(f"    server {name} 127.0.0.1:{port} check cookie {name}" for name, port in servers)
        config = folder / "haproxy.cfg"
        config.write_text(f"""global
    maxconn 256
defaults
    mode http
    timeout connect 2s
    timeout client 180s
    timeout server 180s
    retries 2
    option redispatch
frontend shoal
    bind 127.0.0.1:{self.port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /health/ready
    default-server inter 300ms fall 2 rise 2
    cookie SHOAL_REPLICA insert indirect nocache
{lines}
""")
        self.process = subprocess.Popen(["haproxy", "-f", str(config), "-db"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError("haproxy did not start")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, postgres_server, redis_server):
    tmp = tmp_path_factory.mktemp("fleet")
    shared = ("--database-url", postgres_server.new_database(), "--redis-url", redis_server,
              "--rate-limit-rpm", "2", "--api-keys", ",".join(KEYS), "--session-secret", SECRET)
    a, b = Node(tmp, "a", shared), Node(tmp, "b", shared)
    threads = [threading.Thread(target=n.start) for n in (a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    balancer = Haproxy(tmp, [("a", a.port), ("b", b.port)])
    yield a, b, balancer
    balancer.stop()
    for node in (a, b):
        node.stop()


def send(url: str, key: str, sid: str, text: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/sessions/{sid}/messages", json={"content": text}, headers=bearer(key), timeout=120)


def new_chat(url: str, key: str) -> str:
    made = httpx.post(f"{url}/v1/sessions", json={"params": {"temperature": 0, "max_new_tokens": 12}},
                      headers=bearer(key), timeout=30)
    assert made.status_code == 201, made.text
    return made.json()["id"]


def test_a_chat_made_on_one_replica_is_listed_and_continued_on_the_other(fleet):
    a, b, _ = fleet
    key = KEYS[0]
    sid = new_chat(a.url, key)
    first = send(a.url, key, sid, "My name is Ada. Say hi.")
    assert first.status_code == 200, first.text
    assert sid in [s["id"] for s in httpx.get(f"{b.url}/v1/sessions", headers=bearer(key)).json()["data"]]
    second = send(b.url, key, sid, "What is my name?")
    assert second.status_code == 200, second.text
    # the other replica read the chat's history from the shared store: the first turn went along
    assert second.json()["usage"]["prompt_tokens"] > first.json()["usage"]["prompt_tokens"] + 10
    stored = httpx.get(f"{a.url}/v1/sessions/{sid}", headers=bearer(key)).json()["messages"]
    assert [m["content"] for m in stored][::2] == ["My name is Ada. Say hi.", "What is my name?"]
    # another key's user sees nothing of it, on either replica
    for node in (a, b):
        assert httpx.get(f"{node.url}/v1/sessions/{sid}", headers=bearer(KEYS[1])).status_code == 404


def test_the_rate_limit_holds_across_replicas(fleet):
    a, b, _ = fleet
    codes = []
    for node in (a, b, a):  # A alone would allow this third request: its second
        response = httpx.post(f"{node.url}/v1/chat/completions", headers=bearer(KEYS[1]), timeout=60, json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
        codes.append(response.status_code)
    assert codes == [200, 200, 429], codes
    assert 0 < float(response.headers["retry-after"]) <= 60


def test_killing_a_replica_loses_no_acknowledged_turn_and_the_other_goes_on(fleet):
    a, b, balancer = fleet
    keys = KEYS[2:12]
    chats = {key: new_chat(balancer.url, key) for key in keys}
    acknowledged: dict[str, list[str]] = {key: [] for key in keys}

    def turn(key: str, url: str = balancer.url) -> bool:
        text = f"Say the word {key[-12:-10]}."
        try:
            response = send(url, key, chats[key], text)
        except httpx.HTTPError:
            return False
        if response.status_code == 200:
            acknowledged[key].append(text)
            return True
        return False

    for key in keys[:4]:  # before: both replicas serve
        assert turn(key)
    # a stream on A when it dies: its client gets an error (never a hang), nothing half-stored
    cut_key = keys[4]
    errors = []

    def stream() -> None:
        try:
            with httpx.stream("POST", f"{a.url}/v1/sessions/{chats[cut_key]}/messages", headers=bearer(cut_key),
                              timeout=60, json={"content": "Write a long story about a lighthouse.", "stream": True,
                                                "params": {"max_new_tokens": 400}}) as response:
                for _ in response.iter_lines():
                    pass
        except httpx.HTTPError as exc:
            errors.append(exc)

    streaming = threading.Thread(target=stream)
    streaming.start()
    time.sleep(1.0)
    a.kill()
    streaming.join(30)
    assert not streaming.is_alive() and errors, "the stream on the killed replica ended with an error"
    started = time.monotonic()
    for key in keys[5:]:  # after: every request through the balancer is served, by B
        assert turn(key), key
    assert time.monotonic() - started < 60
    for key in keys:
        stored = httpx.get(f"{balancer.url}/v1/sessions/{chats[key]}", headers=bearer(key), timeout=30).json()
        users = [m["content"] for m in stored["messages"] if m["role"] == "user"]
        assert users == acknowledged[key], key  # every acknowledged turn, and only whole turns
        assert len(stored["messages"]) == 2 * len(users)
