"""Nothing one user sends can be inferred by another through the shared prefix cache: reuse is
scoped to the user (or an explicit cache_salt group), so `cached_tokens` and the time to first
token say nothing about anyone else's prompts."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.conftest import CHAT_ENGINES
from tests.security.conftest import ADMIN, ALICE, BOB, bearer

STORY = "Please remember it and then tell me a very short story about a fish who lives in a lake."


@pytest.fixture(params=CHAT_ENGINES)
def model(request, pool) -> str:
    """Every isolation test runs on both engines (llama.cpp keeps its slots per scope). Loaded here:
    a stranger's request names a version that is not the one served only once an admin loaded it."""
    pool.load(request.param)
    return request.param


def cached(server, text: str, headers: dict | None = None, **extra) -> int:
    response = httpx.post(f"{server.url}/v1/chat/completions", headers=headers or {}, timeout=120, json={
        "messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0, **extra})
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_another_users_probes_get_nothing_from_the_cache(keyed_server_2, model):
    """The finding, replayed: after one user sent a PIN, another user's probes of its digits got
    cached_tokens 29 / 33 / 31, leaking the digits one by one."""
    tag = uuid.uuid4().hex[:6]  # a prompt no earlier test sent
    secret = f"[{tag}] My bank PIN is 4921. {STORY}"
    cached(keyed_server_2, secret, bearer(ALICE), model=model)
    # Each guess as another user's first look (later guesses of one user reuse that user's own
    # earlier probes, which tells them only what they sent themselves).
    # A prober may reuse only its own earlier prompts: at most the chat template's opening (the
    # same for every chat, before the tag), measured as what its own unrelated chat reuses.
    probes, opening = [], []
    for guess, key in (("4921", BOB), ("1111", ADMIN)):
        cached(keyed_server_2, f"[{uuid.uuid4().hex[:6]}] Hello.", bearer(key), model=model)
        opening.append(cached(keyed_server_2, f"[{uuid.uuid4().hex[:6]}] Hi.", bearer(key), model=model))
        probes.append(cached(keyed_server_2, f"[{tag}] My bank PIN is {guess}. {STORY}", bearer(key), model=model))
    # Reaching the PIN would reuse the whole tag and "My bank PIN is" (10+ tokens) past that
    # opening; the prober's own earlier prompts ("[" and random hex) may share the tag's first
    # token or two by chance, which tells it nothing.
    assert all(probe <= own + 2 for probe, own in zip(probes, opening)), (probes, opening)
    # the owner's own next request still reuses it
    assert cached(keyed_server_2, secret, bearer(ALICE), model=model) > 20


def test_anonymous_callers_share_nothing_unless_they_agree_on_a_salt(public_server, model):
    tag = uuid.uuid4().hex[:6]
    text = f"[{tag}] My bank PIN is 4921. {STORY}"
    assert cached(public_server, text, model=model) == 0
    assert cached(public_server, text, model=model) == 0  # strangers with keys off are never the same user
    salt = uuid.uuid4().hex
    assert cached(public_server, text, cache_salt=salt, model=model) == 0
    assert cached(public_server, text, cache_salt=salt, model=model) > 20  # an explicit shared salt is a shared cache
    assert cached(public_server, text, cache_salt=salt + "x", model=model) == 0


def test_key_holders_do_not_share_a_cache_with_strangers_either(keyed_server_2, model):
    tag = uuid.uuid4().hex[:6]
    text = f"[{tag}] Our launch code is 7-7-3. {STORY}"
    cached(keyed_server_2, text, bearer(ALICE), model=model)
    assert cached(keyed_server_2, text, bearer(BOB), cache_salt="guess", model=model) == 0


def test_one_users_extreme_sampling_values_do_not_fail_anyone_elses_stream(pool, model):
    """Found by the fuzzing run: temperature 1e-30 made the sampler divide into nan, which failed
    every request sharing that batch step. Such values now mean greedy, and the neighbour finishes."""
    from llm_pool import GenerationParams, GenerationRequest, Message

    def request(**params):
        return GenerationRequest(GenerationParams.validated(max_new_tokens=6, **params),
                                 messages=[Message("user", "Name a fish.")])

    neighbour = pool.submit(model, request(temperature=0.8, seed=3))
    extreme = [pool.submit(model, request(temperature=t, top_p=0.5, seed=1)) for t in (1e-30, 1e-300)]
    penalty = pool.submit(model, request(temperature=0.7, repetition_penalty=1e-300, top_p=1e-300))
    greedy = pool.submit(model, request(temperature=0)).result(120)
    assert neighbour.result(120).reason in ("stop", "length")
    results = [h.result(120) for h in extreme]
    assert all(r.reason in ("stop", "length") and r.text for r in results)
    if model.endswith("transformers"):
        # Such a temperature is the argmax. Only transformers reproduces greedy text exactly in a
        # batch: llama.cpp's shared KV changes the sums with the batch's make-up (see the README).
        assert [r.text for r in results] == [greedy.text, greedy.text]
    assert penalty.result(120).reason in ("stop", "length")
