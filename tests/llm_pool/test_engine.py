"""Continuous batching with the real SmolLM2: concurrent greedy answers equal sequential ones,
parameters stay per request inside a batch, cancelling one leaves the others, the prefix cache
gives the same answer as a fresh prefill, and the KV cache stays under its cap."""

from __future__ import annotations

import threading

from llm_pool import (
    Catalog,
    EngineConfig,
    GenerationParams,
    GenerationRequest,
    Message,
    ModelPool,
    TextDelta,
    spec_from_dict,
)
from llm_pool.backends import BackendContext
from tests.conftest import TRANSFORMERS_CHAT

QUESTIONS = ["What is the capital of France?", "Name three colours.",
             "What is two plus two?", "Write one sentence about cats."]


def request(text, **params):
    params.setdefault("temperature", 0)
    params.setdefault("max_new_tokens", 24)
    return GenerationRequest(GenerationParams.validated(**params), messages=[Message("user", text)])


def engine_of(pool):
    pool.load(TRANSFORMERS_CHAT)
    return pool.backend(TRANSFORMERS_CHAT).engine


def test_concurrent_greedy_answers_equal_sequential_ones(pool):
    engine_of(pool).prefix_cache.clear()
    sequential = [pool.submit(TRANSFORMERS_CHAT, request(q)).result(60).text for q in QUESTIONS]
    engine_of(pool).prefix_cache.clear()
    before = engine_of(pool).stats["peak_batch"]
    handles = [pool.submit(TRANSFORMERS_CHAT, request(q)) for q in QUESTIONS]
    concurrent = [h.result(60).text for h in handles]
    assert concurrent == sequential
    assert engine_of(pool).stats["peak_batch"] >= 2 or before >= 2  # they really shared batches


def test_parameters_are_honoured_per_request_inside_a_batch(pool):
    alone_greedy = pool.submit(TRANSFORMERS_CHAT, request(QUESTIONS[0])).result(60).text
    alone_sampled = pool.submit(TRANSFORMERS_CHAT, request(QUESTIONS[1], temperature=1.2, seed=3)).result(60).text
    alone_stopped = pool.submit(TRANSFORMERS_CHAT, request(QUESTIONS[0], stop=["Paris"])).result(60).text
    handles = [pool.submit(TRANSFORMERS_CHAT, request(QUESTIONS[0])),
               pool.submit(TRANSFORMERS_CHAT, request(QUESTIONS[1], temperature=1.2, seed=3)),
               pool.submit(TRANSFORMERS_CHAT, request(QUESTIONS[0], stop=["Paris"])),
               pool.submit(TRANSFORMERS_CHAT, request(QUESTIONS[2], max_new_tokens=3))]
    together = [h.result(60) for h in handles]
    assert together[0].text == alone_greedy
    assert together[1].text == alone_sampled
    assert together[2].text == alone_stopped and "Paris" not in together[2].text
    assert together[3].usage.completion_tokens == 3 and together[3].reason == "length"


def test_cancelling_one_request_leaves_the_others_streaming(pool):
    expected = pool.submit(TRANSFORMERS_CHAT, request(QUESTIONS[3], max_new_tokens=40)).result(60).text
    victim = pool.submit(TRANSFORMERS_CHAT, request("Write a long poem.", max_new_tokens=400))
    others = [pool.submit(TRANSFORMERS_CHAT, request(QUESTIONS[3], max_new_tokens=40)) for _ in range(2)]
    for event in victim:
        if isinstance(event, TextDelta):
            victim.cancel()
            break
    assert victim.result(10).reason == "cancelled"
    results = [h.result(60) for h in others]
    assert [r.text for r in results] == [expected, expected]


def test_next_turn_reuses_the_prefix_cache_and_answers_the_same(pool):
    engine = engine_of(pool)
    opening = request(QUESTIONS[0])
    opening.cache_scope = "user-a"
    first = pool.submit(TRANSFORMERS_CHAT, opening).result(60)
    turn = [Message("user", QUESTIONS[0]), Message("assistant", first.text),
            Message("user", "And what is the capital of Germany?")]
    params = GenerationParams.validated(temperature=0, max_new_tokens=24)
    cached = pool.submit(TRANSFORMERS_CHAT, GenerationRequest(params, messages=turn, cache_scope="user-a")).result(60)
    assert cached.usage.cached_tokens >= 30  # the first turn's prompt was not recomputed
    other = pool.submit(TRANSFORMERS_CHAT, GenerationRequest(params, messages=turn, cache_scope="user-b")).result(60)
    assert other.usage.cached_tokens == 0  # another user's prefix is never reused
    engine.prefix_cache.clear()
    fresh = pool.submit(TRANSFORMERS_CHAT, GenerationRequest(params, messages=turn, cache_scope="user-a")).result(60)
    assert fresh.usage.cached_tokens == 0
    assert cached.text == fresh.text


def test_kv_cache_never_exceeds_its_cap(tiny_model_dir, tmp_path):
    spec = spec_from_dict({"name": "tiny", "version": "1", "source": "local",
                           "location": str(tiny_model_dir)})
    cap = 64 * 1024  # bytes: a handful of rows of this tiny model
    context = BackendContext(cache_dir=tmp_path, device="cpu",
                             engine=EngineConfig(kv_cache_bytes=cap, max_batch_size=16, queue_size=64))
    small = ModelPool(Catalog([spec]), context, budget_bytes=10**9)
    try:
        small.load("tiny")
        engine = small.backend("tiny").engine
        results, lock = [], threading.Lock()

        def client():
            final = small.submit("tiny", request("hello world", max_new_tokens=40)).result(60)
            with lock:
                results.append(final)

        threads = [threading.Thread(target=client) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(results) == 16 and all(r.usage.completion_tokens == 40 for r in results)
        assert 0 < engine.stats["peak_kv_bytes"] <= engine.batch_kv_bytes
        assert engine.stats["peak_batch"] < 16  # the cap, not the batch size, held them back
    finally:
        small.shutdown()


def test_weights_packed_for_the_cpu_answer_like_plain_transformers(pool):
    """The engine runs SmolLM2 with linear weights prepacked for oneDNN (faster per step); its
    greedy answers must be what plain transformers `generate` says for the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm_pool.cpu_linear import PackedLinear, available

    backend = pool.backend(TRANSFORMERS_CHAT)
    packed = [m for m in backend.model.modules() if isinstance(m, PackedLinear)]
    if available():
        assert len(packed) >= 7 * 30  # q, k, v, o, gate, up, down in each of the 30 layers
    plain = AutoModelForCausalLM.from_pretrained(backend._prepared.location, dtype=torch.float32).eval()
    for question in QUESTIONS[:2]:
        req = request(question, max_new_tokens=20)
        ids = backend.prompt_ids(req)
        with torch.inference_mode():
            out = plain.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)
        expected = backend.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        engine_of(pool).prefix_cache.clear()
        assert pool.submit(TRANSFORMERS_CHAT, req).result(60).text == expected
