"""Bad input anywhere gets a 4xx with a message, never a 500 and never a hung stream; plus a
property-based run of schemathesis over the whole OpenAPI spec (with the tiny model, so that
generated requests for thousands of tokens stay quick)."""

from __future__ import annotations

import httpx
import pytest

from llm_pool import Catalog, EngineConfig, ModelPool, spec_from_dict
from llm_pool.backends import BackendContext
from service import build_services
from tests.conftest import CHAT_MODEL, make_settings, serve

BAD = [
    ("POST", "/v1/chat/completions", b"{not json", 400),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400),
    ("POST", "/v1/chat/completions", b'{"messages": "hi"}', 400),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}', 400),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "model": "nope"}', 404),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "seed": 1e30}', 400),
    ("POST", "/v1/completions", b'{"prompt": ""}', 400),
    ("POST", "/v1/completions", b'{"prompt": ["a", "b"]}', 400),
    ("POST", "/v1/completions", b'{"prompt": 42}', 400),
    ("POST", "/generate", b'{"inputs": ""}', 422),
    ("POST", "/generate", b'{"inputs": "x", "parameters": {"temperature": 0}}', 422),
    ("POST", "/generate_stream", b'{"inputs": "x", "parameters": {"top_p": 2}}', 422),
    ("POST", "/", b'{"nothing": true}', 422),
    ("POST", "/v1/batch", b'{"items": []}', 400),
    ("POST", "/v1/batch", b'{"items": [{"prompt": "a", "messages": []}]}', 400),
    ("POST", "/v1/models", b'{"name": "../../x", "version": "1", "source": "local", "location": "/x"}', 400),
    ("POST", "/v1/models/smollm2-135m/swap", b'{"version": "nope"}', 404),
    ("POST", "/v1/models/nope/load", b"", 404),
    ("GET", "/v1/models/%00%01", None, 404),
    ("GET", "/v1/sessions/%0A%0D", None, 404),
    ("GET", "/v1/sessions/..%2F..%2Fetc%2Fpasswd", None, 404),
    ("PATCH", "/v1/sessions/" + "a" * 32, b'{"title": "x"}', 404),
    ("POST", "/v1/sessions", b'{"context_policy": {"max_history_messages": -1}}', 400),
    ("DELETE", "/v1/sessions", None, 400),
]


@pytest.mark.parametrize("method, path, body, status", BAD)
def test_bad_requests_get_a_clear_4xx(live_server, method, path, body, status):
    response = httpx.request(method, f"{live_server.url}{path}", content=body,
                             headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == status, (path, response.status_code, response.text[:300])
    payload = response.json()
    assert (payload.get("error") or {}).get("message") or payload.get("detail")  # Gradio's 404s say "detail"


def test_oversized_bodies_are_413_before_they_are_read(live_server, services):
    limit = int(services.settings.max_upload_mb * 1e6) + 1_000_000
    response = httpx.post(f"{live_server.url}/v1/chat/completions", content=b"x" * (limit + 10),
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413 and "larger than" in response.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(limit // 1_000_000 + 2):
            yield b"x" * 1_000_000

    streamed = httpx.post(f"{live_server.url}/v1/completions", content=chunks(),
                          headers={"content-type": "application/json"}, timeout=60)
    assert streamed.status_code == 413


def test_a_stream_with_a_bad_request_never_hangs(live_server):
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "word " * 9000}], "stream": True}
    response = httpx.post(f"{live_server.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400  # refused before the stream starts


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, embedder):
    """Everything real but the model: a tiny random-weight Llama with a 512-token window."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("fuzz-model")
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<pad>", "<eos>", "<unk>", "<bos>"] + [f"w{i}" for i in range(40)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>",
                                        unk_token="<unk>", bos_token="<bos>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(folder)
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                 eos_token_id=1, pad_token_id=0, bos_token_id=3)).save_pretrained(folder)
    spec = spec_from_dict({"name": "smollm2-135m", "version": "fuzz", "source": "local", "location": str(folder)})
    pool = ModelPool(Catalog([spec]), BackendContext(cache_dir=folder, device="cpu",
                                                     engine=EngineConfig(kv_cache_bytes=8 * 2**20)), 10**9)
    pool.load("smollm2-135m")
    root = tmp_path_factory.mktemp("fuzz")
    server = serve(build_services(make_settings(root, max_upload_mb=1), pool=pool, embedder=embedder), with_ui=False)
    yield server
    server.stop()
    pool.shutdown()


def test_property_based_run_over_the_openapi_spec_finds_no_server_error(fuzz_server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    failures, calls = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def run(case):
            nonlocal calls
            calls += 1
            body = case.body if isinstance(case.body, dict) else {}
            if body.get("stream") and isinstance(body.get("stream_delay_ms"), int) and body["stream_delay_ms"] > 50:
                body["stream_delay_ms"] = 50  # a paced stream is slow by request, not hung; keep the run short
            response = case.call(timeout=60)
            if response.status_code >= 500:
                failures.append((case.method, case.path, response.status_code, response.text[:200]))

        run()
    assert calls > 200  # every operation was exercised
    assert not failures, failures[:5]
