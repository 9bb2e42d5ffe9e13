"""OpenAI's logit_bias, presence_penalty and frequency_penalty, and min_p (vLLM's and llama.cpp's
extension), through the real `openai` client on both engines: each visibly changes the answer the
way its definition says."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
from openai import OpenAI

from tests.conftest import CHAT_ENGINES, TRANSFORMERS_CHAT

ASK = [{"role": "user", "content": "Write the word fish ten times."}]


@pytest.fixture(scope="module")
def client(live_server) -> OpenAI:
    return OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def ids_of(url: str, model: str, text: str) -> list[int]:
    return httpx.post(f"{url}/tokenize", json={"model": model, "prompt": text}, timeout=300).json()["tokens"]


def text_of(url: str, model: str, ids: list[int]) -> str:
    return httpx.post(f"{url}/detokenize", json={"model": model, "tokens": ids}).json()["prompt"]


@pytest.mark.parametrize("model", CHAT_ENGINES)
def test_logit_bias_forces_and_bans_tokens(live_server, client, model):
    url = live_server.url
    forced = ids_of(url, model, " ocean")[-1]
    answer = client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=5,
                                            logit_bias={str(forced): 100})
    assert answer.choices[0].message.content == text_of(url, model, [forced] * 5)

    plain = client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=8)
    first = ids_of(url, model, plain.choices[0].message.content)[0]
    banned = client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=8,
                                            logit_bias={str(first): -100}, logprobs=True)
    assert banned.choices[0].message.content != plain.choices[0].message.content
    # the banned token is never the first one sent (another token may still begin with the same
    # letters: in CI "F" was banned and the answer began with the token "Fi")
    assert banned.choices[0].logprobs.content[0].token != text_of(url, model, [first])


@pytest.mark.parametrize("model", CHAT_ENGINES)
def test_frequency_penalty_makes_repeats_rarer_and_presence_penalty_changes_the_answer(live_server, client, model):
    def most_repeated(**penalties) -> int:
        answer = client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=40,
                                                **penalties)
        return Counter(ids_of(live_server.url, model, answer.choices[0].message.content)).most_common(1)[0][1]

    # llama.cpp's greedy answer depends on what shares its batch and on its cached prompt (its
    # README says so); in one CI run this answer did not repeat the word at all, so on that engine
    # the baseline is the most repetitive of three answers
    free = most_repeated() if model == TRANSFORMERS_CHAT else max(most_repeated() for _ in range(3))
    assert free >= 5  # the model does repeat the word when asked
    assert most_repeated(frequency_penalty=2.0) < free
    # presence lowers every used token by the same amount, so it need not cut the top count (it was
    # seen to raise it); it must still change what greedy decoding picks
    plain = client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=40)
    present = client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=40,
                                             presence_penalty=2.0)
    assert present.choices[0].message.content != plain.choices[0].message.content


def test_min_p_one_keeps_only_the_best_token_whatever_the_seed(client):
    # greedy on transformers is the same whatever shares the batch, so the comparison is exact
    greedy = client.chat.completions.create(model=TRANSFORMERS_CHAT, messages=ASK, temperature=0, max_tokens=16)
    for seed in (1, 2):
        sampled = client.chat.completions.create(model=TRANSFORMERS_CHAT, messages=ASK, temperature=1.5,
                                                 seed=seed, max_tokens=16, extra_body={"min_p": 1.0})
        assert sampled.choices[0].message.content == greedy.choices[0].message.content
    loose = {client.chat.completions.create(model=TRANSFORMERS_CHAT, messages=ASK, temperature=1.5, seed=seed,
                                            max_tokens=16).choices[0].message.content for seed in (1, 2)}
    assert loose != {greedy.choices[0].message.content}  # without it, the same seeds wander


def test_a_logit_bias_id_outside_the_vocabulary_is_refused_by_name(live_server):
    response = httpx.post(f"{live_server.url}/v1/chat/completions", timeout=60, json={
        "messages": ASK, "max_tokens": 2, "logit_bias": {"99999999": 5}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "logit_bias.99999999"


def test_n_choices_differ_reproducibly_and_the_first_is_the_single_answer(client):
    # transformers: a seed reproduces a sampled answer exactly
    ask = dict(model=TRANSFORMERS_CHAT, messages=ASK, temperature=1.2, seed=11, max_tokens=12)
    three = client.chat.completions.create(n=3, **ask)
    texts = [c.message.content for c in sorted(three.choices, key=lambda c: c.index)]
    assert [c.index for c in three.choices] == [0, 1, 2] and len(set(texts)) >= 2
    single = client.chat.completions.create(**ask)
    assert texts[0] == single.choices[0].message.content
    assert three.usage.prompt_tokens == single.usage.prompt_tokens  # one prompt, counted once
    assert [c.message.content for c in client.chat.completions.create(n=3, **ask).choices] == texts
    if all(c.finish_reason == "length" for c in three.choices):
        assert three.usage.completion_tokens == 3 * 12  # every answer counted


@pytest.mark.parametrize("model", CHAT_ENGINES)
def test_n_choices_stream_side_by_side_with_usage(client, model):
    stream = client.chat.completions.create(model=model, messages=ASK, temperature=1.0, n=2, max_tokens=10,
                                            stream=True, stream_options={"include_usage": True})
    texts, finished, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert all(texts.values()) and set(finished) == {0, 1}
    assert usage is not None
    if set(finished.values()) == {"length"}:  # both answers counted
        assert usage.completion_tokens == 2 * 10
    completion = client.completions.create(model=model, prompt="The sea is", n=2, max_tokens=5, temperature=1.0)
    assert sorted(c.index for c in completion.choices) == [0, 1] and all(c.text for c in completion.choices)
