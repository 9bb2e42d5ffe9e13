"""OpenAI's Responses API through the real `openai` SDK against a real server on loopback, on both
engines: a response and its stream (the SDK's own event handling and final response), a
function-tool round trip with the call and its output sent back as input items, `text.format`
validated with jsonschema, and refusals naming the field, among them what needs stored
responses (not built yet), so no client is silently treated as stateless."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from openai import BadRequestError, OpenAI

from tests.conftest import CHAT_ENGINES, CHAT_MODEL

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                          "required": ["city"], "additionalProperties": False}}
QUESTION = "What is the capital of France? Answer in one word."


@pytest.fixture(scope="module")
def client(live_server) -> OpenAI:
    return OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0, timeout=180)


@pytest.mark.parametrize("model", CHAT_ENGINES)
def test_a_response_and_its_stream_say_the_same(client, model):
    made = client.responses.create(model=model, input=QUESTION, instructions="You are a geography teacher.",
                                   temperature=0, max_output_tokens=24, store=False)
    assert made.object == "response" and made.status in ("completed", "incomplete") and made.id.startswith("resp_")
    assert "Paris" in made.output_text and made.usage.output_tokens > 0 and made.usage.input_tokens > 10

    deltas, kinds = [], []
    with client.responses.stream(model=model, input=QUESTION, instructions="You are a geography teacher.",
                                 temperature=0, max_output_tokens=24, store=False) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        streamed = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert len(deltas) >= 2 and all(deltas)
    assert "".join(deltas) == streamed.output_text == made.output_text  # greedy: the same answer


@pytest.mark.parametrize("model", CHAT_ENGINES)
def test_a_function_tool_round_trip(client, model):
    ask = [{"role": "user", "content": "What is the weather like in Paris?"}]
    first = client.responses.create(model=model, input=ask, tools=[WEATHER], tool_choice="required",
                                    temperature=0, max_output_tokens=80, store=False)
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])

    def answer_with(result: str) -> str:
        items = [*ask, call.model_dump(exclude_none=True),
                 {"type": "function_call_output", "call_id": call.call_id, "output": result}]
        final = client.responses.create(model=model, input=items, tools=[WEATHER], temperature=0,
                                        max_output_tokens=40, store=False)
        assert [o.type for o in final.output] == ["message"]
        return final.output_text

    sunny, storm = answer_with("31 degrees, sunny"), answer_with("Heavy storm, 4 degrees, roads closed")
    assert "sunny" in sunny.lower() and "sunny" not in storm.lower()  # the model answered from the result

    with client.responses.stream(model=model, input=ask, tools=[WEATHER], temperature=0, max_output_tokens=80,
                                 tool_choice={"type": "function", "name": "get_weather"}, store=False) as stream:
        streamed = stream.get_final_response()
    (streamed_call,) = streamed.output
    assert streamed_call.type == "function_call"
    jsonschema.validate(json.loads(streamed_call.arguments), WEATHER["parameters"])


def test_text_format_json_schema(client):
    schema = {"type": "object", "properties": {"animal": {"type": "string", "maxLength": 20},
                                               "legs": {"type": "integer", "minimum": 0, "maximum": 10}},
              "required": ["animal", "legs"], "additionalProperties": False}
    made = client.responses.create(model=CHAT_MODEL, input="Tell me about cats.", max_output_tokens=60, store=False,
                                   text={"format": {"type": "json_schema", "name": "animal", "schema": schema}})
    jsonschema.validate(json.loads(made.output_text), schema)


@pytest.mark.parametrize(("extra", "field"), [
    ({"store": True}, "store"),
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"conversation": "conv_123"}, "conversation"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"tools": [{"type": "web_search"}]}, "tools.0"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input.0.content.0.type"),
    ({"temperature": 5}, "temperature"),
])
def test_refusals_name_the_field(client, live_server, extra, field):
    body = {"model": CHAT_MODEL, "input": QUESTION, "max_output_tokens": 8, **extra}
    response = httpx.post(f"{live_server.url}/v1/responses", json=body)
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]["message"]
    with pytest.raises(BadRequestError):
        client.responses.create(**body)
