"""Anthropic's Messages API through the real `anthropic` SDK against a real server on loopback, on
both engines: a message, a stream (the SDK's own event parsing and accumulated message), a tool
round trip (tool_use -> tool_result -> answer from the result), stop sequences, count_tokens, and
refusals in Anthropic's error shape that name the field."""

from __future__ import annotations

import anthropic
import httpx
import jsonschema
import pytest

from tests.conftest import CHAT_ENGINES, CHAT_MODEL

WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                            "required": ["city"], "additionalProperties": False}}
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
GREEDY = {"extra_body": {"temperature": 0}}  # the SDK no longer lists temperature; older clients send it


@pytest.fixture(scope="module")
def claude(live_server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=live_server.url, api_key="unused", max_retries=0, timeout=180)


@pytest.mark.parametrize("model", CHAT_ENGINES)
def test_a_message_and_its_stream_say_the_same(claude, model):
    made = claude.messages.create(model=model, max_tokens=24, messages=QUESTION, **GREEDY,
                                  system="You are a geography teacher.")
    assert made.type == "message" and made.role == "assistant" and made.id.startswith("msg_")
    assert [b.type for b in made.content] == ["text"] and "Paris" in made.content[0].text
    assert made.stop_reason in ("end_turn", "max_tokens") and made.usage.output_tokens > 0
    assert made.usage.input_tokens + (made.usage.cache_read_input_tokens or 0) > 10

    deltas = []
    with claude.messages.stream(model=model, max_tokens=24, messages=QUESTION, **GREEDY,
                                system="You are a geography teacher.") as stream:
        for text in stream.text_stream:
            deltas.append(text)
        streamed = stream.get_final_message()
    assert len(deltas) >= 2 and all(deltas)  # it streamed, and never an empty delta
    assert "".join(deltas) == streamed.content[0].text == made.content[0].text  # greedy: the same answer
    assert streamed.stop_reason == made.stop_reason and streamed.usage.output_tokens == made.usage.output_tokens


@pytest.mark.parametrize("model", CHAT_ENGINES)
def test_a_last_assistant_turn_is_continued_as_anthropic_prefill(claude, model):
    """Anthropic's prefill: the answer goes on from the assistant's words (and holds only what it adds)."""
    prefix = "The capital of France is"
    prefilled = [QUESTION[0], {"role": "assistant", "content": prefix}]
    made = claude.messages.create(model=model, max_tokens=12, **GREEDY, messages=prefilled)
    text = made.content[0].text
    assert "Paris" in text and not text.lstrip().startswith("The capital")
    counted = claude.messages.count_tokens(model=model, messages=prefilled)
    opened = claude.messages.count_tokens(model=model, messages=QUESTION)
    assert counted.input_tokens > opened.input_tokens  # the prefix is read, no turn is opened after it


@pytest.mark.parametrize("model", CHAT_ENGINES)
def test_a_tool_round_trip(claude, model):
    ask = [{"role": "user", "content": "What is the weather like in Paris?"}]
    first = claude.messages.create(model=model, max_tokens=80, messages=ask, tools=[WEATHER],
                                   tool_choice={"type": "any"}, **GREEDY)
    assert first.stop_reason == "tool_use"
    (call,) = first.content
    assert call.type == "tool_use" and call.name == "get_weather"
    jsonschema.validate(call.input, WEATHER["input_schema"])

    def answer_with(result: str) -> str:
        history = [*ask, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": result}]}]
        final = claude.messages.create(model=model, max_tokens=40, messages=history, tools=[WEATHER],
                                       **GREEDY)
        assert final.stop_reason in ("end_turn", "max_tokens") and final.content[0].type == "text"
        return final.content[0].text

    sunny, storm = answer_with("31 degrees, sunny"), answer_with("Heavy storm, 4 degrees, roads closed")
    assert "sunny" in sunny.lower() and "sunny" not in storm.lower()  # the model answered from the result

    with claude.messages.stream(model=model, max_tokens=80, messages=ask, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather"}, **GREEDY) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use" and streamed.content[0].type == "tool_use"
    jsonschema.validate(streamed.content[0].input, WEATHER["input_schema"])  # input_json_delta, accumulated


def test_output_config_format_gives_json_of_the_schema(claude):
    import json
    schema = {"type": "object", "properties": {"animal": {"type": "string", "maxLength": 20},
                                               "legs": {"type": "integer", "minimum": 0, "maximum": 10}},
              "required": ["animal", "legs"], "additionalProperties": False}
    made = claude.messages.create(model=CHAT_MODEL, max_tokens=60, messages=[{"role": "user", "content": "A cat?"}],
                                  output_config={"format": {"type": "json_schema", "schema": schema}})
    jsonschema.validate(json.loads(made.content[0].text), schema)


def test_stop_sequences_and_count_tokens(claude):
    counting = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    stopped = claude.messages.create(model=CHAT_MODEL, max_tokens=60, messages=counting, **GREEDY,
                                     stop_sequences=["5", "never here"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "5"
    assert "5" not in stopped.content[0].text and "4" in stopped.content[0].text

    counted = claude.messages.count_tokens(model=CHAT_MODEL, messages=QUESTION)
    made = claude.messages.create(model=CHAT_MODEL, max_tokens=4, messages=QUESTION, **GREEDY)
    assert counted.input_tokens == made.usage.input_tokens + (made.usage.cache_read_input_tokens or 0)
    with_tools = claude.messages.count_tokens(model=CHAT_MODEL, messages=QUESTION, tools=[WEATHER])
    assert with_tools.input_tokens > counted.input_tokens  # the tools are part of the prompt


@pytest.mark.parametrize(("body", "field"), [
    ({"messages": QUESTION}, "max_tokens"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     "messages.0.content.0.type"),
    ({"max_tokens": 8, "messages": QUESTION, "thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"max_tokens": 8, "messages": QUESTION, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
     "tools.0"),
    ({"max_tokens": 8, "messages": QUESTION, "output_config": {"effort": "high"}}, "output_config.effort"),
    ({"max_tokens": 8, "messages": QUESTION, "extra_body": {"temperature": 5}}, "temperature"),
    ({"max_tokens": 8, "messages": QUESTION, "tool_choice": {"type": "tool", "name": "nope"},
      "tools": [WEATHER]}, "tool_choice"),
])
def test_refusals_are_anthropic_shaped_400s_naming_the_field(claude, live_server, body, field):
    sent = {k: v for k, v in body.items() if k != "extra_body"} | body.get("extra_body", {})
    response = httpx.post(f"{live_server.url}/v1/messages", json={"model": CHAT_MODEL, **sent},
                          headers={"x-api-key": "unused", "anthropic-version": "2023-06-01"})
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert field in error["error"]["message"]
    if "max_tokens" in body:  # (the SDK itself insists on max_tokens)
        with pytest.raises(anthropic.BadRequestError):  # the SDK's own class for it
            claude.messages.create(model=CHAT_MODEL, **body)


def test_an_unknown_model_is_the_sdks_not_found_error(claude):
    with pytest.raises(anthropic.NotFoundError) as info:
        claude.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=QUESTION)
    assert "claude-sonnet-4-5" in str(info.value)
