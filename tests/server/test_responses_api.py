"""OpenAI's Responses API through the real `openai` SDK against a real server on loopback, on both
engines: a response and its stream (the SDK's own event handling and final response), a
function-tool round trip with the call and its output sent back as input items, `text.format`
validated with jsonschema, stored conversations (`previous_response_id` across a restart, a
branch, `conversation`, the chat in the sessions API, other users and strangers refused), and
refusals naming the field."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from openai import AuthenticationError, BadRequestError, NotFoundError, OpenAI

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
    ({"background": True}, "background"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"tools": [{"type": "web_search"}]}, "tools.0"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input.0.content.0.type"),
    ({"temperature": 5}, "temperature"),
    ({"tool_choice": {"type": "function", "name": "no such name!"}, "tools": [WEATHER]}, "tool_choice"),
    ({"input": [{"type": "function_call_output", "call_id": "c" * 300, "output": "x"}]}, "input"),
])
def test_refusals_name_the_field(client, live_server, extra, field):
    body = {"model": CHAT_MODEL, "input": QUESTION, "max_output_tokens": 8, **extra}
    response = httpx.post(f"{live_server.url}/v1/responses", json=body)
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]["message"]
    with pytest.raises(BadRequestError):
        client.responses.create(**body)


def test_a_stored_conversation_continues_across_a_restart_and_branches(own_server):
    def client() -> OpenAI:
        return OpenAI(base_url=f"{own_server['server'].url}/v1", api_key="unused", max_retries=0, timeout=180)

    greedy = {"model": CHAT_MODEL, "temperature": 0, "max_output_tokens": 16}
    first = client().responses.create(input="My name is Ada. Say hello.", **greedy)  # store: OpenAI's default
    assert first.store is True and first.conversation.id
    chat = first.conversation.id

    own_server["stop"]()
    own_server["start"]()  # a new process's services on the same data dir
    second = client().responses.create(input="What is my name?", previous_response_id=first.id, **greedy)
    assert second.conversation.id == chat and second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens  # the history was read
    assert client().responses.retrieve(first.id).output_text == first.output_text

    stored = httpx.get(f"{own_server['server'].url}/v1/sessions/{chat}").json()  # an ordinary chat of this user
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant", "user", "assistant"]
    assert stored["messages"][2]["content"] == "What is my name?"

    branch = client().responses.create(input="What is my surname?", previous_response_id=first.id, **greedy)
    assert branch.conversation.id != chat  # the chat had moved on: a branch from the first answer
    branched = httpx.get(f"{own_server['server'].url}/v1/sessions/{branch.conversation.id}").json()["messages"]
    assert [m["content"] for m in branched[::2]] == ["My name is Ada. Say hello.", "What is my surname?"]

    third = client().responses.create(input="Thanks.", conversation=chat, **greedy)
    assert third.conversation.id == chat
    assert len(httpx.get(f"{own_server['server'].url}/v1/sessions/{chat}").json()["messages"]) == 6

    listed = client().responses.input_items.list(second.id, order="asc")  # what was sent, as items
    assert [(i.type, i.role, i.content[0].text) for i in listed.data] == [("message", "user", "What is my name?")]
    assert listed.data[0].id.startswith("msg_") and listed.has_more is False

    client().responses.delete(second.id)
    with pytest.raises(NotFoundError):
        client().responses.retrieve(second.id)


def test_stored_responses_belong_to_their_user(pool, embedder, tmp_path):
    from service import build_services
    from tests.conftest import make_settings, serve
    server = serve(build_services(make_settings(tmp_path / "keys", api_keys=["sk-ann", "sk-bob"]), pool=pool,
                                  embedder=embedder))
    public = serve(build_services(make_settings(tmp_path / "open", trust_loopback=False), pool=pool,
                                  embedder=embedder))
    try:
        ann, bob = (OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=180)
                    for key in ("sk-ann", "sk-bob"))
        made = ann.responses.create(model=CHAT_MODEL, input="Hello", max_output_tokens=4)
        assert made.store is True and ann.responses.retrieve(made.id).id == made.id
        with pytest.raises(NotFoundError):
            bob.responses.retrieve(made.id)
        with pytest.raises(NotFoundError):  # nor continue it: as if it did not exist
            bob.responses.create(model=CHAT_MODEL, input="Hi", previous_response_id=made.id, max_output_tokens=4)
        with pytest.raises(NotFoundError):
            bob.responses.delete(made.id)
        with pytest.raises(NotFoundError):
            bob.responses.input_items.list(made.id)
        assert [i.content[0].text for i in ann.responses.input_items.list(made.id).data] == ["Hello"]
        assert ann.responses.retrieve(made.id).id == made.id

        stranger = OpenAI(base_url=f"{public.url}/v1", api_key="unused", max_retries=0, timeout=180)
        answered = stranger.responses.create(model=CHAT_MODEL, input="Hello", max_output_tokens=4)
        assert answered.store is False and answered.conversation is None  # nobody to keep it for: said so
        with pytest.raises(AuthenticationError):  # asking to keep it needs an identity, as sessions do
            stranger.responses.create(model=CHAT_MODEL, input="Hello", max_output_tokens=4, store=True)
        with pytest.raises(NotFoundError):  # and a stranger has no stored responses to read or delete
            stranger.responses.retrieve(answered.id)
        with pytest.raises(NotFoundError):
            stranger.responses.delete(answered.id)
        with pytest.raises(BadRequestError):  # nothing runs in the background, so nothing to cancel
            stranger.responses.cancel(answered.id)
    finally:
        server.stop()
        public.stop()
