"""MCP tools, run by Shoal: a real MCP server written with the official SDK (tests/mcp_vault.py),
which Shoal starts over stdio from the operator's --mcp-config, is called by the model through the
Responses API (the real `openai` SDK, created and streamed), through a chat session's REST API, with
the caller's identity; what users may see of the servers hides the operator's secrets; a request
that names a server the operator did not configure, or a URL of its own, is refused by name."""

from __future__ import annotations

import json
import sys

import httpx
import pytest
from openai import BadRequestError, OpenAI

from tests.conftest import CHAT_ENGINES, make_settings, serve

ROOT_SERVER = __import__("pathlib").Path(__file__).resolve().parent.parent / "mcp_vault.py"
SECRET = "vault-operator-secret-5d1e"  # also a bearer token "vault-..."
VAULT = {"type": "mcp", "server_label": "vault", "require_approval": "never"}
ASK = "What is the vault code for Oslo?"
OSLO = "ZQ-1445"


def mcp_config(tmp_path, tools: str = "") -> str:
    """`tools`: only these of the vault's tools (comma-separated), else all."""
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {"vault": {"command": sys.executable, "args": [str(ROOT_SERVER)],
                                                         "env": {"VAULT_SECRET": SECRET, "VAULT_TOOLS": tools}}}}))
    return str(path)


@pytest.fixture(scope="module")
def mcp_server(pool, embedder, tmp_path_factory):
    """Keys on: alice and bob are two users of one Shoal with the operator's vault server."""
    from service import build_services
    folder = tmp_path_factory.mktemp("mcp")
    services = build_services(make_settings(folder / "data", mcp_config=mcp_config(folder),
                                            api_keys=["sk-alice-1", "sk-bob-1"]), pool=pool, embedder=embedder)
    server = serve(services, with_ui=False)
    yield server
    server.stop()
    services.mcp.close()


def client(server, key="sk-alice-1") -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=240)


@pytest.mark.parametrize("model", CHAT_ENGINES)
def test_a_response_calls_the_mcp_tool_and_answers_from_its_result(mcp_server, model):
    made = client(mcp_server).responses.create(
        model=model, input=ASK, tools=[{**VAULT, "allowed_tools": ["vault_code"]}], tool_choice="required",
        temperature=0, max_output_tokens=60, store=False)
    kinds = [item.type for item in made.output]
    assert kinds == ["mcp_list_tools", "mcp_call", "message"], kinds
    listed, call, message = made.output
    assert [t.name for t in listed.tools] == ["vault_code"]  # allowed_tools kept the others out
    assert call.server_label == "vault" and call.name == "vault_code" and call.error is None
    assert json.loads(call.arguments)["city"].lower() == "oslo"
    assert OSLO in call.output
    assert OSLO in made.output_text  # the model read the result
    assert made.usage.input_tokens > 0 and made.usage.output_tokens > 0


def test_an_answer_sent_back_as_input_keeps_its_mcp_steps(mcp_server):
    """Without storage a client sends the output items back: the mcp_call carries the call and its result."""
    made = client(mcp_server).responses.create(model=CHAT_ENGINES[0], input=ASK, tools=[VAULT],
                                               tool_choice="required", temperature=0, max_output_tokens=60,
                                               store=False)
    items = [{"role": "user", "content": ASK}, *[i.model_dump(exclude_none=True) for i in made.output],
             {"role": "user", "content": "Say the code again."}]
    again = client(mcp_server).responses.create(model=CHAT_ENGINES[0], input=items, temperature=0,
                                                max_output_tokens=30, store=False)
    assert [i.type for i in again.output] == ["message"] and OSLO in again.output_text


def test_a_streamed_response_shows_the_call_as_it_runs(mcp_server):
    kinds = []
    with client(mcp_server).responses.stream(model=CHAT_ENGINES[0], input=ASK, tools=[VAULT],
                                             tool_choice={"type": "mcp", "server_label": "vault",
                                                          "name": "vault_code"},
                                             temperature=0, max_output_tokens=60, store=False) as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    for kind in ("response.mcp_list_tools.completed", "response.mcp_call_arguments.done",
                 "response.mcp_call.in_progress", "response.mcp_call.completed", "response.output_text.delta"):
        assert kind in kinds
    assert kinds.index("response.mcp_call.completed") < kinds.index("response.output_text.delta")
    call = next(item for item in final.output if item.type == "mcp_call")
    assert OSLO in call.output and OSLO in final.output_text


def test_a_chat_session_runs_its_mcp_tools_and_keeps_each_step(mcp_server):
    headers = {"Authorization": "Bearer sk-alice-1"}
    with httpx.Client(base_url=mcp_server.url, headers=headers, timeout=240) as http:
        session = http.post("/v1/sessions", json={"mcp_servers": ["vault"], "tool_choice": "required",
                                                  "params": {"temperature": 0, "max_new_tokens": 60}}).json()
        assert session["mcp_servers"] == ["vault"]
        reply = http.post(f"/v1/sessions/{session['id']}/messages", json={"content": ASK})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        (ran,) = body["mcp_calls"]
        assert ran["server"] == "vault" and ran["tool"] == "vault_code" and OSLO in ran["output"]
        assert OSLO in body["content"] and body["finish_reason"] in ("stop", "length")
        messages = http.get(f"/v1/sessions/{session['id']}").json()["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
        assert messages[1]["tool_calls"][0]["function"]["name"] == "vault__vault_code"
        assert messages[2]["mcp_server"] == "vault" and OSLO in messages[2]["content"]

        streamed = http.post(f"/v1/sessions/{session['id']}/messages", json={"content": ASK, "stream": True})
        events = [json.loads(line[6:]) for line in streamed.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        kinds = [e["type"] for e in events]
        assert "mcp_call" in kinds and kinds[-1] == "done", kinds
        assert OSLO in events[-1]["message"]["content"]


def test_calls_run_with_the_callers_identity(mcp_server):
    seen = {}
    for key in ("sk-alice-1", "sk-bob-1"):
        made = client(mcp_server, key).responses.create(
            model=CHAT_ENGINES[0], input="Who am I?", tools=[VAULT],
            tool_choice={"type": "mcp", "server_label": "vault", "name": "whoami"},
            temperature=0, max_output_tokens=60, store=False)
        seen[key] = next(item for item in made.output if item.type == "mcp_call").output
    assert all(v.startswith("user=") and len(v) > len("user=") for v in seen.values())
    assert seen["sk-alice-1"] != seen["sk-bob-1"]


def test_users_see_the_servers_and_tools_but_not_the_operators_secrets(mcp_server):
    listed = httpx.get(f"{mcp_server.url}/v1/mcp/servers", headers={"Authorization": "Bearer sk-bob-1"}, timeout=30)
    assert listed.status_code == 200
    (vault,) = listed.json()["data"]
    assert vault["name"] == "vault" and vault["transport"] == "stdio" and vault["state"] == "ready"
    assert {t["name"] for t in vault["tools"]} == {"vault_code", "whoami", "secret_seen"}
    assert SECRET not in listed.text and "mcp_vault.py" not in listed.text and sys.executable not in listed.text
    # the environment did reach the server
    made = client(mcp_server).responses.create(
        model=CHAT_ENGINES[0], input="Was the secret seen?", tools=[VAULT],
        tool_choice={"type": "mcp", "server_label": "vault", "name": "secret_seen"}, max_output_tokens=60,
        store=False)
    assert next(item for item in made.output if item.type == "mcp_call").output == "yes"
    assert SECRET not in made.model_dump_json()
    assert httpx.get(f"{mcp_server.url}/v1/mcp/servers", timeout=30).status_code == 401  # a stranger


@pytest.mark.parametrize("tool, param", [
    ({"type": "mcp", "server_label": "elsewhere"}, "tools.0.server_label"),
    ({"type": "mcp", "server_label": "vault", "server_url": "http://169.254.169.254/mcp"}, "server_url"),
    ({"type": "mcp", "server_label": "vault", "require_approval": "always"}, "require_approval"),
    ({"type": "web_search"}, "tools.0.type"),
])
def test_a_server_the_operator_did_not_configure_is_refused_by_name(mcp_server, tool, param):
    with pytest.raises(BadRequestError) as refused:
        client(mcp_server).responses.create(model=CHAT_ENGINES[0], input=ASK, tools=[tool], store=False)
    assert refused.value.body["param"] == param, refused.value.body
    with httpx.Client(base_url=mcp_server.url, headers={"Authorization": "Bearer sk-bob-1"}, timeout=30) as http:
        made = http.post("/v1/sessions", json={"mcp_servers": ["elsewhere"]})
        assert made.status_code == 400 and made.json()["error"]["param"] == "mcp_servers"


def test_a_stranger_without_an_identity_cannot_call_mcp_tools(pool, embedder, tmp_path):
    from service import build_services
    services = build_services(make_settings(tmp_path / "data", mcp_config=mcp_config(tmp_path), trust_loopback=False),
                              pool=pool, embedder=embedder)
    server = serve(services, with_ui=False)
    try:
        refused = httpx.post(f"{server.url}/v1/responses", json={"model": CHAT_ENGINES[0], "input": ASK,
                                                                  "tools": [VAULT], "store": False}, timeout=60)
        assert refused.status_code == 401 and refused.json()["error"]["param"] == "tools"
    finally:
        server.stop()
        services.mcp.close()


def test_a_streamable_http_server_is_called_with_the_operators_headers(pool, embedder, tmp_path):
    """The same server over Streamable HTTP on loopback (allowed here with --allow-private-remotes)."""
    import subprocess
    import time

    from service import build_services
    from tests.conftest import free_port
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT_SERVER), "--http", str(port)], env={"VAULT_TOOLS": ""},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"vault": {"url": f"http://127.0.0.1:{port}/mcp",
                                                           "headers": {"Authorization": f"Bearer {SECRET}"}}}}))
    services = server = None
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.post(f"http://127.0.0.1:{port}/mcp", json={}, timeout=5)
                break  # any answer: it listens
            except httpx.ConnectError:
                time.sleep(0.2)
        services = build_services(make_settings(tmp_path / "data", mcp_config=str(config), allow_private_remotes=True),
                                  pool=pool, embedder=embedder)
        server = serve(services, with_ui=False)
        made = httpx.post(f"{server.url}/v1/responses", timeout=120, json={
            "model": CHAT_ENGINES[0], "input": "Was the secret seen?", "store": False, "max_output_tokens": 60,
            "tools": [VAULT], "tool_choice": {"type": "mcp", "server_label": "vault", "name": "secret_seen"}})
        assert made.status_code == 200, made.text
        call = next(item for item in made.json()["output"] if item["type"] == "mcp_call")
        assert call["output"] == "yes"  # the header reached the server
        listed = httpx.get(f"{server.url}/v1/mcp/servers", timeout=30).json()["data"][0]
        shown = json.dumps(listed)
        assert listed["transport"] == "http" and SECRET not in shown and str(port) not in shown
    finally:
        if server is not None:
            server.stop()
            services.mcp.close()
        process.kill()


def test_an_mcp_url_on_a_private_address_is_refused_unless_allowed(tmp_path):
    from llm_pool.policy import SourcePolicy
    from service.mcp import load_config
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {"local": {"url": "http://127.0.0.1:9/mcp"}}}))
    with pytest.raises(ValueError, match="loopback"):
        load_config(path, SourcePolicy([], False).check_url)
    (server,) = load_config(path, SourcePolicy([], True).check_url)
    assert server.transport == "http" and "127.0.0.1" not in repr(server)
