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


def test_structured_output_and_sampling_fields_run_on_the_gpu(tmp_path):
    """The grammar mask, logit_bias and the penalties act on logits that live on the GPU, in a
    batch that mixes them (a byte-level BPE tokenizer, so llguidance reads it, and random weights:
    the grammar, not the model, makes the constrained answers valid)."""
    import json

    import jsonschema
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from llm_pool.constraints import OutputFormat

    folder = tmp_path / "tiny-bpe"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the weather is sunny and warm today", '{"ok": true, "colour": "red"}'] * 20,
                            vocab_size=400, min_frequency=1, special_tokens=["<pad>", "<eos>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>", pad_token="<pad>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=2048, eos_token_id=1, pad_token_id=0)).save_pretrained(folder)
    pool = pool_for(folder, tmp_path)
    try:
        assert pool.load("tiny")["device"].startswith("cuda")
        schemas = [{"enum": ["red", "green", "blue"]},
                   {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                    "additionalProperties": False}]

        def request(output_format=None, **params):
            params.setdefault("max_new_tokens", 40)
            return GenerationRequest(GenerationParams.validated(**params), messages=[Message("user", "hello")],
                                     output_format=output_format)

        forced = tokenizer.convert_tokens_to_ids("Ġsunny")
        handles = [pool.submit("tiny", request(OutputFormat.json(s), temperature=t))
                   for s in schemas for t in (0, 1.0)]
        bias = pool.submit("tiny", request(temperature=0, max_new_tokens=5, logit_bias={str(forced): 100}))
        penalised = pool.submit("tiny", request(temperature=0.9, presence_penalty=1.5, frequency_penalty=1.0,
                                                min_p=0.05, seed=3))
        for handle, schema in zip(handles, [s for s in schemas for _ in (0, 1)]):
            final = handle.result(120)
            assert final.reason == "stop", final.text
            jsonschema.validate(json.loads(final.text), schema)
        assert bias.result(120).text == tokenizer.decode([forced] * 5)
        assert penalised.result(120).reason in ("stop", "length")
    finally:
        pool.shutdown()
