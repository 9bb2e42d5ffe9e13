"""A session's passages, searched by meaning and by words, kept in SQLite beside the sessions.

Each passage is one row of `shoal_passages` (its text, where it came from, its embedding as a
float32 blob) with its terms in `shoal_postings`, in the same database file and the same
transactions as the session store: adding a file's passages, marking the file ready, removing a
file or deleting a session each commit whole or not at all, and an insert touches only its own
rows. Search is hybrid: cosine similarity over the session's vectors and BM25 over its postings,
fused by reciprocal rank; a passage is only returned when one of the two says it is relevant on
its own (a question answered by no file cites nothing).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from . import lexical
from .chunking import Chunk
from .embeddings import DIMENSIONS

SCHEMA = """
CREATE TABLE IF NOT EXISTS shoal_passages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL,
    file_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    turn INTEGER,
    text TEXT NOT NULL,
    meta TEXT NOT NULL,
    length INTEGER NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS shoal_passages_session ON shoal_passages (session_id, file_id);
CREATE TABLE IF NOT EXISTS shoal_postings (
    session_id TEXT NOT NULL,
    term TEXT NOT NULL,
    passage_id INTEGER NOT NULL,
    tf INTEGER NOT NULL,
    PRIMARY KEY (session_id, term, passage_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS shoal_postings_passage ON shoal_postings (passage_id);
"""
# The same tables on PostgreSQL (memory/backend.py): ids from a sequence (they only grow, as with
# SQLite's AUTOINCREMENT, which the Searcher's cache relies on), vectors as bytea.
POSTGRES_SCHEMA = (SCHEMA.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
                   .replace("passage_id INTEGER", "passage_id BIGINT").replace("BLOB", "BYTEA")
                   .replace(") WITHOUT ROWID;", ");"))

Sql = Callable[..., object]  # sqlite3 Connection.execute of the store's transaction


@dataclass(frozen=True)
class Retrieval:
    """How passages are found. The defaults are what measured best in bench/retrieval_eval.py."""

    mode: str = "hybrid"  # hybrid | dense | lexical
    k: int = 4
    candidates: int = 40  # from each of the two rankings, before fusion
    rrf_k: int = 60
    lexical_weight: float = 1.0  # weight of the BM25 ranking in the fusion (the dense one has 1)
    min_similarity: float = 0.25  # a passage this close in meaning is relevant on its own
    min_coverage: float = 0.6  # ... or one holding this share of the question's (idf-weighted) words


@dataclass
class Hit:
    chunk: Chunk
    score: float  # fused score (ranking)
    similarity: float  # cosine similarity to the question
    coverage: float  # share of the question's idf mass among this passage's terms


def create_schema(sql: Sql, dialect: str = "sqlite") -> None:
    for statement in (POSTGRES_SCHEMA if dialect == "postgres" else SCHEMA).split(";"):
        if statement.strip():
            sql(statement)


def insert(sql: Sql, session_id: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
    """Add passages (inside the caller's transaction)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    for chunk, vector in zip(chunks, vectors, strict=True):
        counts = lexical.term_counts(chunk.index_text())
        meta = {k: v for k, v in chunk.to_dict().items() if k != "text"}
        passage_id = sql("INSERT INTO shoal_passages (session_id, file_id, kind, turn, text, meta, length, vector) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                         (session_id, chunk.file_id or "", chunk.kind, chunk.turn, chunk.text,
                          json.dumps(meta, ensure_ascii=False), sum(counts.values()), vector.tobytes())).fetchone()[0]
        sql_many = [(session_id, term, passage_id, tf) for term, tf in counts.items()]
        for row in sql_many:
            sql("INSERT INTO shoal_postings (session_id, term, passage_id, tf) VALUES (?, ?, ?, ?)", row)


def delete(sql: Sql, session_id: str, *, file_id: str | None = None, turns_from: int | None = None) -> int:
    """Remove a file's passages, the remembered turns from `turns_from` on, or (neither given) all
    of the session's passages; inside the caller's transaction. Returns how many went."""
    where, args = "session_id = ?", [session_id]
    if file_id is not None:
        where, args = where + " AND file_id = ?", args + [file_id]
    if turns_from is not None:
        where, args = where + " AND kind = 'turn' AND turn >= ?", args + [turns_from]
    sql(f"DELETE FROM shoal_postings WHERE passage_id IN (SELECT id FROM shoal_passages WHERE {where})", args)
    return sql(f"DELETE FROM shoal_passages WHERE {where}", args).rowcount


def count(sql: Sql, session_id: str, file_id: str | None = None) -> int:
    if file_id is None:
        return sql("SELECT count(*) FROM shoal_passages WHERE session_id = ?", (session_id,)).fetchone()[0]
    return sql("SELECT count(*) FROM shoal_passages WHERE session_id = ? AND file_id = ?",
               (session_id, file_id)).fetchone()[0]


class Searcher:
    """Searches one store's passages; keeps each recently searched session's vectors in memory and
    reloads them when the session's passages changed (ids only grow, so count and max id tell)."""

    def __init__(self, sql: Callable[[], Sql], sessions_in_memory: int = 64):
        self._sql = sql
        self._vectors: OrderedDict[str, tuple[tuple[int, int], np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self._limit = sessions_in_memory

    def _dense(self, sql: Sql, session_id: str) -> tuple[np.ndarray, np.ndarray]:
        stamp = tuple(sql("SELECT count(*), coalesce(max(id), 0) FROM shoal_passages WHERE session_id = ?",
                          (session_id,)).fetchone())
        with self._lock:
            cached = self._vectors.get(session_id)
            if cached and cached[0] == stamp:
                self._vectors.move_to_end(session_id)
                return cached[1], cached[2]
        rows = sql("SELECT id, vector FROM shoal_passages WHERE session_id = ? ORDER BY id", (session_id,)).fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        matrix = (np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), DIMENSIONS)
                  if rows else np.zeros((0, DIMENSIONS), dtype=np.float32))
        with self._lock:
            self._vectors[session_id] = (stamp, ids, matrix)
            self._vectors.move_to_end(session_id)
            while len(self._vectors) > self._limit:
                self._vectors.popitem(last=False)
        return ids, matrix

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._vectors.pop(session_id, None)

    def _lexical(self, sql: Sql, session_id: str, query: str) -> tuple[dict[int, float], dict[int, float]]:
        """BM25 score and idf coverage of every passage sharing a term with the query."""
        query_terms = sorted(set(lexical.terms(query)))
        if not query_terms:
            return {}, {}
        total, average = sql("SELECT count(*), CAST(avg(length) AS REAL) FROM shoal_passages WHERE session_id = ?",
                             (session_id,)).fetchone()
        if not total:
            return {}, {}
        marks = ",".join("?" * len(query_terms))
        frequency = dict(sql(f"SELECT term, count(*) FROM shoal_postings WHERE session_id = ? AND term IN ({marks}) "
                             "GROUP BY term", [session_id, *query_terms]).fetchall())
        weights = {t: lexical.idf(total, frequency.get(t, 0)) for t in query_terms}
        mass = sum(weights.values()) or 1.0
        scores: dict[int, float] = {}
        covered: dict[int, float] = {}
        for passage_id, term, tf, length in sql(
                f"SELECT p.passage_id, p.term, p.tf, s.length FROM shoal_postings p JOIN shoal_passages s "
                f"ON s.id = p.passage_id WHERE p.session_id = ? AND p.term IN ({marks})",
                [session_id, *query_terms]):
            scores[passage_id] = scores.get(passage_id, 0.0) + lexical.bm25(tf, length, average, weights[term])
            covered[passage_id] = covered.get(passage_id, 0.0) + weights[term] / mass
        return scores, covered

    def search(self, session_id: str, query: str, vector: np.ndarray, how: Retrieval = Retrieval(), *,
               k: int | None = None, exclude_turns_from: int | None = None) -> list[Hit]:
        sql = self._sql()
        k = k or how.k
        ids, matrix = self._dense(sql, session_id)
        if not len(ids):
            return []
        similarity = matrix @ vector.astype(np.float32)
        by_id = dict(zip(ids.tolist(), similarity.tolist(), strict=True))
        lexical_scores, coverage = self._lexical(sql, session_id, query) if how.mode != "dense" else ({}, {})
        rankings: list[tuple[float, Iterable[int]]] = []
        if how.mode in ("hybrid", "dense"):
            top = np.argsort(-similarity)[:how.candidates]
            rankings.append((1.0, ids[top].tolist()))
        if how.mode in ("hybrid", "lexical"):
            # a passage stored between the two reads (a turn remembered just now) is left for the
            # next search: the vectors read first do not hold it
            lexical_scores = {i: score for i, score in lexical_scores.items() if i in by_id}
            rankings.append((how.lexical_weight,
                             sorted(lexical_scores, key=lambda i: -lexical_scores[i])[:how.candidates]))
        fused: dict[int, float] = {}
        for weight, ranking in rankings:
            for rank, passage_id in enumerate(ranking, 1):
                fused[passage_id] = fused.get(passage_id, 0.0) + weight / (how.rrf_k + rank)
        relevant = [i for i in fused
                    if (how.mode != "lexical" and by_id[i] >= how.min_similarity)
                    or (how.mode != "dense" and coverage.get(i, 0.0) >= how.min_coverage)]
        relevant.sort(key=lambda i: -fused[i])
        if not relevant:
            return []
        wanted = relevant[:k + 16]  # room for remembered turns that are still in the window
        marks = ",".join("?" * len(wanted))
        rows = {r[0]: r for r in sql(f"SELECT id, text, meta FROM shoal_passages WHERE id IN ({marks})", wanted)}
        hits: list[Hit] = []
        for passage_id in wanted:
            if passage_id not in rows:
                continue  # deleted between the two reads
            chunk = Chunk(text=rows[passage_id][1], **json.loads(rows[passage_id][2]))
            if chunk.kind == "turn" and exclude_turns_from is not None and (chunk.turn or 0) >= exclude_turns_from:
                continue
            hits.append(Hit(chunk, fused[passage_id], by_id[passage_id], coverage.get(passage_id, 0.0)))
            if len(hits) >= k:
                break
        return hits
