"""The HTTP API against a real uvicorn server on a loopback port, with the clients people use."""

from __future__ import annotations

import httpx
import pytest
from huggingface_hub import InferenceClient
from openai import APIStatusError, BadRequestError, OpenAI

from tests.conftest import CHAT_MODEL

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def client(live_server):
    return OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)


def test_openai_client_chat_completion(client):
    reply = client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, temperature=0,
                                           max_tokens=40)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 10


def test_openai_client_streams_the_same_text(client):
    whole = client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, temperature=0,
                                           max_tokens=40).choices[0].message.content
    chunks = list(client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, temperature=0,
                                                 max_tokens=40, stream=True,
                                                 stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole
    assert sum(1 for p in pieces if p) >= 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 0


def test_openai_completions_endpoint(client):
    reply = client.completions.create(model=CHAT_MODEL, prompt="One, two, three,", max_tokens=8,
                                      temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 8


def test_tgi_client_streams_tokens(live_server):
    tgi = InferenceClient(base_url=live_server.url)
    tokens = list(tgi.text_generation("The capital of France is", max_new_tokens=8, stream=True))
    assert len(tokens) == 8
    full = tgi.text_generation("The capital of France is", max_new_tokens=8)
    assert "".join(tokens) == full


def test_errors_are_clear_and_typed(client, live_server):
    with pytest.raises(APIStatusError) as info:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert info.value.status_code == 404 and "no-such-model" in str(info.value)
    with pytest.raises(BadRequestError) as info:  # a 400, as OpenAI answers (the SDK's own class)
        client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, temperature=9)
    assert info.value.status_code == 400 and "temperature" in str(info.value)
    bad = httpx.post(f"{live_server.url}/v1/chat/completions", content=b"{not json",
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]


def test_health_and_models(live_server):
    assert httpx.get(f"{live_server.url}/health").json()["status"] == "ok"
    ready = httpx.get(f"{live_server.url}/health/ready")
    assert ready.status_code == 200 and ready.json()["models"][CHAT_MODEL]["state"] == "ready"
    models = httpx.get(f"{live_server.url}/v1/models").json()["data"]
    names = {m["id"]: m for m in models}
    assert names[CHAT_MODEL]["state"] == "ready" and names[CHAT_MODEL]["parameters"] > 100_000_000
    assert names["gemma3-270m"]["kind"] == "completion"
