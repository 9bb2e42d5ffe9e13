"""Embeddings from the pool's embedding model (all-MiniLM-L6-v2, shipped offline) through the real
`openai` client (which asks for base64 by default) and Ollama's /api/embed shape."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from openai import OpenAI

TEXTS = ["A cat sat on the mat.", "A kitten was sitting on a rug.", "Stock markets fell sharply today."]


@pytest.fixture(scope="module")
def client(live_server) -> OpenAI:
    return OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_gets_unit_vectors_that_rank_meaning(client, embedder):
    result = client.embeddings.create(model="all-minilm-l6-v2", input=TEXTS)  # base64 on the wire
    vectors = np.array([d.embedding for d in sorted(result.data, key=lambda d: d.index)])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    cat, kitten, stocks = vectors
    assert cat @ kitten > cat @ stocks + 0.2
    assert result.usage.prompt_tokens > 3 * 5
    # the same model the retrieval memory uses: the same vectors
    assert np.allclose(vectors, embedder.embed(TEXTS), atol=1e-4)
    floats = client.embeddings.create(model="all-minilm-l6-v2", input=TEXTS[0], encoding_format="float")
    assert np.allclose(floats.data[0].embedding, cat, atol=1e-6)


def test_a_request_naming_no_model_gets_the_catalogs_embedding_model(live_server, client):
    named = client.embeddings.create(model="all-minilm-l6-v2", input=TEXTS[0], encoding_format="float")
    default = httpx.post(f"{live_server.url}/v1/embeddings", json={"input": TEXTS[0]}, timeout=60).json()
    assert default["model"].startswith("all-minilm-l6-v2")
    assert np.allclose(default["data"][0]["embedding"], named.data[0].embedding, atol=1e-5)


def test_ollama_embed_shape(live_server):
    answer = httpx.post(f"{live_server.url}/api/embed", json={"model": "all-minilm-l6-v2", "input": TEXTS[:2]},
                        timeout=60).json()
    assert len(answer["embeddings"]) == 2 and len(answer["embeddings"][0]) == 384
    assert answer["prompt_eval_count"] > 0


@pytest.mark.parametrize("body, field", [
    ({"input": " ".join(["word"] * 2000)}, "input.0"),  # longer than the model reads: refused, not cut
    ({"input": [[101, 2, 30522]]}, "input.0"),  # a token id past the vocabulary (30522 ids)
    ({"input": [101, -1, 102]}, "input"),  # one text as token ids
    ({"input": [[101, 102], []]}, "input.1"),
    ({"input": "hi", "dimensions": 128}, "dimensions"),
    ({"input": "hi", "model": "smollm2-135m"}, "model"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
])
def test_bad_embedding_requests_are_refused_by_name(live_server, body, field):
    response = httpx.post(f"{live_server.url}/v1/embeddings", json=body, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["param"] == field


@pytest.mark.parametrize("model", ["all-minilm-l6-v2",  # on llama.cpp where it is built
                                   "smollm2-135m-embed"])  # on sentence-transformers (mean-pooled)
def test_token_ids_embed_as_their_text(live_server, pool, model):
    """OpenAI's token-id input: the ids of a text from the model's own tokenizer (/tokenize) give the
    text's vector, as one text (a list of ints) or several (a list of lists)."""
    url = f"{live_server.url}/v1/embeddings"
    ids = [httpx.post(f"{live_server.url}/tokenize", json={"model": model, "prompt": text}, timeout=120).json()
           ["tokens"] for text in TEXTS]
    by_text = httpx.post(url, json={"model": model, "input": TEXTS, "encoding_format": "float"}, timeout=120).json()
    by_ids = httpx.post(url, json={"model": model, "input": ids, "encoding_format": "float"}, timeout=120).json()
    one = httpx.post(url, json={"model": model, "input": ids[1], "encoding_format": "float"}, timeout=120).json()
    texts, tokens = (np.array([d["embedding"] for d in answer["data"]]) for answer in (by_text, by_ids))
    assert tokens.shape == texts.shape and (np.sum(texts * tokens, axis=1) > 0.999).all()
    assert np.dot(one["data"][0]["embedding"], texts[1]) > 0.999
    assert by_ids["usage"]["prompt_tokens"] == by_text["usage"]["prompt_tokens"] == sum(len(i) for i in ids)
    wrong = httpx.post(url, json={"model": model, "input": [ids[0], [10**7]]}, timeout=120)
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "input.1"
    if model == "smollm2-135m-embed":
        assert pool.status(model)["engine"] == "sentence-transformers"
        pool.unload(model)


def test_the_embedding_model_lives_in_the_pool_like_any_model(live_server, client, pool):
    client.embeddings.create(model="all-minilm-l6-v2", input="warm")
    listed = {m["id"]: m for m in httpx.get(f"{live_server.url}/v1/models").json()["data"]}
    assert listed["all-minilm-l6-v2"]["kind"] == "embedding" and listed["all-minilm-l6-v2"]["state"] == "ready"
    chat = httpx.post(f"{live_server.url}/v1/chat/completions", timeout=60, json={
        "model": "all-minilm-l6-v2", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "model"
    pool.unload("all-minilm-l6-v2")
    assert pool.status("all-minilm-l6-v2")["state"] == "unloaded"
    again = client.embeddings.create(model="all-minilm-l6-v2", input="loads again on demand")
    assert len(again.data[0].embedding) == 384


def test_rerank_puts_the_relevant_document_first(live_server):
    documents = ["The stock market fell sharply today.", "Kittens love to sleep on warm rugs.",
                 "A recipe for tomato soup."]
    answer = httpx.post(f"{live_server.url}/v1/rerank", timeout=60, json={
        "model": "all-minilm-l6-v2", "query": "Where do cats like to nap?", "documents": documents,
        "top_n": 2, "return_documents": True}).json()
    results = answer["results"]
    assert len(results) == 2 and results[0]["index"] == 1 and results[0]["document"]["text"] == documents[1]
    assert results[0]["relevance_score"] > results[1]["relevance_score"]
    too_long = httpx.post(f"{live_server.url}/rerank", timeout=60, json={
        "query": "cats", "documents": ["fine", " ".join(["word"] * 2000)]})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "documents.1"


def test_a_causal_model_in_the_catalog_embeds_mean_pooled(client, pool):
    """models.toml names SmolLM2's GGUF as an embedding model: its vectors are the mean of the
    model's last hidden states over each text's tokens, normalized, computed here independently."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from llm_pool.sources import prepare
    from tests.conftest import MODEL_CACHE

    result = client.embeddings.create(model="smollm2-135m-embed", input=TEXTS, encoding_format="float")
    vectors = np.array([d.embedding for d in sorted(result.data, key=lambda d: d.index)])
    assert vectors.shape == (3, 576) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    cat, kitten, stocks = vectors
    assert cat @ kitten > cat @ stocks

    folder = prepare(pool.spec("smollm2-135m-embed"), MODEL_CACHE, lambda *_: None).location
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder)
    for text, vector in zip(TEXTS, vectors):
        with torch.no_grad():
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
        mean = hidden.mean(0).numpy()
        assert np.allclose(vector, mean / np.linalg.norm(mean), atol=1e-4)
    pool.unload("smollm2-135m-embed")


def test_the_llama_cpp_model_gives_sentence_transformers_vectors(embedder):
    """Where llama.cpp is built, all-MiniLM-L6-v2 runs there (converted to q8_0): its vectors are
    sentence-transformers' to within rounding, also for a text cut at the model's 256 tokens, so
    passages indexed by either engine are found by questions embedded with the other."""
    from memory.embeddings import Embedder
    texts = [*TEXTS, "def add(x):\n    return x + 1  # one more", "Ünïcödé — 🐟", "word " * 400]
    reference = Embedder().embed(texts)
    assert (np.sum(reference * embedder.embed(texts), axis=1) > 0.999).all()
