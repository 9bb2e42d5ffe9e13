"""Gradio's own surface, played as a stranger against real servers on loopback. The findings: a
UI event whose file input named a server path (`/proc/self/environ`, the session secret, the
session store) got it copied into Gradio's cache, `/gradio_api/deep_link` told where, and
`/gradio_api/file=` served it; `/gradio_api/upload` kept 25 x 24 MB from one client in 4 s, used or
not; a 500 MB chunked upload was read to its end before its 413; `/gradio_api/process_recording`
answered strangers. Distinct clients are distinct loopback addresses (127.0.0.x)."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import httpx
import pytest
from gradio.utils import get_upload_folder

from tests.conftest import make_settings, serve
from tests.security.conftest import ALICE, BOB, bearer, services_of

BUDGET = {"upload_budget_mb": 2, "upload_budget_files": 3, "upload_ttl": 2, "max_upload_mb": 1}


@pytest.fixture(scope="module")
def upload_server(pool, embedder, tmp_path_factory):
    """A public server (keys off, loopback not trusted) with tiny upload budgets, a 2 s upload
    lifetime, and its session secret generated into its data dir as on a Space."""
    from service import build_services
    settings = make_settings(tmp_path_factory.mktemp("gradio-surface"), trust_loopback=False,
                             session_secret=None, **BUDGET)
    server = serve(build_services(settings, pool=pool, embedder=embedder))
    yield server
    server.stop()


def client_at(address: str, **kwargs) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=60, **kwargs)


def upload(client: httpx.Client, url: str, content: bytes, name: str = "notes.txt") -> httpx.Response:
    return client.post(f"{url}/gradio_api/upload", files={"files": (name, content, "text/plain")})


def guard_of(server):
    from server.gradio_guard import GradioGuard
    return next(r.app for r in server.server.config.app.routes if isinstance(getattr(r, "app", None), GradioGuard))


def upload_event(url: str, headers: dict | None = None) -> tuple[int, list, int]:
    """The UI's "Add files" event, read from the page's config as a browser reads it: its
    fn_index, the inputs' default values, and which input is the file list."""
    config = httpx.get(f"{url}/config", headers=headers or {}).json()
    components = {c["id"]: c for c in config["components"]}
    files = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "file-upload")
    for index, dep in enumerate(config["dependencies"]):
        if [files, "upload"] in [list(t) for t in dep.get("targets", [])]:
            data = [components[i].get("props", {}).get("value") for i in dep["inputs"]]
            return dep.get("id", index), data, dep["inputs"].index(files)
    raise AssertionError("the Files panel's upload event was not found")


def file_data(path: str) -> dict:
    return {"path": path, "orig_name": Path(path).name, "meta": {"_type": "gradio.FileData"}}


def join(client: httpx.Client, url: str, fn_index: int, data: list, session: str | None = None) -> httpx.Response:
    return client.post(f"{url}/gradio_api/queue/join", json={
        "data": data, "fn_index": fn_index, "session_hash": session or uuid.uuid4().hex, "event_data": None,
        "trigger_id": None})


def run_event(client: httpx.Client, url: str, fn_index: int, data: list) -> dict:
    """One UI event as the page runs it (join, then its stream) from this client; the
    `process_completed` message."""
    session = uuid.uuid4().hex
    join(client, url, fn_index, data, session).raise_for_status()
    with client.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:") and json.loads(line[5:]).get("msg") == "process_completed":
                return json.loads(line[5:])
    raise AssertionError("the event never completed")


def refusal(response: httpx.Response, status: int, words: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert words in error["message"], error
    return error


def files_holding(folder: Path, secret: bytes, since: float) -> list[Path]:
    found = []
    for path in folder.rglob("*"):
        try:
            if path.is_file() and path.stat().st_mtime >= since and secret in path.read_bytes():
                found.append(path)
        except OSError:
            continue
    return found


# ---------------------------------------------------------------------------------- the exploit
def test_a_file_input_naming_a_server_path_gets_nothing(upload_server):
    """The exploit as played: queue/join the Files panel's event with server paths instead of
    uploads, then ask deep_link where the copies went and file= for them. Now the event is refused,
    nothing is copied into Gradio's folder, deep_link is closed, and nothing comes back."""
    url = upload_server.url
    data_dir = services_of(upload_server).settings.data_dir
    secret = (data_dir / "session-secret").read_text().strip()
    environ = Path("/proc/self/environ").read_bytes()  # the server runs in this process
    targets = ["/proc/self/environ", str(data_dir / "session-secret"), str(data_dir / "sessions" / "cache.db"),
               "/etc/passwd", "https://example.com/x.txt"]
    fn_index, data, files_at = upload_event(url)
    folder = Path(get_upload_folder())
    began = time.time() - 1
    session = uuid.uuid4().hex
    with client_at("127.0.0.2") as stranger:
        data[files_at] = [file_data(p) for p in targets]
        refusal(join(stranger, url, fn_index, data, session), 403, "--upload-ttl")
        data[files_at] = None
        data[0] = file_data("/proc/self/environ")  # any input, not only a File: Gradio copies any file object
        refusal(join(stranger, url, fn_index, data, session), 403, "uploaded to the web UI")
        for path in ("/gradio_api/run/predict", "/gradio_api/call/v2/complete"):  # the other event doors
            body = {"data": [file_data("/proc/self/environ")], "fn_index": fn_index, "session_hash": session}
            refusal(stranger.post(f"{url}{path}", json=body), 403, "uploaded to the web UI")
        deep = stranger.get(f"{url}/gradio_api/deep_link", params={"session_hash": session})
        assert deep.status_code == 404
        answers = [deep.text] + [stranger.get(f"{url}/gradio_api/file={p}").text for p in targets]
    assert files_holding(folder, environ[:200], began) == []
    assert files_holding(folder, secret.encode(), began) == []
    for text in answers:
        assert secret not in text and "PATH=" not in text and "SQLite format" not in text


def test_only_the_uploader_may_use_or_fetch_an_upload(upload_server):
    """An upload path is the client's own: another client can name it in no event and fetch it
    from no route; the uploader can. The data dir and the model cache are never served."""
    url = upload_server.url
    settings = services_of(upload_server).settings
    fn_index, data, files_at = upload_event(url)
    with client_at("127.0.0.3") as owner, client_at("127.0.0.4") as other:
        uploaded = upload(owner, url, b"my own notes\n")
        assert uploaded.status_code == 200, uploaded.text
        path = uploaded.json()[0]
        assert owner.get(f"{url}/gradio_api/file={path}").text == "my own notes\n"
        assert other.get(f"{url}/gradio_api/file={path}").status_code == 404
        data[files_at] = [file_data(path)]
        refusal(join(other, url, fn_index, data), 403, "not one")
        assert join(owner, url, fn_index, data).status_code == 200  # the page's own flow still works
        for target in (settings.data_dir / "session-secret", settings.data_dir / "sessions" / "cache.db",
                       settings.models_dir, "https://example.com/"):
            response = other.get(f"{url}/gradio_api/file={target}")
            assert response.status_code in (403, 404) and "SQLite" not in response.text


def test_uploads_belong_to_the_key_not_the_address(keyed_server_2):
    """With keys on, two users behind one address are two clients: Bob cannot use or fetch Alice's upload."""
    url = keyed_server_2.url
    with httpx.Client(timeout=60) as client:
        uploaded = client.post(f"{url}/gradio_api/upload", headers=bearer(ALICE),
                               files={"files": ("alice.txt", b"alice's notes\n", "text/plain")})
        assert uploaded.status_code == 200, uploaded.text
        path = uploaded.json()[0]
        fn_index, data, files_at = upload_event(url, bearer(ALICE))
        data[files_at] = [file_data(path)]
        body = {"data": data, "fn_index": fn_index, "session_hash": uuid.uuid4().hex}
        refusal(client.post(f"{url}/gradio_api/queue/join", headers=bearer(BOB), json=body), 403, "not one")
        assert client.get(f"{url}/gradio_api/file={path}", headers=bearer(BOB)).status_code == 404
        assert client.get(f"{url}/gradio_api/file={path}", headers=bearer(ALICE)).text == "alice's notes\n"


# ---------------------------------------------------------------------------------- uploads
def test_each_client_has_an_upload_budget(upload_server):
    """The finding: 25 x 24 MB from one client in 4 s, all kept. Now files and bytes per client
    per window are bounded (429 naming the setting, with Retry-After); other clients go on."""
    url = upload_server.url
    with client_at("127.0.0.5") as many, client_at("127.0.0.6") as big, client_at("127.0.0.7") as other:
        for n in range(3):
            assert upload(many, url, f"file {n}\n".encode(), f"f{n}.txt").status_code == 200
        error = refusal(upload(many, url, b"one more\n"), 429, "--upload-budget-files")
        assert error["code"] == "upload_budget_exceeded"
        assert int(upload(many, url, b"again\n").headers["retry-after"]) > 0
        assert upload(big, url, b"x" * 900_000).status_code == 200
        assert upload(big, url, b"y" * 900_000).status_code == 200
        refusal(upload(big, url, b"z" * 900_000), 429, "--upload-budget-mb")
        assert upload(other, url, b"someone else\n").status_code == 200


def test_a_file_over_the_size_limit_is_a_clear_413(upload_server):
    with client_at("127.0.0.8") as client:
        refusal(upload(client, upload_server.url, b"z" * 1_100_000), 413, "--max-upload-mb")


def test_an_unused_upload_is_deleted_after_its_lifetime(upload_server):
    """Uploads no event uses are deleted after --upload-ttl (2 s here); then no event can use them."""
    url = upload_server.url
    fn_index, data, files_at = upload_event(url)
    with client_at("127.0.0.9") as client:
        path = upload(client, url, b"left behind\n").json()[0]
        assert Path(path).is_file()
        deadline = time.monotonic() + 10
        while Path(path).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(path).exists()
        data[files_at] = [file_data(path)]
        refusal(join(client, url, fn_index, data), 403, "not one")
        assert client.get(f"{url}/gradio_api/file={path}").status_code in (403, 404)


def test_an_upload_the_chat_took_is_deleted_at_once(upload_server):
    """The Files panel's event reads the upload into the chat's store; Gradio's copy goes then."""
    url = upload_server.url
    services = services_of(upload_server)
    token = services.identity.new_browser_token()
    fn_index, data, files_at = upload_event(url)
    with client_at("127.0.0.10") as client:
        path = upload(client, url, b"The harbour opens at dawn.\n", "harbour.txt").json()[0]
    data[0], data[files_at] = token, [file_data(path)]
    with client_at("127.0.0.10") as client:
        done = run_event(client, url, fn_index, data)
    assert done["success"], done
    assert not Path(path).exists()
    user = f"browser-{services.identity.browser_id(token)}"
    [session] = services.store.list(user)
    assert [f["name"] for f in services.documents.list(user, session.id)] == ["harbour.txt"]


def test_a_chunked_body_over_the_limit_is_cut_off_not_read_to_its_end(upload_server):
    """The finding: a 500 MB chunked upload was read to its end before its 413. Now the server
    answers and closes the connection at the limit (2 MB here): most of the body is never sent."""
    sent = 0
    boundary = "shoal-test-boundary"

    def body():
        nonlocal sent
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.txt"\r\n'
               "Content-Type: text/plain\r\n\r\n").encode()
        chunk = b"x" * (1 << 20)
        for _ in range(200):
            sent += len(chunk)
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    with client_at("127.0.0.11") as client:
        try:
            response = client.post(f"{upload_server.url}/gradio_api/upload", content=body(),
                                   headers={"content-type": f"multipart/form-data; boundary={boundary}"})
            assert response.status_code in (413, 429), response.text
        except httpx.TransportError:
            pass  # the server closed the connection while the client was still sending
    assert sent < 50 * (1 << 20), f"{sent / 1e6:.0f} MB of 210 MB were sent before the server stopped reading"


# ---------------------------------------------------------------------------------- routes
def test_process_recording_is_closed(public_server):
    response = httpx.post(f"{public_server.url}/gradio_api/process_recording", timeout=30,
                          files={"data": ("a.wav", b"RIFF....WAVE", "audio/wav")})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_every_mounted_gradio_route_is_decided_and_closed_ones_answer_404(public_server):
    """Each route Gradio mounts is in the table (server/gradio_routes.py), so a Gradio upgrade that
    adds one fails here until someone decides about it; every closed one answers 404."""
    from server.gradio_routes import ROUTES, SHADOWED
    guard = guard_of(public_server)
    mounted = {route.path: route.methods for route in guard.routes}
    assert set(mounted) - set(ROUTES) == set(), "routes nobody decided about"
    closed = [(path, method) for path, methods in mounted.items() if ROUTES[path].closed for method in methods]
    assert {"/gradio_api/deep_link", "/gradio_api/process_recording", "/monitoring/summary",
            "/gradio_api/proxy={url_path:path}", "/gradio_api/startup-events"} <= {p for p, _ in closed}
    for path, method in closed:
        if path in SHADOWED:
            continue  # Shoal's own route answers this path before Gradio's
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        response = httpx.request(method, f"{public_server.url}{concrete}", timeout=30)
        assert response.status_code == 404, (method, concrete, response.status_code)
    for path in ("/gradio_api/run/complete", "/gradio_api/api/complete", "/gradio_api/nonexistent"):
        assert httpx.post(f"{public_server.url}{path}", json={"data": []}).status_code == 404


def test_the_open_routes_the_page_needs_still_answer(public_server):
    url = public_server.url
    for path in ("/", "/config", "/gradio_api/info", "/theme.css", "/favicon.ico"):
        assert httpx.get(f"{url}{path}", timeout=30).status_code == 200, path
    assert json.loads(httpx.get(f"{url}/gradio_api/info").text)["named_endpoints"]
