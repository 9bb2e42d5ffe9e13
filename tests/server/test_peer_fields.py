"""Fields another server's test suite asks for (issue 26: llama.cpp's tools/server/tests pointed at
Shoal), on both engines through a real server: llama.cpp's GBNF `grammar` (enforced while
decoding), vLLM's `add_generation_prompt` / `continue_final_message`, and llama.cpp's
`/tokenize` `with_pieces`. (Token-id input to /v1/embeddings is tested in test_embeddings.py.)"""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from tests.conftest import CHAT_ENGINES

YES_NO = 'root ::= ("yes" | "no")'
FRANCE = [{"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "The capital of France is"}]


@pytest.fixture(scope="module")
def client(live_server) -> OpenAI:
    return OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0, timeout=180)


def post(live_server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{live_server.url}{path}", json=body, timeout=180)


# --------------------------------------------------------------------------- grammar
@pytest.mark.parametrize("model", CHAT_ENGINES)
def test_a_gbnf_grammar_is_enforced_while_decoding(client, model):
    """Sampled hot, four times, the answer is still exactly a sentence of the grammar."""
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Is the sky green? Answer yes or no."}],
        max_tokens=8, temperature=1.5, seed=7, n=4, extra_body={"grammar": YES_NO})
    assert {c.message.content for c in chat.choices} <= {"yes", "no"}
    assert all(c.finish_reason == "stop" for c in chat.choices)
    completion = client.completions.create(
        model=model, prompt="Question: is water wet?\nAnswer:", max_tokens=8, temperature=1.5, seed=7, n=4,
        extra_body={"grammar": 'root ::= " " ("yes" | "no") "."'})
    assert {c.text for c in completion.choices} <= {" yes.", " no."}


@pytest.mark.parametrize("model", CHAT_ENGINES)
@pytest.mark.parametrize("grammar", ['root ::= ("yes" | ', "root ::= answer", 'answer ::= "yes"', ""])
def test_a_broken_grammar_is_refused_by_name(live_server, model, grammar):
    chat = post(live_server, "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "grammar": grammar})
    completion = post(live_server, "/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 4,
                                                        "grammar": grammar})
    for response in (chat, completion):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "grammar"


@pytest.mark.parametrize("extra", [
    {"response_format": {"type": "json_object"}},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
])
def test_grammar_with_another_constraint_is_refused(live_server, extra):
    response = post(live_server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "grammar": YES_NO, **extra})
    assert response.status_code == 400 and response.json()["error"]["param"] == "grammar"


# --------------------------------------------------------------------------- continuing a message
def tokens(live_server, model: str, **flags) -> list[int]:
    return post(live_server, "/tokenize", {"model": model, "messages": FRANCE, **flags}).json()["tokens"]


def detokenize(live_server, model: str, ids: list[int]) -> str:
    return post(live_server, "/detokenize", {"model": model, "tokens": ids}).json()["content"]


@pytest.mark.parametrize("model", CHAT_ENGINES)
def test_continue_final_message_continues_the_assistants_text(live_server, client, model):
    continued = client.chat.completions.create(
        model=model, messages=FRANCE, max_tokens=12, temperature=0,
        extra_body={"add_generation_prompt": False, "continue_final_message": True})
    text = continued.choices[0].message.content
    assert text and not text.lstrip().startswith("The capital"), text  # the reply is only the continuation
    assert "Paris" in text, text
    # the prompts, as /tokenize and usage count them: left open < closed < closed + a new turn
    opened = tokens(live_server, model, add_generation_prompt=False, continue_final_message=True)
    closed = tokens(live_server, model, add_generation_prompt=False)
    fresh = tokens(live_server, model)
    assert continued.usage.prompt_tokens == len(opened)
    assert closed[:len(opened)] == opened and fresh[:len(closed)] == closed
    assert detokenize(live_server, model, opened).endswith("<|im_start|>assistant\nThe capital of France is")
    assert detokenize(live_server, model, closed[len(opened):]) == "<|im_end|>\n"
    assert detokenize(live_server, model, fresh[len(closed):]) == "<|im_start|>assistant\n"
    for flags, count in (({"add_generation_prompt": False}, len(closed)), ({}, len(fresh))):
        answer = client.chat.completions.create(model=model, messages=FRANCE, max_tokens=1, extra_body=flags)
        assert answer.usage.prompt_tokens == count


@pytest.mark.parametrize("model", CHAT_ENGINES)
@pytest.mark.parametrize("messages, flags", [
    (FRANCE, {"continue_final_message": True}),  # add_generation_prompt is true by default
    (FRANCE, {"continue_final_message": True, "add_generation_prompt": True}),
    (FRANCE[:1], {"continue_final_message": True, "add_generation_prompt": False}),
])
def test_continuing_needs_an_assistant_message_and_no_new_turn(live_server, model, messages, flags):
    response = post(live_server, "/v1/chat/completions", {"model": model, "messages": messages,
                                                          "max_tokens": 2, **flags})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "continue_final_message"


# --------------------------------------------------------------------------- token pieces
@pytest.mark.parametrize("model", CHAT_ENGINES)
def test_tokenize_with_pieces_gives_each_tokens_text_or_bytes(live_server, model):
    text = "Héllo 🐟"
    plain = post(live_server, "/tokenize", {"model": model, "content": text}).json()
    pieces = post(live_server, "/tokenize", {"model": model, "content": text, "with_pieces": True}).json()
    assert [t["id"] for t in pieces["tokens"]] == plain["tokens"] and pieces["count"] == plain["count"]
    # the fish's four UTF-8 bytes are split across three tokens: those pieces are byte values
    assert [t["piece"] for t in pieces["tokens"]][-6:] == ["H", "é", "llo", [32, 240, 159], [144], [159]]
    raw = b"".join(bytes(p) if isinstance(p, list) else p.encode() for p in (t["piece"] for t in pieces["tokens"]))
    assert raw.decode().endswith(text)
    chat = post(live_server, "/tokenize", {"model": model, "messages": FRANCE[:1], "with_pieces": True}).json()
    assert chat["tokens"][0]["piece"] == "<|im_start|>"  # special tokens as their text
    assert "".join(t["piece"] for t in chat["tokens"]).endswith("<|im_start|>assistant\n")
