"""An embedding model of the pool run by llama.cpp (`llama-server --embedding`), for CPUs where
llama.cpp is the engine: no torch in Shoal's process, and the model's memory is a process the pool
counts, loads, evicts and stops like any other.

Which models: a sentence-transformers folder of a BERT model with mean pooling (all-MiniLM-L6-v2
ships so). It is converted once with llama.cpp's own `convert_hf_to_gguf.py` (from the source
Shoal already fetched; cached under the model cache, keyed by the folder's files) to q8_0: on two
cores it embeds as fast as sentence-transformers (0.74 vs 0.70 s for 16 passages of ~250 tokens;
f16 0.94 s, f32 0.86 s), with cosine >= 0.9999 to its vectors.

Texts are tokenized here with the folder's own `tokenizer.json` (the `tokenizers` library, what
sentence-transformers uses, without torch) and sent as token ids, so counts, refusals and the
truncation at the model's `max_seq_length` are exactly sentence-transformers': a text longer than
the window is refused, unless the caller asks to `truncate` (retrieval does, as
sentence-transformers' `encode` does). Token-id inputs (OpenAI's form) are sent as they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from .. import llamacpp_build
from ..errors import InvalidParamsError, InvalidRequestError, ModelLoadError, ServiceUnavailableError
from ..stream import GenerationHandle, GenerationRequest
from .base import Backend, Progress, check_token_ids
from .embedding import MAX_INPUTS, _folder_in_package, _is_gguf, check_input_ids, paced
from .llamacpp_server import LlamaServer

log = logging.getLogger("shoal.embedding")
OUTTYPE = "q8_0"
SLOTS = 2  # a question is never queued behind a file's batch


def embeds_on_llamacpp(spec) -> Path | None:
    """The folder of `spec` if llama.cpp can run it as an embedding model here, else None."""
    if spec.source not in ("pypi", "local") or _is_gguf(spec):
        return None
    try:
        folder = _folder_in_package(spec) if spec.source == "pypi" else Path(spec.location)
        config = json.loads((folder / "config.json").read_text())
        modules = json.loads((folder / "modules.json").read_text())
        pooling = next((m["path"] for m in modules if m.get("type", "").endswith(".Pooling")), None)
        mean = pooling and json.loads((folder / pooling / "config.json").read_text()).get("pooling_mode_mean_tokens")
    except (OSError, ValueError, KeyError, TypeError, ModelLoadError):
        return None
    if config.get("model_type") != "bert" or not mean or not (folder / "tokenizer.json").is_file():
        return None
    return folder


class LlamaCppEmbeddingBackend(Backend):
    engine_name = "llama.cpp"

    def __init__(self, spec, context):
        super().__init__(spec, context)
        self._folder: Path | None = None
        self._gguf: Path | None = None
        self._binary: Path | None = None
        self._server: LlamaServer | None = None
        self._tokenizer = None
        self._window = 512
        self._dimensions = 0
        self._measured = 0
        self._lock = threading.Lock()  # the tokenizer is not shared between threads
        self.lost: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def prepare(self, progress: Progress) -> None:
        self._binary = llamacpp_build.find_server()
        self._folder = embeds_on_llamacpp(self.spec)
        if self._binary is None or self._folder is None:
            raise ModelLoadError(f"model '{self.spec.key}' cannot run on llama.cpp here", code="engine_unavailable")
        config = json.loads((self._folder / "config.json").read_text())
        self._dimensions = int(config["hidden_size"])
        self._window = int(config.get("max_position_embeddings") or 512)
        st = self._folder / "sentence_bert_config.json"
        if st.is_file():
            self._window = min(self._window, int(json.loads(st.read_text()).get("max_seq_length") or self._window))
        digest = hashlib.sha256()
        for name in sorted(p.name for p in self._folder.iterdir() if p.is_file()):
            stat = (self._folder / name).stat()
            digest.update(f"{name}:{stat.st_size}:{int(stat.st_mtime)};".encode())
        self._gguf = self.context.cache_dir / "gguf" / f"{self.spec.name}-{digest.hexdigest()[:16]}-{OUTTYPE}.gguf"
        if not self._gguf.is_file():
            progress(0.1, "converting to GGUF (once)")
            try:
                llamacpp_build.convert_to_gguf(self._folder, self._gguf, OUTTYPE)
            except (RuntimeError, OSError) as exc:
                log.warning("model %s: %s", self.spec.key, exc)
                raise ModelLoadError(f"model '{self.spec.key}': converting it for llama.cpp failed "
                                     "(details in the server log)") from exc

    def estimate_bytes(self) -> int:
        return (self._gguf.stat().st_size if self._gguf and self._gguf.is_file() else 64 * 2**20) + 64 * 2**20

    def load(self, progress: Progress) -> None:
        from tokenizers import Tokenizer
        assert self._gguf is not None and self._binary is not None, "prepare() first"
        progress(0.5, "starting llama.cpp")
        tokenizer = Tokenizer.from_file(str(self._folder / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        threads = str(max(1, len(os.sched_getaffinity(0))))
        args = ["-m", str(self._gguf), "-a", self.spec.key, "--embedding", "--pooling", "mean",
                "-np", str(SLOTS), "-c", str(self._window * SLOTS), "-b", str(self._window * SLOTS),
                "-ub", str(self._window * SLOTS), "-t", threads, "-tb", threads, "--cache-ram", "0", "--no-webui"]
        self._server = LlamaServer(self._binary, args, self.spec.key, self.context.cache_dir / "llama.cpp-logs")
        self._server.start()
        self._tokenizer = tokenizer
        self.lost = None
        self._measured = self._server.resident_bytes() or 0
        progress(1.0, "ready")

    def unload(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()
        self._tokenizer = None

    def alive(self) -> bool:
        server = self._server
        if server is not None and server.exited() is not None and self.lost is None:
            self.lost = f"llama.cpp stopped (exit code {server.exited()})"
            server.log_tail("stopped")
        return self.lost is None

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        raise InvalidRequestError(f"model '{self.spec.name}' is an embedding model: use /v1/embeddings",
                                  param="model", code="not_a_generation_model")

    # ------------------------------------------------------------------ embeddings
    @property
    def dimensions(self) -> int:
        return self._dimensions

    @property
    def context_length(self) -> int:
        return self._window

    def _ids(self, texts: list[str | list[int]]) -> list[list[int]]:
        """Each text's token ids; a list of ids stays as it is (checked against the vocabulary)."""
        if self._tokenizer is None:
            raise ModelLoadError(f"model '{self.spec.key}' is not loaded")
        with self._lock:
            check_input_ids(texts, self._tokenizer.get_vocab_size())
            strings = [t for t in texts if isinstance(t, str)]
            encoded = iter([e.ids for e in self._tokenizer.encode_batch(strings)] if strings else [])
        return [next(encoded) if isinstance(t, str) else list(t) for t in texts]

    def embed(self, texts: list[str | list[int]], check: Callable[[list[int]], None] | None = None,
              pace: Callable[[], None] | None = None, truncate: bool = False) -> tuple[np.ndarray, int]:
        """As `EmbeddingBackend.embed`: L2-normalised vectors and the tokens they took."""
        if not texts or len(texts) > MAX_INPUTS:
            raise InvalidParamsError(f"input: send 1 to {MAX_INPUTS} texts", param="input")
        ids = self._ids(texts)
        limit = self._window
        for i, one in enumerate(ids):
            if len(one) > limit:
                if not truncate or not isinstance(texts[i], str):
                    raise InvalidParamsError(f"input.{i}: {len(one)} tokens; this model reads at most {limit} "
                                             "(split the text)", param=f"input.{i}")
                ids[i] = one[:limit - 1] + one[-1:]  # keep the closing [SEP], as the tokenizer's truncation does
        lengths = [len(one) for one in ids]
        if check is not None:
            check(lengths)
        vectors = np.concatenate(paced(lengths, pace, lambda start, end: self._post(ids[start:end]))).astype(np.float32)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors, sum(lengths)

    def _post(self, ids: list[list[int]]) -> np.ndarray:
        server = self._server
        if server is None or server.http is None or not self.alive():
            raise ServiceUnavailableError(f"model '{self.spec.key}': {self.lost or 'not loaded'}; it loads "
                                          "again on the next request", retry_after=1.0, code="engine_stopped")
        try:
            response = server.http.post("/v1/embeddings", json={"input": ids}, timeout=300)
        except httpx.HTTPError as exc:
            self.alive()
            raise ServiceUnavailableError(f"model '{self.spec.key}': llama.cpp did not answer "
                                          f"({type(exc).__name__})", retry_after=1.0) from exc
        if response.status_code != 200:
            raise InvalidRequestError(f"llama.cpp refused the input ({response.status_code})")
        data = sorted(response.json()["data"], key=lambda d: d["index"])
        return np.asarray([d["embedding"] for d in data], dtype=np.float32)

    def count_tokens(self, text: str) -> int:
        return len(self._ids([text])[0]) if self._tokenizer is not None else super().count_tokens(text)

    def tokenize(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            raise InvalidParamsError("an embedding model has no chat template: send prompt", param="messages")
        return self._ids([request.prompt or ""])[0]

    def detokenize(self, ids: list[int]) -> str:
        if self._tokenizer is None:
            raise ModelLoadError(f"model '{self.spec.key}' is not loaded")
        with self._lock:
            check_token_ids(ids, self._tokenizer.get_vocab_size())
            return self._tokenizer.decode(ids)

    def memory_bytes(self) -> int:
        return max(self._measured, self.estimate_bytes())

    def resident_bytes(self) -> int | None:
        return self._server.resident_bytes() if self._server is not None else None

    def info(self) -> dict[str, Any]:
        return {"engine": self.engine_name, "device": "cpu", "dimensions": self._dimensions or None,
                "dtype": OUTTYPE, "context_length": self.context_length, "slots": SLOTS,
                "gguf": self._gguf.name if self._gguf else None}

    def load_stats(self) -> dict[str, Any]:
        return {"resident_bytes": self.resident_bytes(), "lost": self.lost}


__all__ = ["LlamaCppEmbeddingBackend", "embeds_on_llamacpp"]
