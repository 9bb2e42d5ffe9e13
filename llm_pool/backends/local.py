"""A model run in this process with transformers, on the CPU or a CUDA GPU.

Owns the tokenizer (chat template, context checks) and a `BatchEngine` for the forward passes.
The GPU path (CUDA device, bf16/fp16, bitsandbytes 4/8-bit) is taken only when CUDA is present;
a CPU machine never imports bitsandbytes.
"""

from __future__ import annotations

import gc
import logging
import threading
from pathlib import Path
from typing import Any

import torch

from .. import chat_format
from ..constraints import TokenizerGrammar
from ..cpu_linear import pack_linears, packed_bytes
from ..engine import BatchEngine, make_engine
from ..errors import ContextOverflowError, InvalidParamsError, InvalidRequestError, ModelLoadError
from ..reasoning import Reasoning
from ..sources import Prepared, constructing, prepare
from ..stream import GenerationHandle, GenerationRequest
from .base import Backend, Progress, check_logit_bias, check_token_ids

log = logging.getLogger("shoal.local")
DEFAULT_MAX_NEW_TOKENS = 512
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{requested}' was asked for but CUDA is not available")
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return _DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # reproducible across batch sizes; bf16 is faster with AMX but is not


def quantization_config(kind: str, device: torch.device, compute_dtype: torch.dtype) -> Any:
    """bitsandbytes settings; only on CUDA, where they save memory and run fast."""
    if device.type != "cuda":
        raise ModelLoadError(f"quantization '{kind}' needs a CUDA device; this model would run on "
                             f"{device}. Remove 'quantization' from its catalog entry for the CPU.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError(f"quantization '{kind}' needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig
    if kind == "bnb-4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


class LocalBackend(Backend):
    engine_name = "transformers"

    def __init__(self, spec, context):
        super().__init__(spec, context)
        self._prepared: Prepared | None = None
        self._device = pick_device(spec.device if spec.device != "auto" else context.device)
        self._dtype = pick_dtype(spec.dtype, self._device)
        self.model = None
        self.tokenizer = None
        self.engine: BatchEngine | None = None
        self._context_length = spec.context_length
        self._weights_bytes = 0
        self._parameters = 0
        self._tok_lock = threading.Lock()
        self._grammar: TokenizerGrammar | None = None

    # ------------------------------------------------------------------ lifecycle
    def prepare(self, progress: Progress) -> None:
        if self.spec.quantization:
            quantization_config(self.spec.quantization, self._device, self._dtype)  # fail early
        self._prepared = prepare(self.spec, self.context.cache_dir, progress, self.context.policy)

    def estimate_bytes(self) -> int:
        params = self._prepared.parameters if self._prepared else None
        if params is None:
            return self.context.engine.kv_cache_bytes
        per_param = {"bnb-4bit": 0.6, "bnb-8bit": 1.1}.get(self.spec.quantization or "",
                                                           torch.finfo(self._dtype).bits / 8)
        return int(params * per_param) + self.context.engine.kv_cache_bytes

    def load(self, progress: Progress) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        assert self._prepared is not None, "prepare() first"
        location = self._prepared.location
        progress(0.85, "loading weights")
        kwargs: dict[str, Any] = {"dtype": self._dtype}
        if self.spec.quantization:
            kwargs["quantization_config"] = quantization_config(self.spec.quantization, self._device,
                                                                self._dtype)
            kwargs["device_map"] = {"": self._device.index or 0}
        try:
            with constructing:  # one model built at a time per process (see sources.constructing)
                tokenizer = AutoTokenizer.from_pretrained(location)
                model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
            if not self.spec.quantization:
                model = model.to(self._device)
        except Exception as exc:  # the message may quote the files: only the server log gets it
            log.warning("model %s: loading weights failed: %s", self.spec.key, exc)
            raise ModelLoadError(f"model '{self.spec.key}': loading weights failed ({type(exc).__name__}; "
                                 "details in the server log)") from exc
        model.eval()
        if self.spec.chat_template:
            tokenizer.chat_template = self.spec.chat_template
        if self.spec.kind == "chat" and not tokenizer.chat_template:
            raise ModelLoadError(f"model '{self.spec.key}' is listed as a chat model but has no chat "
                                 "template; set kind = 'completion' or give a chat_template")
        self.tokenizer, self.model = tokenizer, model
        self.tool_template = chat_format.knows_tools(tokenizer.chat_template)
        self.reasoning = Reasoning.of_template(tokenizer.chat_template)
        config = model.config.get_text_config()
        self._context_length = self.spec.context_length or getattr(config, "max_position_embeddings", 2048)
        self._parameters = sum(p.numel() for p in model.parameters())
        if self._device.type == "cpu" and not self.spec.quantization:
            progress(0.9, "packing weights for the CPU")
            packed = pack_linears(model)  # measured faster at every batch size: see cpu_linear.py
            log.info("model %s: %d linear layers packed for oneDNN", self.spec.key, packed)
        self._weights_bytes = packed_bytes(model) + sum(
            t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        progress(0.95, "warming up")
        self._grammar = TokenizerGrammar(tokenizer, config.vocab_size, self._eos_ids())
        self.engine = make_engine(model, self._decode, name=self.spec.key, eos_ids=self._eos_ids(),
                                  context_length=self._context_length, config=self.context.engine,
                                  token_bytes=self._grammar.token_bytes)
        if self.context.kv_disk is not None:
            self.engine.prefix_cache.disk = self.context.kv_disk.for_model(self.spec.key, self._kv_identity(location))
        self.engine.start()

    def _kv_identity(self, location: str) -> str:
        """What a saved KV depends on besides the model's key: its weights files (names, sizes,
        times; not the folder, which moves with a data dir), the dtype and the device (a file
        written under another identity is never read)."""
        files = sorted(Path(location).glob("*.safetensors")) + sorted(Path(location).glob("*.bin"))
        stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        return f"transformers|{stats}|{self._dtype}|{self._device}"

    def unload(self) -> None:
        if self.engine:
            self.engine.stop()
        self.engine = self.model = self.tokenizer = self._grammar = None
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for value in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(value)
        return ids

    # ------------------------------------------------------------------ requests
    def _decode(self, ids) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        with self._tok_lock:
            if request.messages is not None:
                if self.spec.kind != "chat":
                    raise InvalidRequestError(
                        f"model '{self.spec.name}' is a completion model (a base model with no chat "
                        "template): send a prompt to /v1/completions instead of messages",
                        param="model", code="not_a_chat_model")
                if not request.messages:
                    raise InvalidParamsError("messages must not be empty", param="messages")
                messages, tools = chat_format.render(request, self.tool_template)
                switches = self.reasoning.template_kwargs(request.thinking)
                try:
                    text = self.tokenizer.apply_chat_template(
                        messages, tools=tools, tokenize=False, add_generation_prompt=request.add_generation_prompt,
                        continue_final_message=request.continue_final_message, **switches)
                except ValueError as exc:  # transformers: the template does not show the last message as sent
                    if not request.continue_final_message:
                        raise
                    raise InvalidParamsError(f"continue_final_message: this model's chat template cannot leave "
                                             f"the last message open ({exc})", param="continue_final_message") from None
                request.thoughts = self.reasoning.marks(text)
                return self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not request.prompt:
                raise InvalidParamsError("prompt must not be empty", param="prompt")
            return self.tokenizer(request.prompt)["input_ids"]

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        if self.engine is None:
            raise ModelLoadError(f"model '{self.spec.key}' is not loaded")
        ids = self.prompt_ids(request)
        limit = self.engine.max_request_tokens
        wanted = request.params.max_new_tokens
        if wanted is None:
            if len(ids) >= limit:
                raise ContextOverflowError(len(ids), 1, limit)
            wanted = min(DEFAULT_MAX_NEW_TOKENS, limit - len(ids))
        elif len(ids) + wanted > limit:
            raise ContextOverflowError(len(ids), wanted, limit)
        check_logit_bias(request.params, self.model.config.get_text_config().vocab_size)
        constraint = None
        if request.output_format is not None and self._grammar is not None:
            if request.output_format.kind == "gbnf":  # a caller's grammar: read within the time budget first
                request.output_format.check()
            constraint = self._grammar.constraint(request.output_format)
        handle = GenerationHandle(request, model=self.spec.key)
        top_n = request.top_logprobs if request.want_logprobs else 0
        self.engine.submit(handle, ids, request.params, wanted, constraint, top_n)
        return handle

    def tokenize(self, request: GenerationRequest) -> list[int]:
        return self.prompt_ids(request)

    def tokenize_pieces(self, request: GenerationRequest) -> list[tuple[int, bytes]]:
        ids = self.prompt_ids(request)
        return [(i, self._grammar.token_bytes(i)) for i in ids]

    def detokenize(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            raise ModelLoadError(f"model '{self.spec.key}' is not loaded")
        check_token_ids(ids, self.model.config.get_text_config().vocab_size)
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=False)

    def count_tokens(self, text: str) -> int:
        with self._tok_lock:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if self.tokenizer \
                else super().count_tokens(text)

    @property
    def context_length(self) -> int:
        if self.engine:
            return self.engine.max_request_tokens
        return self._context_length or 2048

    def memory_bytes(self) -> int:
        return self._weights_bytes + self.context.engine.kv_cache_bytes

    def info(self) -> dict[str, Any]:
        params = self._prepared.parameters if self._prepared else None
        if self.model is not None:
            params = self._parameters
        return {"engine": self.engine_name, "device": str(self._device),
                "dtype": str(self._dtype).replace("torch.", ""), "quantization": self.spec.quantization,
                "parameters": params,
                "context_length": self.context_length if self.engine else self._context_length,
                "kv_cache_bytes": self.context.engine.kv_cache_bytes,
                "converted_seconds": self._prepared.converted_seconds if self._prepared else None}

    def load_stats(self) -> dict[str, Any]:
        return self.engine.load() if self.engine else {}


__all__ = ["LocalBackend", "pick_device", "pick_dtype"]
