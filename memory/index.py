"""A session's vector index on disk: passages and their embeddings, searched by cosine similarity.

One folder per session with `vectors.npy` (float32, normalised) and `chunks.json`, replaced
atomically on every change. Brute-force search over thousands of passages takes well under a
millisecond of numpy; nothing else is needed at this scale.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np

from .chunking import Chunk
from .embeddings import DIMENSIONS


class SessionIndex:
    def __init__(self, folder: Path):
        self.folder = folder
        self._lock = threading.Lock()
        self.chunks: list[Chunk] = []
        self.vectors = np.zeros((0, DIMENSIONS), dtype=np.float32)
        if (folder / "chunks.json").exists():
            self.chunks = [Chunk(**c) for c in json.loads((folder / "chunks.json").read_text())]
            self.vectors = np.load(folder / "vectors.npy")

    def _save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp_vectors, tmp_chunks = self.folder / "vectors.tmp.npy", self.folder / "chunks.tmp.json"
        np.save(tmp_vectors, self.vectors)
        tmp_chunks.write_text(json.dumps([c.to_dict() for c in self.chunks], ensure_ascii=False))
        os.replace(tmp_vectors, self.folder / "vectors.npy")
        os.replace(tmp_chunks, self.folder / "chunks.json")

    def add(self, chunks: list[Chunk], vectors: np.ndarray) -> None:
        with self._lock:
            self.chunks = self.chunks + chunks
            self.vectors = np.vstack([self.vectors, vectors.astype(np.float32)])
            self._save()

    def remove(self, *, file_id: str | None = None, turns_from: int | None = None) -> int:
        """Drop a file's passages, or the remembered turns at or after `turns_from`."""
        with self._lock:
            keep = [i for i, c in enumerate(self.chunks)
                    if not ((file_id is not None and c.file_id == file_id)
                            or (turns_from is not None and c.kind == "turn" and (c.turn or 0) >= turns_from))]
            removed = len(self.chunks) - len(keep)
            if removed:
                self.chunks = [self.chunks[i] for i in keep]
                self.vectors = self.vectors[keep] if keep else np.zeros((0, DIMENSIONS), dtype=np.float32)
                self._save()
            return removed

    def search(self, query: np.ndarray, k: int, threshold: float,
               exclude_turns_from: int | None = None) -> list[tuple[Chunk, float]]:
        with self._lock:
            if not self.chunks:
                return []
            scores = self.vectors @ query.astype(np.float32)
            order = np.argsort(-scores)
            hits = []
            for i in order:
                score = float(scores[i])
                if score < threshold or len(hits) >= k:
                    break
                chunk = self.chunks[i]
                if chunk.kind == "turn" and exclude_turns_from is not None and (chunk.turn or 0) >= exclude_turns_from:
                    continue
                hits.append((chunk, score))
            return hits

    def destroy(self) -> None:
        with self._lock:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.chunks, self.vectors = [], np.zeros((0, DIMENSIONS), dtype=np.float32)
