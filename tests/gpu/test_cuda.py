"""The CUDA path, on a machine with an NVIDIA GPU (skipped elsewhere): a model in the pool runs
on the GPU in bfloat16, concurrent requests share its batches, `engine = "auto"` keeps GGUF
models on transformers there, and bitsandbytes quantization is either used or refused by name."""

from __future__ import annotations

import pytest
import torch

from llm_pool import Catalog, EngineConfig, GenerationParams, GenerationRequest, Message, ModelPool, spec_from_dict
from llm_pool.backends import BackendContext, engine_for
from llm_pool.errors import ModelLoadError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pool_for(folder, tmp_path, **extra) -> ModelPool:
    spec = spec_from_dict({"name": "tiny", "version": "1", "source": "local", "location": str(folder), **extra})
    context = BackendContext(cache_dir=tmp_path, engine=EngineConfig(max_batch_size=8))
    return ModelPool(Catalog([spec]), context, 8 * 2**30)


def ask(pool, text: str, **params):
    params.setdefault("temperature", 0)
    params.setdefault("max_new_tokens", 12)
    return pool.submit("tiny", GenerationRequest(GenerationParams.validated(**params),
                                                 messages=[Message("user", text)]))


def test_a_model_runs_on_the_gpu_in_bf16_and_batches_concurrent_requests(tiny_model_dir, tmp_path):
    pool = pool_for(tiny_model_dir, tmp_path)
    try:
        status = pool.load("tiny")
        assert status["device"].startswith("cuda") and status["dtype"] in ("bfloat16", "float16")
        assert status["engine"] == "transformers"
        alone = ask(pool, "hello world").result(60)
        together = [ask(pool, "hello world", seed=n) for n in range(6)]
        finals = [h.result(60) for h in together]
        assert alone.usage.completion_tokens == 12 and all(f.usage.completion_tokens == 12 for f in finals)
        assert pool.backend("tiny").load_stats()["peak_batch"] >= 2
        assert torch.cuda.memory_allocated() > 0
    finally:
        pool.shutdown()


def test_auto_engine_keeps_gguf_models_on_transformers_on_cuda():
    spec = spec_from_dict({"name": "g", "version": "1", "source": "gguf", "location": "/x/model.gguf"})
    assert engine_for(spec, "auto") == "transformers" and engine_for(spec, "cuda") == "transformers"


def test_bitsandbytes_quantization_loads_or_is_refused_by_name(tiny_model_dir, tmp_path):
    pool = pool_for(tiny_model_dir, tmp_path, quantization="bnb-8bit")
    try:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            with pytest.raises(ModelLoadError, match="bitsandbytes"):
                pool.load("tiny")
            return
        status = pool.load("tiny")
        assert status["device"].startswith("cuda")
        assert ask(pool, "hello world").result(60).usage.completion_tokens == 12
    finally:
        pool.shutdown()
