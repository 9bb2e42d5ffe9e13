"""No caller can starve the others, played against real servers on loopback.

The findings: 120 long streams from one client took all 16 slots and the queue, and another client
got 503 on 4 of 4 requests; two /v1/batch requests of 256 items did the same; 97 concurrent
/v1/embeddings requests kept another user's chat waiting 58.5 s; one user's three big uploads left
another user's small file `queued` for minutes; /v1/rerank with 2,047 documents took 176 s and
/v1/embeddings with 2,048 texts 112 s, both answered.

Clients are told apart by their loopback source address (127.0.0.2, 127.0.0.3, ...) on the public
server, and by their keys on the keyed one. Latencies are medians of a few tries, measured in the
same test on the idle server just before, so the other tests' load on the machine cancels out.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import httpx
import pytest

from tests.conftest import CHAT_MODEL
from tests.security.conftest import ALICE, BOB, bearer, services_of

CHAT = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 8, "temperature": 0}
LONG = {"model": CHAT_MODEL, "max_tokens": 400, "stream": True,
        "messages": [{"role": "user", "content": "Tell me a very long story about a lighthouse keeper."}]}
QUEUED_CAP = "--max-queued-per-caller"


def client_at(address: str, **headers) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=120, headers=headers)


def async_client_at(address: str, **headers) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address=address, limits=httpx.Limits(max_connections=300))
    return httpx.AsyncClient(transport=transport, timeout=120, headers=headers)


def timed_chat(client: httpx.Client, url: str) -> float:
    started = time.monotonic()
    response = client.post(f"{url}/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text[:300]  # never a 503: another client's load is not theirs
    return time.monotonic() - started


def median_chat(client: httpx.Client, url: str, tries: int = 7) -> float:
    return statistics.median(timed_chat(client, url) for _ in range(tries))


async def open_streams(client: httpx.AsyncClient, url: str, n: int) -> list[httpx.Response]:
    """n streamed chats at once, their headers read and their bodies left open (the server streams)."""
    async def one() -> httpx.Response:
        request = client.build_request("POST", f"{url}/v1/chat/completions", json=LONG)
        try:
            return await client.send(request, stream=True)
        except httpx.HTTPError as exc:  # the connection guard may close a connection over its cap
            return httpx.Response(599, text=repr(exc))
    return list(await asyncio.gather(*(one() for _ in range(n))))


def _message(response: httpx.Response) -> str:
    if response.status_code == 200:
        return ""
    try:
        return (response.json().get("error") or {}).get("message", "")
    except ValueError:  # a refusal that is not JSON
        return ""


async def _read_refusals(responses: list[httpx.Response]) -> None:
    for response in responses:
        if response.status_code != 200:
            try:
                await response.aread()
            except httpx.HTTPError:  # closed by the server after its refusal
                pass


def _under_load(load, measure, cleanup):
    """Run the coroutine `load()` on a loop of its own, `measure()` here while its work goes on,
    then `cleanup(loaded)` on the load's loop. Returns (what cleanup returned, what measure returned)."""
    loop = asyncio.new_event_loop()
    ready, outcome = threading.Event(), {}

    async def main():
        loaded = await load()
        ready.set()
        while not outcome.get("stop"):
            await asyncio.sleep(0.05)
        outcome["cleaned"] = await cleanup(loaded)

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    try:
        assert ready.wait(120), "the load never started"
        measured = measure()
    finally:
        outcome["stop"] = True
        thread.join(120)
        loop.close()
    return outcome.get("cleaned"), measured


def running_now(server) -> int:
    """Generations the chat model is running now (its engine's own count)."""
    return services_of(server).pool.status(CHAT_MODEL)["queue"]["running"]


def settled(server, seconds: float = 20) -> bool:
    """Every slot given back and nothing left waiting, once the clients have gone (each request
    admitted, cancelled while waiting, or refused is counted out exactly once)."""
    services = services_of(server)
    deadline = time.monotonic() + seconds
    while services.fair.busy() or services.pool.in_flight():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_120_streams_from_one_client_leave_another_clients_chat_within_2x(public_server):
    url = public_server.url
    with client_at("127.0.0.3") as other:
        timed_chat(other, url)  # warm
        unloaded = median_chat(other, url)
        flood = async_client_at("127.0.0.2")

        async def load():
            streams = await open_streams(flood, url, 120)
            await _read_refusals(streams)
            await asyncio.sleep(1.0)  # the admitted streams are generating
            return streams

        async def cleanup(streams):
            for response in streams:
                await response.aclose()
            await flood.aclose()
            return [(r.status_code, _message(r)) for r in streams]

        def measure():
            running = running_now(public_server)  # the flooder's alone: the other client waits for its answers
            return median_chat(other, url), running

        streams, (loaded, running) = _under_load(load, measure, cleanup)
    codes = [code for code, _ in streams]
    capped = [code for code, message in streams if code == 429 and QUEUED_CAP in message]
    print(f"unloaded {unloaded:.3f} s, beside 120 streams {loaded:.3f} s ({loaded / unloaded:.2f}x); "
          f"flood: {codes.count(200)} admitted, {len(capped)} refused by the cap, {running} running at once")
    assert 503 not in codes
    assert capped, codes  # the flooder is told which limit it met
    settings = services_of(public_server).settings
    assert codes.count(200) <= settings.max_running_per_caller + settings.max_queued_per_caller  # its share
    assert running <= settings.max_running_per_caller
    assert loaded <= 2 * unloaded, (loaded, unloaded)
    assert settled(public_server)


def test_two_batches_of_256_items_do_not_make_another_clients_chat_503(public_server):
    url = public_server.url
    items = [{"messages": [{"role": "user", "content": f"Count to {i}."}]} for i in range(256)]
    batch = {"model": CHAT_MODEL, "items": items, "params": {"max_tokens": 64}, "concurrency": 64}
    with client_at("127.0.0.5") as other:
        unloaded = median_chat(other, url)
        flood = async_client_at("127.0.0.4")

        async def load():
            tasks = [asyncio.ensure_future(flood.post(f"{url}/v1/batch", json=batch)) for _ in range(2)]
            await asyncio.sleep(1.5)  # both batches are running
            return tasks

        async def cleanup(tasks):
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await flood.aclose()

        _, loaded = _under_load(load, lambda: median_chat(other, url), cleanup)
    print(f"unloaded {unloaded:.3f} s, beside two batches {loaded:.3f} s ({loaded / unloaded:.2f}x)")
    assert loaded <= 2 * unloaded, (loaded, unloaded)
    assert settled(public_server)


def test_embedding_floods_neither_hold_a_chat_nor_run_unbounded(keyed_server_2):
    url = keyed_server_2.url
    text = "Lighthouses guide ships along rocky coasts at night. " * 6
    body = {"model": "all-minilm-l6-v2", "input": [f"{i} {text}" for i in range(32)]}
    with client_at("127.0.0.6", **bearer(BOB)) as bob:
        assert bob.post(f"{url}/v1/embeddings", json=body).status_code == 200  # loads the model
        unloaded = median_chat(bob, url)
        floods = [async_client_at(a, **bearer(ALICE)) for a in ("127.0.0.7", "127.0.0.8")]

        async def load():
            posts = [asyncio.ensure_future(c.post(f"{url}/v1/embeddings", json=body))
                     for c in floods for _ in range(50)]
            await asyncio.sleep(1.0)
            return posts

        async def cleanup(posts):
            answers = await asyncio.gather(*posts, return_exceptions=True)
            for flood in floods:
                await flood.aclose()
            return [(r.status_code, _message(r)) for r in answers if isinstance(r, httpx.Response)]

        answers, loaded = _under_load(load, lambda: median_chat(bob, url), cleanup)
    capped = [code for code, message in answers if code == 429 and QUEUED_CAP in message]
    print(f"unloaded {unloaded:.3f} s, beside 100 embedding requests {loaded:.3f} s ({loaded / unloaded:.2f}x); "
          f"{sum(code == 200 for code, _ in answers)} embedded, {len(capped)} refused by the cap")
    assert capped
    assert loaded <= 2 * unloaded + 1.0, (loaded, unloaded)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/embeddings", {"input": ["Lighthouses guide ships along rocky coasts. " * 8] * 200}, "input"),
    ("/v1/rerank", {"query": "ships", "documents": ["Lighthouses guide ships along rocky coasts. " * 8] * 200},
     "documents"),
])
def test_an_embedding_request_over_the_token_bound_gets_413_naming_it(keyed_server_2, path, body, param):
    started = time.monotonic()
    response = httpx.post(f"{keyed_server_2.url}{path}", json={"model": "all-minilm-l6-v2", **body},
                          headers=bearer(ALICE), timeout=120)
    assert response.status_code == 413, response.text[:300]
    error = response.json()["error"]
    assert "--max-embedding-tokens" in error["message"] and "8192" in error["message"]
    assert error["param"] == param and error["code"] == "too_many_tokens"
    assert time.monotonic() - started < 10  # refused before any of it is computed


def _session(url: str, key: str) -> str:
    response = httpx.post(f"{url}/v1/sessions", json={"model": CHAT_MODEL}, headers=bearer(key), timeout=30)
    assert response.status_code in (200, 201), response.text
    return response.json()["id"]


def _upload(url: str, key: str, sid: str, name: str, data: bytes) -> str:
    response = httpx.post(f"{url}/v1/sessions/{sid}/files", files={"file": (name, data)}, headers=bearer(key),
                          timeout=60)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _status(url: str, key: str, sid: str, file_id: str) -> str:
    return httpx.get(f"{url}/v1/sessions/{sid}/files/{file_id}", headers=bearer(key), timeout=30).json()["status"]


def test_one_users_big_uploads_do_not_keep_another_users_small_file_queued(keyed_server_2):
    url = keyed_server_2.url
    alice, bob = _session(url, ALICE), _session(url, BOB)
    paragraph = "The keeper of the northern light wrote down the weather, the ships and the tides. "
    big = [(f"log-{n}.txt", "\n\n".join(f"Entry {n}.{i}. {paragraph * 4}" for i in range(3000)).encode())
           for n in range(3)]
    alices = [_upload(url, ALICE, alice, name, data) for name, data in big]
    mine = _upload(url, BOB, bob, "note.txt", b"Marta keeps a green notebook of storms. " * 40)
    started = time.monotonic()
    try:
        while (status := _status(url, BOB, bob, mine)) in ("queued", "parsing", "indexing"):
            assert time.monotonic() - started < 60, status
            time.sleep(0.1)
        waited = time.monotonic() - started
        theirs = [_status(url, ALICE, alice, f) for f in alices]
        print(f"the small file was {status} after {waited:.1f} s; the big ones: {theirs}")
        assert status == "ready"
        assert "ready" not in theirs  # it did not wait for a big file to finish
    finally:
        for file_id in alices:
            httpx.delete(f"{url}/v1/sessions/{alice}/files/{file_id}", headers=bearer(ALICE), timeout=30)
