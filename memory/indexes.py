"""The store's derived indexes and its two search legs: HNSW/exact vector search and BM25.

A mixin of `MemoryStore` (see its docstring for the locks and the vss traps).
"""

from __future__ import annotations

import concurrent.futures
import math
import re
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import duckdb
import numpy as np
import pyarrow as pa
import structlog

from memory.rows import EMBEDDING_DIM, arrow_table, first_row, vector_param
from memory.views import UserView, ViewCache, load_postings

__all__ = ["EXACT_SCAN_MAX_ROWS", "HNSW_INDEX", "IndexedSearch"]

log = structlog.get_logger("memlane.store")

MIN_DELETES_BETWEEN_REBUILDS = 16  # deletes allowed between HNSW rebuilds: max(this, rows // 4)
# A user with at most this many vectors is searched exactly, from a RAM copy of their vectors:
# 0.5 ms for 10k rows and 1 ms for 16k here (one query, argpartition), where one HNSW query
# through DuckDB took 6-9 ms p50 at 10k.
EXACT_SCAN_MAX_ROWS = 16_384
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
# BM25 from the fts extension's dictionary and a postings table derived from its index,
# sorted by user and term so that one user's postings of the query's terms are read and
# nothing else (the extension's match_bm25 macro scores every row: ~40-70 ms at 100k rows;
# scanning all postings: 26 ms at 100k, 85 ms at 1M; this: ~12 ms and ~20 ms, measured).
# Query words are tokenised in Python like the index (lower case, accents stripped,
# non-letters split, English stop words dropped) and stemmed by the same Porter stemmer.
# k1 = 1.2, b = 0.75; document frequencies are over all users.
POSTINGS_TABLE = "memory_postings"
BUILD_POSTINGS_SQL = f"""
    CREATE OR REPLACE TABLE {POSTINGS_TABLE} AS
    SELECT m.user_id, t.termid, m.id, d.len, count(*) AS tf
    FROM fts_main_memories.terms AS t
    JOIN fts_main_memories.docs AS d USING (docid)
    JOIN memories AS m ON m.id = d.name
    GROUP BY ALL
    ORDER BY m.user_id, t.termid
"""
BM25_SQL = f"""
    WITH q AS (SELECT DISTINCT stem(unnest(?::VARCHAR[]), 'porter') AS term),
    qt AS (SELECT d.termid, d.df FROM fts_main_memories.dict AS d JOIN q USING (term)),
    st AS (SELECT num_docs, avgdl FROM fts_main_memories.stats)
    SELECT p.id, sum(
        ln(1 + (st.num_docs - qt.df + 0.5) / (qt.df + 0.5))
        * p.tf * 2.2 / (p.tf + 1.2 * (0.25 + 0.75 * p.len / st.avgdl))
    ) AS score
    FROM {POSTINGS_TABLE} AS p JOIN qt USING (termid) CROSS JOIN st
    WHERE p.user_id = ?
    GROUP BY p.id ORDER BY score DESC, p.id LIMIT ?
"""
_WORD_SPLIT = re.compile(r"[^a-z]+")
STEM_CACHE_MAX = 65_536  # query words whose Porter stem is remembered
VECTOR_CACHE_MAX_ROWS = 200_000  # small users' vectors kept in RAM (~300 MB at most)


@dataclass(frozen=True, slots=True)
class _UserVectors:
    """One user's vectors in RAM: ids in id order, their (n, 384) unit rows, and id -> row."""

    ids: list[str]
    matrix: np.ndarray
    rows: dict[str, int]

    def nearest(self, query: np.ndarray, n: int) -> list[tuple[str, float]]:
        scores = self.matrix @ query  # (n_rows,) cosines
        if n < len(scores):
            top = np.argpartition(-scores, n - 1)[:n]
        else:
            top = np.arange(len(scores))
        top = top[np.lexsort((top, -scores[top]))]  # best first, ties in id order
        return [(self.ids[i], float(scores[i])) for i in top]

    def similarities(self, query: np.ndarray, memory_ids: Sequence[str]) -> dict[str, float]:
        found = [(i, self.rows[i]) for i in memory_ids if i in self.rows]
        if not found:
            return {}
        scores = self.matrix[[row for _, row in found]] @ query  # (len(found),)
        return {i: float(s) for (i, _), s in zip(found, scores)}


def fetch_user_vectors(cursor: duckdb.DuckDBPyConnection, user_id: str) -> tuple[list[str], np.ndarray]:
    """Every vector of the user's memories, history included, in id order: (ids, (n, 384))."""
    table = arrow_table(cursor.execute(
        "SELECT id, embedding FROM memory_vectors WHERE user_id = ? ORDER BY id", [user_id]
    ))
    ids = table.column("id").to_pylist()
    return ids, _matrix(table, len(ids))


def fetch_hashed_vectors(
    cursor: duckdb.DuckDBPyConnection, user_id: str, memory_ids: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray, list[int]]:
    """The user's vectors (all, or those of `memory_ids`) in id order, each with DuckDB's hash
    of it, read in the same query: (ids, (n, 384), hashes)."""
    where, params = ("", [user_id]) if memory_ids is None else (" AND list_contains(?, id)", [user_id, list(memory_ids)])
    table = arrow_table(cursor.execute(
        f"SELECT id, embedding, hash(embedding) FROM memory_vectors WHERE user_id = ?{where} ORDER BY id", params
    ))
    ids = table.column(0).to_pylist()
    return ids, _matrix(table, len(ids)), table.column(2).to_pylist()


def _matrix(table: pa.Table, rows: int) -> np.ndarray:
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(rows, EMBEDDING_DIM)


def query_words(text: str, stopwords: frozenset[str]) -> list[str]:
    """The query's words as the fts index tokenises documents, before stemming."""
    plain = unicodedata.normalize("NFKD", text.lower())
    plain = "".join(c for c in plain if not unicodedata.combining(c))
    return list(dict.fromkeys(w for w in _WORD_SPLIT.split(plain) if w and w not in stopwords))


@dataclass(frozen=True, slots=True)
class _Vocabulary:
    """The text index's dictionary and statistics, for BM25 over a view's postings."""

    text_generation: int
    terms: dict[str, tuple[int, int]]  # stemmed term -> (termid, document frequency)
    num_docs: int
    avgdl: float


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
    _vector_cache: OrderedDict[str, _UserVectors]
    _views: ViewCache
    _local: threading.local
    _stopwords: frozenset[str]
    _text_generation: int  # bumped by every rebuild of the text index
    _vocabulary: _Vocabulary | None
    _stems: dict[str, str]
    _postings_loading: set[str]
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
            (exists,) = first_row(cursor.execute(
                "SELECT count(*) FROM duckdb_indexes() WHERE index_name = ?", [HNSW_INDEX]
            ))  # type: ignore[misc]
            if not exists:
                with self._write_lock, self._index_lock:
                    cursor.execute(CREATE_HNSW)
        (has_fts,) = first_row(cursor.execute(
            "SELECT count(*) FROM duckdb_schemas() WHERE schema_name = 'fts_main_memories' "
            "AND database_name = current_database()"
        ))  # type: ignore[misc]
        (has_postings,) = first_row(cursor.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = ? "
            "AND database_name = current_database()", [POSTINGS_TABLE]
        ))  # type: ignore[misc]
        if not has_fts or not has_postings or self._text_index_out_of_date(cursor):
            self.refresh_text_index()
        else:
            self._text_index_stale = False

    def _text_index_out_of_date(self, cursor: duckdb.DuckDBPyConnection) -> bool:
        (missing,) = first_row(cursor.execute(
            "SELECT (SELECT count(*) FROM memories) <> (SELECT count(*) FROM fts_main_memories.docs)"
        ))  # type: ignore[misc]
        return bool(missing)

    def refresh_text_index(self) -> None:
        """Rebuild the BM25 index over every memory's content (~0.6 s per 100k memories)."""
        with self._write_lock:
            self._text_index_stale = False
            cursor = self._writable_cursor()
            cursor.execute("BEGIN TRANSACTION")
            try:
                cursor.execute("PRAGMA create_fts_index('memories', 'id', 'content', overwrite = 1)")
                cursor.execute(BUILD_POSTINGS_SQL)
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            self._text_generation += 1  # after the commit: see `_view_postings`
            self._load_stopwords(cursor)

    def _load_stopwords(self, cursor: duckdb.DuckDBPyConnection) -> None:
        rows = cursor.execute("SELECT sw FROM fts_main_memories.stopwords").fetchall()
        self._stopwords = frozenset(w for (w,) in rows)

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
        (rows,) = first_row(cursor.execute("SELECT count(*) FROM memory_vectors"))  # type: ignore[misc]
        if self._deletes_since_index_load < max(MIN_DELETES_BETWEEN_REBUILDS, rows // 4):
            return
        self._rebuild_vector_index(cursor)

    def _rebuild_vector_index(self, cursor: duckdb.DuckDBPyConnection) -> None:
        """A fresh HNSW index, without the tombstones deletes leave in the old one."""
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

    def _user_changed(self, user_id: str | None) -> None:
        """Forget cached counts, vectors and views of a user (None: of everyone) after a write.
        Inside `transaction()` the user is remembered and forgotten again after the commit."""
        if user_id is None:
            self._user_rows.clear()
            self._vector_cache.clear()
        else:
            self._user_rows.pop(user_id, None)
            self._vector_cache.pop(user_id, None)
        self._views.invalidate(user_id)
        if getattr(self._local, "in_transaction", False) and user_id is not None:
            self._local.written.add(user_id)

    def _rows_of(self, user_id: str) -> int:
        rows = self._user_rows.get(user_id)
        if rows is None:
            (rows,) = first_row(self._cursor().execute(
                "SELECT count(*) FROM memory_vectors WHERE user_id = ?", [user_id]
            ))  # type: ignore[misc]
            self._user_rows[user_id] = rows
        return rows

    def _user_vectors(self, user_id: str) -> _UserVectors:
        """All of a small user's vectors, cached until the user's next write. DuckDB cannot
        skip other users' rows when scanning the vector table (30 ms for a user of 1,000 in a
        store of 1M, measured); a cached (n, 384) matrix answers in well under 1 ms."""
        cached = self._vector_cache.get(user_id)
        if cached is not None:
            self._vector_cache.move_to_end(user_id)
            return cached
        ids, matrix = fetch_user_vectors(self._cursor(), user_id)
        cached = _UserVectors(ids, matrix, {memory_id: row for row, memory_id in enumerate(ids)})
        self._vector_cache[user_id] = cached
        while sum(len(v.ids) for v in self._vector_cache.values()) > VECTOR_CACHE_MAX_ROWS:
            self._vector_cache.popitem(last=False)
        return cached

    def _cached_view(self, user_id: str) -> UserView | None:
        """The user's RAM view if one is built (never inside a transaction: its own writes
        are not in any view). Building one is `MemoryStore._view`'s business."""
        if getattr(self._local, "in_transaction", False):
            return None
        return self._views.get(user_id)

    def vector_neighbours(self, user_id: str, embedding: np.ndarray, n: int) -> list[tuple[str, float]]:
        """The user's n memories (current or not) nearest to `embedding`: (id, cosine)."""
        if n <= 0:
            return []
        query = vector_param(embedding)
        view = self._cached_view(user_id)
        if view is not None and view.vectors is not None:
            return view.vectors.nearest(np.asarray(query, dtype=np.float32), n)
        user_rows = self._rows_of(user_id)
        if user_rows == 0:
            return []
        if user_rows <= EXACT_SCAN_MAX_ROWS or not self.has_vector_index:
            if user_rows <= VECTOR_CACHE_MAX_ROWS // 4:
                return self._user_vectors(user_id).nearest(np.asarray(query, dtype=np.float32), n)
            rows = self._cursor().execute(EXACT_SQL, [query, user_id, n]).fetchall()
            return [(i, float(s)) for i, s in rows]
        cursor = self._cursor()
        (total,) = first_row(cursor.execute("SELECT count(*) FROM memory_vectors"))  # type: ignore[misc]
        share = user_rows / max(total, 1)
        # The index's top rows hold about `share` of this user's: ask for enough of them.
        fetch = n if share >= 0.99 else max(n * self._overfetch, math.ceil(2 * n / share))
        with self._index_lock:
            rows = cursor.execute(HNSW_SQL, [query, user_id, min(fetch, MAX_OVERFETCH_ROWS)]).fetchall()
        if len(rows) < min(n, user_rows):  # the filtered index scan held too few of the user's
            rows = cursor.execute(EXACT_SQL, [query, user_id, n]).fetchall()
        rows.sort(key=lambda r: (-r[1], r[0]))
        return [(i, float(s)) for i, s in rows[:n]]

    def similarities(self, user_id: str, embedding: np.ndarray, memory_ids: Sequence[str]) -> dict[str, float]:
        if not memory_ids:
            return {}
        ids = list(dict.fromkeys(memory_ids))
        view = self._cached_view(user_id)
        if view is not None and view.vectors is not None:  # another user's id is not in its keys
            return view.vectors.similarities(np.asarray(vector_param(embedding), dtype=np.float32), ids)
        cached = self._vector_cache.get(user_id)
        if cached is not None:  # another user's id is simply not in this user's rows
            return cached.similarities(np.asarray(vector_param(embedding), dtype=np.float32), ids)
        # By primary key, the owner checked here (see `MemoryStore.get_many`).
        rows = self._cursor().execute(
            "SELECT id, user_id, array_cosine_similarity(embedding, ?::FLOAT[384]) FROM memory_vectors "
            f"WHERE id IN ({', '.join('?' * len(ids))})",
            [vector_param(embedding), *ids],
        ).fetchall()
        return {i: float(s) for i, owner, s in rows if owner == user_id}

    def text_matches(self, user_id: str, query: str, n: int) -> list[tuple[str, float]]:
        """BM25 over the text index: the user's n best (id, score). Rebuilds a stale index
        in the background; until then rows written since the last build are not seen."""
        if n <= 0 or not query.strip():
            return []
        if self._text_index_stale:
            self._refresh_text_index_soon()
        if not self._stopwords:
            try:
                self._load_stopwords(self._cursor())
            except duckdb.CatalogException:  # no text index yet (a read-only store of an old file)
                return []
        words = query_words(query, self._stopwords)
        if not words:
            return []
        try:
            in_ram = self._view_text_matches(user_id, words, n)
            if in_ram is not None:
                return in_ram
            rows = self._cursor().execute(BM25_SQL, [words, user_id, n]).fetchall()
        except duckdb.CatalogException:
            return []
        return [(i, float(s)) for i, s in rows]

    def _view_text_matches(self, user_id: str, words: list[str], n: int) -> list[tuple[str, float]] | None:
        """BM25 from the user's view's postings, or None when there are none as new as the text
        index (then the caller reads DuckDB, and the postings are reloaded in the background)."""
        view = self._cached_view(user_id)
        if view is None:
            return None
        generation = self._text_generation
        if view.postings is None or view.postings.text_generation != generation:
            self._reload_postings_soon(user_id, view)
            return None
        vocabulary = self._vocabulary
        if vocabulary is None or vocabulary.text_generation != generation:
            vocabulary = self._load_vocabulary(generation)
        stems = self._stem(words)
        terms = [vocabulary.terms[t] for t in dict.fromkeys(stems) if t in vocabulary.terms]
        return view.postings.top(terms, vocabulary.num_docs, vocabulary.avgdl, n)

    def _load_vocabulary(self, generation: int) -> _Vocabulary:
        """The text index's dictionary, read under `generation` (read first: a rebuild that
        commits meanwhile bumps it, and the next search reads the dictionary again)."""
        cursor = self._cursor()
        terms = {t: (termid, df) for t, termid, df in
                 cursor.execute("SELECT term, termid, df FROM fts_main_memories.dict").fetchall()}
        num_docs, avgdl = first_row(cursor.execute("SELECT num_docs, avgdl FROM fts_main_memories.stats"))  # type: ignore[misc]
        self._vocabulary = _Vocabulary(generation, terms, int(num_docs), float(avgdl or 1.0))
        return self._vocabulary

    def _stem(self, words: list[str]) -> list[str]:
        """Porter stems as the text index computes them (DuckDB's `stem`), remembered."""
        known = self._stems  # replaced, never cleared in place: other threads read it
        missing = [w for w in words if w not in known]
        if not missing:
            return [known[w] for w in words]
        fetched = dict(self._cursor().execute(
            "SELECT w, stem(w, 'porter') FROM unnest(?::VARCHAR[]) AS t(w)", [missing]
        ).fetchall())
        if len(known) > STEM_CACHE_MAX:
            self._stems = {}
        self._stems.update(fetched)
        return [fetched[w] if w in fetched else known[w] for w in words]

    def _reload_postings_soon(self, user_id: str, view: UserView) -> None:
        """Read the user's postings from the current text index into their view, off the
        request path."""
        if user_id in self._postings_loading or self._closed:
            return
        self._postings_loading.add(user_id)

        def run() -> None:
            try:
                generation = self._text_generation  # before the read: see refresh_text_index
                postings = load_postings(self._cursor(), user_id, generation)
                self._views.replace_view(user_id, view, replace(view, postings=postings))
            except Exception as exc:  # BM25 keeps reading DuckDB; the next search retries
                log.warning("postings_reload_failed", error=repr(exc))
            finally:
                self._postings_loading.discard(user_id)

        try:
            self._background.submit(run)
        except RuntimeError:  # shutting down
            self._postings_loading.discard(user_id)
