"""Generation with the real SmolLM2-135M-Instruct (and Gemma 3 270M for completion): streaming,
stop sequences, seeds, cancellation, parameter validation, context limits. Each runs on both
engines: llama.cpp (the default version on a CPU) and transformers."""

from __future__ import annotations

import time

import pytest

from llm_pool import (
    ContextOverflowError,
    Finished,
    GenerationParams,
    GenerationRequest,
    InvalidParamsError,
    InvalidRequestError,
    Message,
    TextDelta,
)
from tests.conftest import BASE_ENGINES, CHAT_ENGINES, LLAMA_CHAT


@pytest.fixture(scope="module", params=CHAT_ENGINES)
def model(request) -> str:
    return request.param


def chat(pool, text, model, **params):
    params.setdefault("temperature", 0)
    request = GenerationRequest(GenerationParams.validated(**params), messages=[Message("user", text)])
    return pool.submit(model, request)


def test_chat_reply_streams_token_by_token_and_is_right(pool, model):
    handle = chat(pool, "What is the capital of France? Answer in one word.", model, max_new_tokens=40)
    events = list(handle)
    deltas = [e for e in events if isinstance(e, TextDelta)]
    final = events[-1]
    assert isinstance(final, Finished) and final.reason == "stop"
    assert len(deltas) >= 3  # streamed, not delivered at the end
    assert "".join(d.text for d in deltas) == final.text
    assert "Paris" in final.text
    assert final.usage.completion_tokens == sum(d.tokens for d in deltas) + 1  # + the EOS token
    assert final.ttft is not None and final.ttft < final.duration


def test_stop_sequence_cuts_the_text_before_it(pool, model):
    full = chat(pool, "What is the capital of France? Answer in one word.", model, max_new_tokens=40).result(60).text
    assert "Paris" in full
    cut = chat(pool, "What is the capital of France? Answer in one word.", model, max_new_tokens=40,
               stop=["Paris"]).result(60)
    assert cut.reason == "stop" and cut.stopped_by == "stop_sequence"
    assert cut.text == full[: full.index("Paris")]


def test_length_limit_and_sampling_seed(pool, model):
    first = chat(pool, "Tell me a story.", model, temperature=1.0, seed=7, max_new_tokens=16).result(60)
    again = chat(pool, "Tell me a story.", model, temperature=1.0, seed=7, max_new_tokens=16).result(60)
    other = chat(pool, "Tell me a story.", model, temperature=1.0, seed=8, max_new_tokens=16).result(60)
    assert first.reason == "length" and first.usage.completion_tokens == 16
    assert first.text != other.text  # the seed reaches the sampler on both engines
    if model != LLAMA_CHAT:
        # Exact on transformers. llama.cpp reproduces a seed on a best-effort basis only (as OpenAI
        # documents for theirs): its attention sums over the shared KV cells in an order that
        # depends on where they lie, so a sampled answer can drift (seen in a full-suite run).
        assert first.text == again.text


def test_cancel_stops_generation_within_a_second(pool, model):
    handle = chat(pool, "Write a very long essay about the ocean.", model, max_new_tokens=2000)
    for event in handle:
        if isinstance(event, TextDelta):
            break
    cancelled_at = time.monotonic()
    handle.cancel()
    final = handle.result(5)
    assert final.reason == "cancelled"
    assert time.monotonic() - cancelled_at < 1.0
    assert final.usage.completion_tokens < 200
    deadline = time.monotonic() + 2
    while pool.status(model)["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pool.status(model)["in_flight"] == 0  # the slot is free again


@pytest.mark.parametrize("params, field", [
    ({"temperature": 5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 1.5}, "max_new_tokens"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"seed": -3}, "seed"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"banana": 1}, "banana"),
])
def test_bad_parameters_name_the_field(params, field):
    with pytest.raises(InvalidParamsError) as info:
        GenerationParams.validated(**params)
    assert info.value.param == field and field in info.value.message


def test_prompt_longer_than_the_context_is_rejected_with_the_numbers(pool, model):
    long_text = "word " * 9000
    with pytest.raises(ContextOverflowError) as info:
        chat(pool, long_text, model, max_new_tokens=10)
    error = info.value
    assert error.prompt_tokens > 8192 and error.context_length == 8192
    assert str(error.prompt_tokens) in error.message and "8192" in error.message
    with pytest.raises(ContextOverflowError):  # fits alone, but not with the tokens asked for
        chat(pool, "word " * 8000, model, max_new_tokens=1000)


def test_empty_prompt_and_empty_messages_are_refused(pool, model):
    with pytest.raises(InvalidParamsError, match="prompt"):
        pool.submit(model, GenerationRequest(GenerationParams(), prompt=""))
    with pytest.raises(InvalidParamsError, match="messages"):
        pool.submit(model, GenerationRequest(GenerationParams(), messages=[]))


def test_repetition_penalty_changes_a_greedy_answer(pool, model):
    plain = chat(pool, "List the days of the week.", model, max_new_tokens=30).result(60).text
    penalised = chat(pool, "List the days of the week.", model, max_new_tokens=30,
                     repetition_penalty=1.8).result(60).text
    assert plain != penalised


@pytest.fixture(scope="module", params=BASE_ENGINES)
def gemma(pool, request):
    pool.load(request.param)
    yield request.param
    pool.unload(request.param)


def test_base_model_completes_raw_text_and_refuses_chat(pool, gemma):
    params = GenerationParams.validated(temperature=0, max_new_tokens=12)
    final = pool.submit(gemma, GenerationRequest(params, prompt="The capital of France is")).result(120)
    assert final.reason == "length" and final.usage.completion_tokens == 12
    assert "Paris" in final.text or "France" in final.text
    with pytest.raises(InvalidRequestError, match="completion model"):
        chat(pool, "hello", gemma)
