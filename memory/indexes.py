"""The store's derived indexes and its two search legs: HNSW/exact vector search and BM25.

A mixin of `MemoryStore` (see its docstring for the locks and the vss traps).
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
from collections.abc import Sequence

import duckdb
import numpy as np
import structlog

from memory.rows import vector_param

__all__ = ["EXACT_SCAN_MAX_ROWS", "HNSW_INDEX", "IndexedSearch"]

log = structlog.get_logger("memlane.store")

MIN_DELETES_BETWEEN_REBUILDS = 16  # deletes allowed between HNSW rebuilds: max(this, rows // 4)
EXACT_SCAN_MAX_ROWS = 4096  # a user with at most this many vectors is searched exactly
MAX_OVERFETCH_ROWS = 4000  # the most rows one HNSW scan asks for before the user filter
HNSW_INDEX = "memory_vectors_hnsw"
CREATE_HNSW = (
    f"CREATE INDEX {HNSW_INDEX} ON memory_vectors USING HNSW (embedding) WITH (metric = 'cosine')"
)

# The only form the vss planner turns into HNSW_INDEX_SCAN: ORDER BY the metric's distance
# function, LIMIT. The WHERE is applied to the index's top rows.
HNSW_SQL = """
    SELECT id, 1 - distance FROM (
        SELECT id, array_cosine_distance(embedding, ?::FLOAT[384]) AS distance
        FROM memory_vectors WHERE user_id = ? ORDER BY distance LIMIT ?
    )
"""
# Ordering by similarity DESC is never rewritten into an index scan: an exact scan.
EXACT_SQL = """
    SELECT id, array_cosine_similarity(embedding, ?::FLOAT[384]) AS score
    FROM memory_vectors WHERE user_id = ? ORDER BY score DESC, id LIMIT ?
"""
# BM25 over the fts extension's tables, reading only the postings of the query's terms (the
# extension's match_bm25 macro scores every row: ~40-70 ms at 100k rows against a few ms).
# Query terms go through the index's own tokenizer settings: lower case, accents stripped,
# non-letters split, English stop words dropped, Porter stems. k1 = 1.2, b = 0.75.
BM25_SQL = """
    WITH q AS (
        SELECT DISTINCT stem(w, 'porter') AS term
        FROM (SELECT unnest(string_split_regex(lower(strip_accents(?)), '[^a-z]+')) AS w)
        WHERE w <> '' AND w NOT IN (SELECT sw FROM fts_main_memories.stopwords)
    ),
    qt AS (SELECT d.termid, d.df FROM fts_main_memories.dict AS d JOIN q USING (term)),
    tf AS (
        SELECT t.docid, t.termid, count(*) AS tf
        FROM fts_main_memories.terms AS t JOIN qt USING (termid) GROUP BY ALL
    ),
    st AS (SELECT num_docs, avgdl FROM fts_main_memories.stats)
    SELECT m.id, sum(
        ln(1 + (st.num_docs - qt.df + 0.5) / (qt.df + 0.5))
        * tf.tf * 2.2 / (tf.tf + 1.2 * (0.25 + 0.75 * docs.len / st.avgdl))
    ) AS score
    FROM tf JOIN qt USING (termid) JOIN fts_main_memories.docs AS docs USING (docid)
    CROSS JOIN st JOIN memories AS m ON m.id = docs.name
    WHERE m.user_id = ?
    GROUP BY m.id ORDER BY score DESC, m.id LIMIT ?
"""


class IndexedSearch:
    """Needs from the store: `_cursor`, `_writable_cursor`, the locks, `_background`, and the
    flags set in its `__init__`."""

    _write_lock: threading.RLock
    _index_lock: threading.Lock
    _background: concurrent.futures.ThreadPoolExecutor
    _text_index_stale: bool
    _refreshing: bool
    _read_only: bool
    _closed: bool
    _overfetch: int
    _deletes_since_index_load: int
    _user_rows: dict[str, int]
    encrypted: bool

    def _cursor(self) -> duckdb.DuckDBPyConnection: ...  # provided by MemoryStore

    def _writable_cursor(self) -> duckdb.DuckDBPyConnection: ...  # provided by MemoryStore

    @property
    def has_vector_index(self) -> bool:
        return not self.encrypted

    # -- derived indexes ---------------------------------------------------------------

    def _ensure_indexes(self) -> None:
        cursor = self._writable_cursor()
        if self.has_vector_index:
            (exists,) = cursor.execute(
                "SELECT count(*) FROM duckdb_indexes() WHERE index_name = ?", [HNSW_INDEX]
            ).fetchone()  # type: ignore[misc]
            if not exists:
                with self._write_lock, self._index_lock:
                    cursor.execute(CREATE_HNSW)
        (has_fts,) = cursor.execute(
            "SELECT count(*) FROM duckdb_schemas() WHERE schema_name = 'fts_main_memories' "
            "AND database_name = current_database()"
        ).fetchone()  # type: ignore[misc]
        if not has_fts or self._text_index_out_of_date(cursor):
            self.refresh_text_index()
        else:
            self._text_index_stale = False

    def _text_index_out_of_date(self, cursor: duckdb.DuckDBPyConnection) -> bool:
        (missing,) = cursor.execute(
            "SELECT (SELECT count(*) FROM memories) <> (SELECT count(*) FROM fts_main_memories.docs)"
        ).fetchone()  # type: ignore[misc]
        return bool(missing)

    def refresh_text_index(self) -> None:
        """Rebuild the BM25 index over every memory's content (~0.6 s per 100k memories)."""
        with self._write_lock:
            self._text_index_stale = False
            self._writable_cursor().execute(
                "PRAGMA create_fts_index('memories', 'id', 'content', overwrite = 1)"
            )

    def _refresh_text_index_soon(self) -> None:
        if not self._text_index_stale or self._refreshing or self._read_only or self._closed:
            return
        self._refreshing = True

        def run() -> None:
            try:
                self.refresh_text_index()
            except Exception as exc:  # the next search retries
                self._text_index_stale = True
                log.warning("text_index_refresh_failed", error=repr(exc))
            finally:
                self._refreshing = False

        try:
            self._background.submit(run)
        except RuntimeError:  # shutting down
            self._refreshing = False

    def _rebuild_vector_index_if_due(self, cursor: duckdb.DuckDBPyConnection) -> None:
        """Drop and rebuild the HNSW index when deletes may be near the vss hang."""
        if not self.has_vector_index:
            return
        (rows,) = cursor.execute("SELECT count(*) FROM memory_vectors").fetchone()  # type: ignore[misc]
        if self._deletes_since_index_load < max(MIN_DELETES_BETWEEN_REBUILDS, rows // 4):
            return
        cursor.execute("BEGIN TRANSACTION")
        try:
            cursor.execute(f"DROP INDEX IF EXISTS {HNSW_INDEX}")
            cursor.execute(CREATE_HNSW)
            cursor.execute("COMMIT")
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        self._deletes_since_index_load = 0

    # -- search primitives -------------------------------------------------------------

    def _rows_of(self, user_id: str) -> int:
        rows = self._user_rows.get(user_id)
        if rows is None:
            (rows,) = self._cursor().execute(
                "SELECT count(*) FROM memory_vectors WHERE user_id = ?", [user_id]
            ).fetchone()  # type: ignore[misc]
            self._user_rows[user_id] = rows
        return rows

    def vector_neighbours(self, user_id: str, embedding: np.ndarray, n: int) -> list[tuple[str, float]]:
        """The user's n memories (current or not) nearest to `embedding`: (id, cosine)."""
        if n <= 0:
            return []
        query = vector_param(embedding)
        cursor = self._cursor()
        user_rows = self._rows_of(user_id)
        if user_rows == 0:
            return []
        if self.has_vector_index and user_rows > EXACT_SCAN_MAX_ROWS:
            (total,) = cursor.execute("SELECT count(*) FROM memory_vectors").fetchone()  # type: ignore[misc]
            share = user_rows / max(total, 1)
            # The index's top rows hold about `share` of this user's: ask for enough of them.
            fetch = n if share >= 0.99 else max(n * self._overfetch, math.ceil(2 * n / share))
            fetch = min(fetch, MAX_OVERFETCH_ROWS)
            with self._index_lock:
                rows = cursor.execute(HNSW_SQL, [query, user_id, fetch]).fetchall()
            if len(rows) >= min(n, user_rows):
                rows.sort(key=lambda r: (-r[1], r[0]))
                return [(i, float(s)) for i, s in rows[:n]]
        rows = cursor.execute(EXACT_SQL, [query, user_id, n]).fetchall()
        return [(i, float(s)) for i, s in rows]

    def similarities(self, user_id: str, embedding: np.ndarray, memory_ids: Sequence[str]) -> dict[str, float]:
        if not memory_ids:
            return {}
        rows = self._cursor().execute(
            "SELECT id, array_cosine_similarity(embedding, ?::FLOAT[384]) FROM memory_vectors "
            "WHERE user_id = ? AND list_contains(?, id)",
            [vector_param(embedding), user_id, list(memory_ids)],
        ).fetchall()
        return {i: float(s) for i, s in rows}

    def text_matches(self, user_id: str, query: str, n: int) -> list[tuple[str, float]]:
        """BM25 over the text index: the user's n best (id, score). Rebuilds a stale index
        in the background; until then rows written since the last build are not seen."""
        if n <= 0 or not query.strip():
            return []
        if self._text_index_stale:
            self._refresh_text_index_soon()
        try:
            rows = self._cursor().execute(BM25_SQL, [query, user_id, n]).fetchall()
        except duckdb.CatalogException:  # not built yet (read-only store of an old file)
            return []
        return [(i, float(s)) for i, s in rows]
