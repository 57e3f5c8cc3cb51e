"""The DuckDB memory store: memories with HNSW vector search, and the teacher log.

Threads: one DuckDB connection per store and one cursor per thread (cursors are
separate connections to the same database instance, so they share the loaded
extensions and see each other's committed writes). Writes are serialised by one
lock, matching DuckDB's single-writer model. HNSW index scans take the same lock:
with DuckDB 1.5.5's vss, an index scan running while another thread inserts into
the index crashes the process (SIGSEGV in usearch's search, measured: 4 searching
threads and 1 writer crashed every run; a reader/writer lock that let index scans
overlap each other still crashed 1 run in 10). Exact scans and plain reads do not
touch the index and run concurrently.

Deletes: vss keeps a tombstone in the index for every deleted row, and once they
fill its lookup table a DELETE spins forever (measured, insert+delete cycles: with
50 rows the hang came between the 70th and 80th delete, with 1,000 rows between
the 1,000th and 1,250th, with an empty table before the 200th; an UPDATE deletes
too, so rows are never updated; PRAGMA hnsw_compact_index corrupted the heap).
Reloading or rebuilding the index clears them, so `forget` rebuilds it after
max(16, rows // 4) deletes since it was last loaded or built.

Per-user search: DuckDB applies `WHERE user_id = ?` *after* the HNSW top-k, so a
filtered index scan can return fewer rows than asked, or none. `search` over-fetches
from the index and, when that yields fewer than k rows of the user, falls back to an
exact scan of that user's rows written so the planner cannot use the index.
"""

from __future__ import annotations

import json
import re
import threading
import unicodedata
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from hashlib import sha256
from pathlib import Path
from typing import Any, Protocol

import duckdb
import numpy as np
import pyarrow as pa

from memory.embed import Embedder
from memory.extensions import connect
from memory.migrations import (
    CREATE_HNSW_INDEX_SQL,
    HNSW_INDEX,
    apply_migrations,
    check_schema_current,
)

__all__ = [
    "Clock",
    "InteractionRecord",
    "Memory",
    "MemoryStore",
    "ReadOnlyStoreError",
    "StoreClosedError",
    "SystemClock",
    "content_hash",
]

EMBEDDING_DIM = 384
# Deletes allowed between HNSW rebuilds: max(this, rows // 4), well below the
# counts at which vss was seen to hang (module docstring).
MIN_DELETES_BETWEEN_REBUILDS = 16

_MEMORY_COLUMNS = "id, user_id, content, source, source_ref, created_at, updated_at"

# The only form the vss planner turns into HNSW_INDEX_SCAN: ORDER BY the metric's
# distance function, LIMIT. The WHERE is applied to the index's top rows.
HNSW_SEARCH_SQL = f"""
    SELECT {_MEMORY_COLUMNS}, 1 - distance AS score
    FROM (
        SELECT {_MEMORY_COLUMNS}, array_cosine_distance(embedding, ?::FLOAT[384]) AS distance
        FROM memories
        WHERE user_id = ?
        ORDER BY distance
        LIMIT ?
    )
    ORDER BY distance, id
"""

# Ordering by similarity DESC is not rewritten into an index scan: an exact scan.
EXACT_SEARCH_SQL = f"""
    SELECT {_MEMORY_COLUMNS}, array_cosine_similarity(embedding, ?::FLOAT[384]) AS score
    FROM memories
    WHERE user_id = ?
    ORDER BY score DESC, id
    LIMIT ?
"""

_SMALL_BATCH = 4  # rows; above this an interactions batch goes in as an Arrow table
_INTERACTION_COLUMNS = (
    "request_id",
    "user_id",
    "created_at",
    "model",
    "provider",
    "stream",
    "status_code",
    "error",
    "request_received",
    "request_sent",
    "response",
    "usage",
    "latency_ms",
    "ttft_ms",
)
_JSON_COLUMNS = frozenset({"request_received", "request_sent", "response", "usage"})


class StoreClosedError(RuntimeError):
    """The store was closed."""


class ReadOnlyStoreError(RuntimeError):
    """A write was attempted on a store opened read-only."""


class Clock(Protocol):
    def now(self) -> datetime:
        """Current time as a naive UTC datetime."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True, slots=True)
class Memory:
    id: str
    user_id: str
    content: str
    source: str
    source_ref: str | None
    created_at: datetime
    updated_at: datetime
    score: float | None = None  # cosine similarity when returned by search


@dataclass(frozen=True, slots=True)
class InteractionRecord:
    request_id: str
    user_id: str
    created_at: datetime
    model: str
    provider: str
    stream: bool
    status_code: int
    error: str | None
    request_received: dict
    request_sent: dict | None
    response: dict | None
    usage: dict | None
    latency_ms: float
    ttft_ms: float | None


_SPACE = re.compile(r"\s+")


def content_hash(content: str) -> str:
    """sha256 of content lower-cased, whitespace collapsed, trailing punctuation cut."""
    text = _SPACE.sub(" ", content.lower()).strip()
    end = len(text)
    while end and (text[end - 1].isspace() or unicodedata.category(text[end - 1])[0] == "P"):
        end -= 1
    return sha256(text[:end].encode()).hexdigest()


def _memory(row: tuple[Any, ...]) -> Memory:
    return Memory(*row)


def _vector_param(embedding: np.ndarray) -> list[float]:
    """A query or stored vector as a Python list: DuckDB converts lists ~3x faster
    than numpy arrays."""
    vector = np.asarray(embedding, dtype=np.float32).reshape(-1)
    if vector.shape != (EMBEDDING_DIM,):
        raise ValueError(f"embedding must have {EMBEDDING_DIM} values, got {vector.size}")
    if not np.all(np.isfinite(vector)) or not np.any(vector):
        raise ValueError("embedding must be finite and non-zero")
    return vector.tolist()


def _json_param(value: dict | None) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


class MemoryStore:
    """Build with `MemoryStore.open(...)`."""

    def __init__(
        self,
        conn: duckdb.DuckDBPyConnection,
        *,
        embedder: Embedder,
        clock: Clock,
        read_only: bool,
        overfetch: int,
        deletes_since_index_load: int = 0,
    ) -> None:
        self._conn = conn
        self._embedder = embedder
        self._clock = clock
        self._read_only = read_only
        self._overfetch = overfetch
        self._local = threading.local()
        self._cursors: weakref.WeakSet[duckdb.DuckDBPyConnection] = weakref.WeakSet()
        self._cursors_lock = threading.Lock()
        # Held by every write and every HNSW index scan (see the module docstring).
        self._index_lock = threading.Lock()
        self._closed = False
        self._deletes_since_index_load = deletes_since_index_load

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        embedder: Embedder,
        clock: Clock | None = None,
        read_only: bool = False,
        overfetch: int = 10,
    ) -> MemoryStore:
        """Open (creating if needed) the store at `path`, or ":memory:".

        Loads the vss/fts extensions and applies pending migrations; a read-only
        store refuses a database whose migrations are not all applied.
        `overfetch`: the HNSW scan fetches k * overfetch rows before the user filter.
        """
        if embedder.dim != EMBEDDING_DIM:
            raise ValueError(f"embedder.dim is {embedder.dim}; the store needs {EMBEDDING_DIM}")
        if overfetch < 1:
            raise ValueError("overfetch must be at least 1")
        clock = clock or SystemClock()
        # Replaying a WAL left by a crash re-applies its deletes to the loaded index,
        # so their tombstones are unknown: treat the delete budget as spent.
        unclean = str(path) != ":memory:" and Path(f"{path}.wal").exists()
        conn = connect(path, read_only=read_only)
        try:
            # Without it DuckDB refuses HNSW indexes in a database file. GLOBAL so
            # every cursor has it.
            conn.execute("SET GLOBAL hnsw_enable_experimental_persistence = true")
            if read_only:
                check_schema_current(conn)
            else:
                apply_migrations(conn, now=clock.now())
        except BaseException:
            conn.close()
            raise
        return cls(
            conn,
            embedder=embedder,
            clock=clock,
            read_only=read_only,
            overfetch=overfetch,
            deletes_since_index_load=10**9 if unclean else 0,
        )

    # -- connections -----------------------------------------------------------

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        """This thread's cursor."""
        if self._closed:
            raise StoreClosedError("memory store is closed")
        cursor = getattr(self._local, "cursor", None)
        if cursor is None:
            with self._cursors_lock:
                if self._closed:
                    raise StoreClosedError("memory store is closed")
                cursor = self._conn.cursor()
                self._cursors.add(cursor)
            self._local.cursor = cursor
        return cursor

    def _check_writable(self) -> None:
        if self._read_only:
            raise ReadOnlyStoreError("memory store was opened read-only")

    def _writable_cursor(self) -> duckdb.DuckDBPyConnection:
        self._check_writable()
        return self._cursor()

    def ping(self) -> None:
        """Raise if the database cannot answer a query."""
        self._cursor().execute("SELECT 1").fetchone()

    def close(self) -> None:
        """Close every cursor and the connection (checkpointing the file). Idempotent."""
        with self._index_lock, self._cursors_lock:
            if self._closed:
                return
            self._closed = True
            for cursor in list(self._cursors):
                cursor.close()
            self._conn.close()

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- memories: writes ------------------------------------------------------

    def add(
        self,
        user_id: str,
        content: str,
        *,
        source: str,
        source_ref: str | None = None,
        embedding: np.ndarray | None = None,
    ) -> tuple[Memory, bool]:
        """Store a memory; returns (memory, created).

        The same normalised content for the same user is not stored twice: the
        existing memory is returned unchanged with created=False.
        `embedding` defaults to the store's embedder applied to `content`.
        """
        content = content.strip()
        if not content:
            raise ValueError("memory content is empty")
        self._check_writable()
        digest = content_hash(content)
        # Embed outside the write lock (the model is slow), unless it is a duplicate.
        if embedding is None and not self._exists(user_id, digest):
            embedding = self._embedder.embed([content])[0]
        with self._index_lock:
            cursor = self._writable_cursor()
            now = self._clock.now()
            # A duplicate is returned as it is, not touched: with DuckDB 1.5.5's vss, repeated
            # UPDATEs of one row in a table with an HNSW index hang after about 190 of them
            # (measured). Rows of `memories` are written once and deleted, never updated.
            existing = cursor.execute(
                f"SELECT {_MEMORY_COLUMNS} FROM memories WHERE user_id = ? AND content_hash = ?",
                [user_id, digest],
            ).fetchone()
            if existing is not None:
                return _memory(existing), False
            if embedding is None:  # the duplicate we saw was forgotten meanwhile
                embedding = self._embedder.embed([content])[0]
            row = cursor.execute(
                f"INSERT INTO memories (id, user_id, content, content_hash, embedding, source, "
                f"source_ref, created_at, updated_at) VALUES (?, ?, ?, ?, ?::FLOAT[384], ?, ?, ?, ?) "
                f"RETURNING {_MEMORY_COLUMNS}",
                [
                    uuid.uuid4().hex,
                    user_id,
                    content,
                    digest,
                    _vector_param(embedding),
                    source,
                    source_ref,
                    now,
                    now,
                ],
            ).fetchone()
        assert row is not None
        return _memory(row), True

    def _exists(self, user_id: str, digest: str) -> bool:
        row = self._cursor().execute(
            "SELECT 1 FROM memories WHERE user_id = ? AND content_hash = ?", [user_id, digest]
        ).fetchone()
        return row is not None

    def bulk_add(
        self, user_id: str, contents: Sequence[str], embeddings: np.ndarray, *, source: str
    ) -> int:
        """Insert many memories at once through Arrow; returns how many were new.

        Contents duplicating each other or the user's stored memories are skipped.
        For imports and benchmarks: no embedder call, no updated_at touch.
        """
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)  # (N, 384)
        if vectors.shape != (len(contents), EMBEDDING_DIM):
            raise ValueError(
                f"embeddings shape {vectors.shape} does not match "
                f"({len(contents)}, {EMBEDDING_DIM})"
            )
        keep: dict[str, int] = {}
        for i, content in enumerate(contents):
            if content.strip():
                keep.setdefault(content_hash(content), i)
        if not keep:
            return 0
        rows = list(keep.values())
        now = self._clock.now()
        batch = pa.table(
            {
                "id": [uuid.uuid4().hex for _ in rows],
                "content": [contents[i].strip() for i in rows],
                "content_hash": list(keep),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(vectors[rows].reshape(-1)), EMBEDDING_DIM
                ),
            }
        )
        view = f"bulk_add_{uuid.uuid4().hex}"
        with self._index_lock:
            cursor = self._writable_cursor()
            cursor.register(view, batch)
            try:
                (inserted,) = cursor.execute(
                    f"""
                    INSERT INTO memories (id, user_id, content, content_hash, embedding,
                                          source, source_ref, created_at, updated_at)
                    SELECT b.id, $user_id, b.content, b.content_hash, b.embedding,
                           $source, NULL, $now, $now
                    FROM {view} AS b
                    WHERE NOT EXISTS (
                        SELECT 1 FROM memories AS m
                        WHERE m.user_id = $user_id AND m.content_hash = b.content_hash
                    )
                    """,
                    {"user_id": user_id, "source": source, "now": now},
                ).fetchone()
            finally:
                cursor.unregister(view)
        return int(inserted)

    def forget(self, user_id: str, memory_id: str) -> bool:
        """Delete a memory for good; only if it belongs to `user_id`.

        Every so often this also rebuilds the HNSW index (module docstring), which
        takes a few seconds per 10,000 memories.
        """
        with self._index_lock:
            cursor = self._writable_cursor()
            deleted = cursor.execute(
                "DELETE FROM memories WHERE id = ? AND user_id = ? RETURNING id",
                [memory_id, user_id],
            ).fetchall()
            if deleted:
                self._deletes_since_index_load += 1
                self._rebuild_index_if_due(cursor)
        return bool(deleted)

    def _rebuild_index_if_due(self, cursor: duckdb.DuckDBPyConnection) -> None:
        """Drop and rebuild the HNSW index when deletes may be near the vss hang."""
        (rows,) = cursor.execute("SELECT count(*) FROM memories").fetchone()  # type: ignore[misc]
        if self._deletes_since_index_load < max(MIN_DELETES_BETWEEN_REBUILDS, rows // 4):
            return
        cursor.execute("BEGIN TRANSACTION")
        try:
            cursor.execute(f"DROP INDEX IF EXISTS {HNSW_INDEX}")
            cursor.execute(CREATE_HNSW_INDEX_SQL)
            cursor.execute("COMMIT")
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        self._deletes_since_index_load = 0

    # -- memories: reads -------------------------------------------------------

    def search(
        self, user_id: str, embedding: np.ndarray, *, k: int = 5, min_score: float = 0.0
    ) -> list[Memory]:
        """The user's k memories most similar to `embedding`, best first.

        `score` is the cosine similarity; memories below `min_score` are dropped.
        """
        if k <= 0:
            return []
        query = _vector_param(embedding)
        cursor = self._cursor()
        with self._index_lock:
            rows = cursor.execute(
                HNSW_SEARCH_SQL, [query, user_id, k * self._overfetch]
            ).fetchall()
        if len(rows) < k:
            # The index's top rows held too few of this user's: scan them all.
            rows = cursor.execute(EXACT_SEARCH_SQL, [query, user_id, k]).fetchall()
        memories = (_memory(row) for row in rows[:k])
        return [m for m in memories if m.score is not None and m.score >= min_score]

    def search_text(
        self, user_id: str, query: str, *, k: int = 5, min_score: float = 0.0
    ) -> list[Memory]:
        """`search` with the store's embedder applied to `query`."""
        return self.search(user_id, self._embedder.embed([query])[0], k=k, min_score=min_score)

    def list(self, user_id: str, *, limit: int = 100, offset: int = 0) -> list[Memory]:
        """The user's memories, newest first."""
        rows = self._cursor().execute(
            f"SELECT {_MEMORY_COLUMNS} FROM memories WHERE user_id = ? "
            f"ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
            [user_id, limit, offset],
        ).fetchall()
        return [_memory(row) for row in rows]

    def get(self, user_id: str, memory_id: str) -> Memory | None:
        row = self._cursor().execute(
            f"SELECT {_MEMORY_COLUMNS} FROM memories WHERE id = ? AND user_id = ?",
            [memory_id, user_id],
        ).fetchone()
        return None if row is None else _memory(row)

    def count(self, user_id: str | None = None) -> int:
        if user_id is None:
            row = self._cursor().execute("SELECT count(*) FROM memories").fetchone()
        else:
            row = self._cursor().execute(
                "SELECT count(*) FROM memories WHERE user_id = ?", [user_id]
            ).fetchone()
        assert row is not None
        return int(row[0])

    # -- the teacher log -------------------------------------------------------

    def log_interactions(self, records: Sequence[InteractionRecord]) -> None:
        """Append interactions in one transaction.

        Request ids are unique by construction (the proxy makes them); a duplicate is an error.
        A handful of rows go in as parameters (~1 ms a row); a larger batch goes in as one
        Arrow table (~6 ms for 64 rows). ``INSERT OR IGNORE`` cost 3-15 ms a row and is not used.
        """
        if not records:
            return
        params = [
            [
                r.request_id,
                r.user_id,
                r.created_at,
                r.model,
                r.provider,
                r.stream,
                r.status_code,
                r.error,
                _json_param(r.request_received),
                _json_param(r.request_sent),
                _json_param(r.response),
                _json_param(r.usage),
                r.latency_ms,
                r.ttft_ms,
            ]
            for r in records
        ]
        columns = ", ".join(_INTERACTION_COLUMNS)
        with self._index_lock:
            cursor = self._writable_cursor()
            if len(params) <= _SMALL_BATCH:
                placeholders = ", ".join("?" for _ in _INTERACTION_COLUMNS)
                cursor.execute("BEGIN TRANSACTION")
                try:
                    cursor.executemany(f"INSERT INTO interactions ({columns}) VALUES ({placeholders})", params)
                    cursor.execute("COMMIT")
                except BaseException:
                    cursor.execute("ROLLBACK")
                    raise
                return
            batch = pa.table({name: [row[i] for row in params] for i, name in enumerate(_INTERACTION_COLUMNS)})
            cursor.register("interactions_batch", batch)
            try:
                cursor.execute(f"INSERT INTO interactions ({columns}) SELECT {columns} FROM interactions_batch")
            finally:
                cursor.unregister("interactions_batch")

    def interactions(self, *, user_id: str | None = None, limit: int = 100) -> list[dict]:
        """Logged interactions, newest first, JSON columns decoded to dicts."""
        where, params = ("WHERE user_id = ?", [user_id]) if user_id is not None else ("", [])
        rows = self._cursor().execute(
            f"SELECT {', '.join(_INTERACTION_COLUMNS)} FROM interactions {where} "
            f"ORDER BY created_at DESC, request_id LIMIT ?",
            [*params, limit],
        ).fetchall()
        return [
            {
                column: json.loads(value) if column in _JSON_COLUMNS and value is not None else value
                for column, value in zip(_INTERACTION_COLUMNS, row)
            }
            for row in rows
        ]
