"""Tool calling through the real `openai` client against a real server, on both engines: a call
whose arguments always validate (required / named tools are enforced while decoding), streamed
as tool-call deltas, a full round trip (call, tool result, final answer), plain text with
`auto`, and refusals that name the field."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from openai import OpenAI

from tests.conftest import CHAT_ENGINES, TRANSFORMERS_CHAT

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}},
                   "required": ["zone"], "additionalProperties": False}}}
QUESTION = [{"role": "user", "content": "What is the weather like in Paris?"}]


@pytest.fixture(scope="module")
def client(live_server) -> OpenAI:
    return OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0, timeout=180)


def schema_of(tool: dict) -> dict:
    return tool["function"]["parameters"]


@pytest.mark.parametrize("model", CHAT_ENGINES)
def test_round_trip_call_result_and_final_answer(client, model):
    first = client.chat.completions.create(model=model, messages=QUESTION, tools=[WEATHER, TIME],
                                           tool_choice="required", temperature=0, max_tokens=80)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema_of(tool))

    def answer_with(result: str) -> str:
        history = [*QUESTION, choice.message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": result}]
        final = client.chat.completions.create(model=model, messages=history, tools=[WEATHER, TIME],
                                               temperature=0, max_tokens=40)
        assert final.choices[0].message.tool_calls is None and final.choices[0].finish_reason in ("stop", "length")
        return final.choices[0].message.content

    sunny, storm = answer_with("31 degrees, sunny"), answer_with("Heavy storm, 4 degrees, roads closed")
    assert "sunny" in sunny.lower() and "sunny" not in storm.lower()  # the model answered from the result


@pytest.mark.parametrize("model", CHAT_ENGINES)
def test_a_named_tool_is_called_and_streamed_as_deltas(client, model):
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What time is it in Tokyo?"}], tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0.8, seed=4,
        max_tokens=80, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        assert not delta.content  # a call is not also text
        for part in delta.tool_calls or []:
            entry = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = part.id or entry["id"]
            entry["name"] += (part.function.name or "") if part.function else ""
            entry["arguments"] += (part.function.arguments or "") if part.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), schema_of(WEATHER))


def test_auto_answers_in_text_when_it_calls_nothing_and_none_hides_the_tools(client):
    # greedy on transformers: the same words every run
    asked = [{"role": "user", "content": "Say hello to my friend Anna in one sentence."}]
    stream = client.chat.completions.create(model=TRANSFORMERS_CHAT, messages=asked, tools=[WEATHER],
                                            temperature=0, max_tokens=30, stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3 and not "".join(pieces).lstrip().startswith("{")  # text, streamed as it comes
    plain = client.chat.completions.create(model=TRANSFORMERS_CHAT, messages=asked, temperature=0, max_tokens=30)
    hidden = client.chat.completions.create(model=TRANSFORMERS_CHAT, messages=asked, tools=[WEATHER],
                                            tool_choice="none", temperature=0, max_tokens=30)
    assert hidden.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize("body, field", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
])
def test_bad_tool_requests_are_refused_by_name(live_server, body, field):
    response = httpx.post(f"{live_server.url}/v1/chat/completions", timeout=60, json={
        "messages": QUESTION, "max_tokens": 2, **body})
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["param"] == field, response.text


def test_a_tool_message_must_name_its_call(live_server):
    response = httpx.post(f"{live_server.url}/v1/chat/completions", timeout=60, json={
        "max_tokens": 2, "messages": [*QUESTION, {"role": "tool", "content": "31 degrees"}]})
    assert response.status_code == 400 and "tool_call_id" in response.json()["error"]["message"]


def test_a_session_with_tools_calls_one_and_answers_from_the_result(live_server):
    """A chat session (REST) that defines tools: with tool_choice required the reply to a user's
    message is a call with valid arguments; the next message is that call's result, and the
    model answers from it."""
    url = live_server.url
    sid = httpx.post(f"{url}/v1/sessions", json={"model": TRANSFORMERS_CHAT, "tools": [WEATHER],
                                                  "tool_choice": "required",
                                                  "params": {"temperature": 0, "max_new_tokens": 60}}).json()["id"]
    asked = httpx.post(f"{url}/v1/sessions/{sid}/messages", json={"content": QUESTION[0]["content"]},
                       timeout=120).json()
    assert asked["finish_reason"] == "tool_calls", asked
    (call,) = asked["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), schema_of(WEATHER))
    answer = httpx.post(f"{url}/v1/sessions/{sid}/messages", json={"content": "31 degrees, sunny"},
                        timeout=120).json()
    assert answer["finish_reason"] in ("stop", "length") and "tool_calls" not in answer
    assert "sunny" in answer["content"].lower()
    stored = httpx.get(f"{url}/v1/sessions/{sid}").json()
    assert stored["tools"] == [WEATHER] and stored["tool_choice"] == "required"
    user, called, result, final = stored["messages"]
    assert called["tool_calls"] == asked["tool_calls"] and called["finish_reason"] == "tool_calls"
    assert result["role"] == "user" and result["tool_call_id"] == call["id"] and result["tool"] == "get_weather"
    assert final["content"] == answer["content"]
    # tools off again: the same question is answered in words
    assert httpx.patch(f"{url}/v1/sessions/{sid}", json={"tools": []}).json()["tools"] == []


@pytest.mark.parametrize("body, field", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
])
def test_bad_session_tools_are_refused_by_name(live_server, body, field):
    response = httpx.post(f"{live_server.url}/v1/sessions", json=body, timeout=30)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert error.get("param") == field or field in error["message"], response.text
