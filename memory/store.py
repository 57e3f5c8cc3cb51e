"""The DuckDB memory store: memory entries, their vectors, links and sources, and the teacher log.

Tables (see `memory.migrations`): `memories` holds each MemoryEntry's fields and is updated in
place (access statistics, tiers, counts); `memory_vectors` holds the embeddings under an HNSW
index and is only inserted into and deleted from; `memory_links` and `memory_sources` hold the
relations and the provenance; `interactions` is the teacher log (`memory.interactions`).

Rules live beside the store, as functions over it: writing with dedup and supersession in
`memory.remember`, ranking in `memory.retrieve`, tiers, decay and expiry in `memory.tiers`,
export, import and wiping in `memory.ownership`. The store's methods named after user actions
(`add`, `search`, `forget`, ...) call them.

Threads: one DuckDB connection per store and one cursor per thread (cursors share the database
instance, its extensions and committed writes). `_write_lock` serialises writes (DuckDB has one
writer). `_index_lock` is also held by every HNSW scan and every write to `memory_vectors`: with
DuckDB 1.5.5's vss an index scan running while another thread inserts into the index crashes the
process (SIGSEGV in usearch, measured: 4 searching threads and 1 writer crashed every run).

vss traps this layout works around (measured on 1.5.5): every deleted row leaves a tombstone in
the index and once they fill its lookup table a DELETE spins forever (between the 70th and the
1,250th delete, depending on size), so the index is rebuilt after max(16, rows // 4) deletes; an
UPDATE is a delete too, hence vectors are never updated; a `WHERE user_id = ?` is applied after
the HNSW top-k, so per-user search over-fetches and falls back to an exact scan of the user's
rows. An encrypted database cannot hold an HNSW index at all (vss asserts on the encrypted
block size), so there vector search is always the exact scan.

The full-text (BM25) index of DuckDB's fts extension is a snapshot: rows written after it was
built are invisible to it. Writes mark it stale; `refresh_text_index` rebuilds it (the learner's
maintenance does, and a search finding it stale starts a rebuild in the background). Vector
search finds new rows meanwhile.
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import duckdb
import numpy as np
import pyarrow as pa
import structlog

from memory import remember as _remember
from memory import retrieve as _retrieve
from memory import tiers as _tiers
from memory.embed import Embedder
from memory.entry import (
    Confidence,
    MemoryEntry,
    MemorySource,
    MemoryType,
    Tier,
    TruthCategory,
)
from memory.extensions import ATTACHED_NAME, connect
from memory.interactions import InteractionLog
from memory.migrations import apply_migrations, check_schema_current
from memory.relations import content_hash

__all__ = [
    "EMBEDDING_DIM",
    "Clock",
    "Link",
    "MemoryStore",
    "ReadOnlyStoreError",
    "StoreClosedError",
    "SystemClock",
]

log = structlog.get_logger("memlane.store")

EMBEDDING_DIM = 384
MIN_DELETES_BETWEEN_REBUILDS = 16  # deletes allowed between HNSW rebuilds: max(this, rows // 4)
EXACT_SCAN_MAX_ROWS = 4096  # a user with at most this many vectors is searched exactly
MAX_OVERFETCH_ROWS = 4000  # the most rows one HNSW scan asks for before the user filter
HNSW_INDEX = "memory_vectors_hnsw"
_CREATE_HNSW = (
    f"CREATE INDEX {HNSW_INDEX} ON memory_vectors USING HNSW (embedding) WITH (metric = 'cosine')"
)

_ENTRY_COLUMNS = (
    "id, user_id, content, summary, content_hash, tier, truth_category, memory_type, "
    "confidence, source_reliability, recency, corroboration_count, contradiction_count, "
    "importance, tags, domains, entities, subject, relation, value, validated, valid_from, "
    "valid_to, recorded_at, superseded_by, supersedes, identity_since, expires_at, "
    "created_at, updated_at, last_accessed, access_count"
)
# Columns `update_entry` may set; everything else is fixed at insert.
_UPDATABLE = frozenset(
    {
        "content", "summary", "content_hash", "tier", "truth_category", "memory_type",
        "confidence", "source_reliability", "recency", "corroboration_count",
        "contradiction_count", "importance", "tags", "domains", "entities", "subject",
        "relation", "value", "validated", "valid_from", "valid_to", "superseded_by",
        "supersedes", "identity_since", "expires_at", "updated_at", "last_accessed",
        "access_count",
    }
)

# The only form the vss planner turns into HNSW_INDEX_SCAN: ORDER BY the metric's distance
# function, LIMIT. The WHERE is applied to the index's top rows.
_HNSW_SQL = """
    SELECT id, 1 - distance FROM (
        SELECT id, array_cosine_distance(embedding, ?::FLOAT[384]) AS distance
        FROM memory_vectors WHERE user_id = ? ORDER BY distance LIMIT ?
    )
"""
# Ordering by similarity DESC is never rewritten into an index scan: an exact scan.
_EXACT_SQL = """
    SELECT id, array_cosine_similarity(embedding, ?::FLOAT[384]) AS score
    FROM memory_vectors WHERE user_id = ? ORDER BY score DESC, id LIMIT ?
"""
# BM25 over the fts extension's tables, reading only the postings of the query's terms (the
# extension's match_bm25 macro scores every row: ~40-70 ms at 100k rows against a few ms).
# Query terms go through the index's own tokenizer settings: lower case, accents stripped,
# non-letters split, English stop words dropped, Porter stems. k1 = 1.2, b = 0.75.
_BM25_SQL = """
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
class Link:
    src_id: str
    dst_id: str
    kind: str  # related | supports | contradicts | supersedes | derived_from
    weight: float = 1.0


def vector_param(embedding: np.ndarray) -> list[float]:
    """A vector as a Python list (DuckDB converts lists ~3x faster than numpy arrays)."""
    vector = np.asarray(embedding, dtype=np.float32).reshape(-1)
    if vector.shape != (EMBEDDING_DIM,):
        raise ValueError(f"embedding must have {EMBEDDING_DIM} values, got {vector.size}")
    if not np.all(np.isfinite(vector)) or not np.any(vector):
        raise ValueError("embedding must be finite and non-zero")
    return vector.tolist()


def _entry(row: Sequence[Any]) -> MemoryEntry:
    (id_, user_id, content, summary, digest, tier, truth, mtype, overall, reliability, recency,
     corroborations, contradictions, importance, tags, domains, entities, subject, relation,
     value, validated, valid_from, valid_to, recorded_at, superseded_by, supersedes,
     identity_since, expires_at, created_at, updated_at, last_accessed, access_count) = row
    del identity_since  # kept in the table for the promotion rule
    return MemoryEntry(
        id=id_, user_id=user_id, content=content, summary=summary, content_hash=digest,
        tier=Tier(tier), truth_category=TruthCategory(truth), memory_type=MemoryType(mtype),
        confidence=Confidence(overall, reliability, recency, corroborations, contradictions),
        importance=importance, tags=tuple(tags), domains=tuple(domains),
        entities=tuple(entities), subject=subject, relation=relation, value=value,
        validated=validated, valid_from=valid_from, valid_to=valid_to, recorded_at=recorded_at,
        superseded_by=superseded_by, supersedes=supersedes, expires_at=expires_at,
        created_at=created_at, updated_at=updated_at, last_accessed=last_accessed,
        access_count=access_count,
    )


def new_memory_id() -> str:
    return uuid.uuid4().hex


class MemoryStore(InteractionLog):
    """Build with `MemoryStore.open(...)`."""

    def __init__(
        self,
        conn: duckdb.DuckDBPyConnection,
        *,
        embedder: Embedder,
        clock: Clock,
        read_only: bool,
        encrypted: bool,
        overfetch: int,
        tier_policy: _tiers.TierPolicy,
        weights: _retrieve.RetrievalWeights,
        deletes_since_index_load: int = 0,
    ) -> None:
        self._conn = conn
        self.embedder = embedder
        self.clock = clock
        self.tier_policy = tier_policy
        self.weights = weights
        self._read_only = read_only
        self.encrypted = encrypted
        self._overfetch = overfetch
        self._local = threading.local()
        self._cursors: weakref.WeakSet[duckdb.DuckDBPyConnection] = weakref.WeakSet()
        self._cursors_lock = threading.Lock()
        self._write_lock = threading.RLock()
        self._index_lock = threading.Lock()  # HNSW scans and memory_vectors writes
        self._closed = False
        self._deletes_since_index_load = deletes_since_index_load
        self._user_rows: dict[str, int] = {}
        self._text_index_stale = True
        self._background = concurrent.futures.ThreadPoolExecutor(1, "memlane-store")
        self._refreshing = False
        self.wipe_hooks: list[Callable[[str], None]] = []  # called with the user id on wipe

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        embedder: Embedder,
        clock: Clock | None = None,
        read_only: bool = False,
        overfetch: int = 10,
        encryption_key: str | None = None,
        tier_policy: _tiers.TierPolicy | None = None,
        weights: _retrieve.RetrievalWeights | None = None,
    ) -> MemoryStore:
        """Open (creating if needed) the store at `path`, or ":memory:".

        Loads the extensions, applies pending migrations (a read-only store refuses a database
        whose migrations are not all applied) and makes the derived indexes if missing.
        `encryption_key` encrypts the file (AES-GCM through DuckDB); the same key is needed
        to open it again. `overfetch`: an HNSW scan fetches k * overfetch rows before the
        user filter.
        """
        if embedder.dim != EMBEDDING_DIM:
            raise ValueError(f"embedder.dim is {embedder.dim}; the store needs {EMBEDDING_DIM}")
        if overfetch < 1:
            raise ValueError("overfetch must be at least 1")
        clock = clock or SystemClock()
        # Replaying a WAL left by a crash re-applies its deletes to the loaded index,
        # so their tombstones are unknown: treat the delete budget as spent.
        unclean = str(path) != ":memory:" and Path(f"{path}.wal").exists()
        conn = connect(path, read_only=read_only, encryption_key=encryption_key)
        try:
            conn.execute("SET GLOBAL hnsw_enable_experimental_persistence = true")
            if read_only:
                check_schema_current(conn)
            else:
                apply_migrations(conn, now=clock.now())
        except BaseException:
            conn.close()
            raise
        store = cls(
            conn,
            embedder=embedder,
            clock=clock,
            read_only=read_only,
            encrypted=encryption_key is not None,
            overfetch=overfetch,
            tier_policy=tier_policy or _tiers.TierPolicy(),
            weights=weights or _retrieve.RetrievalWeights(),
            deletes_since_index_load=10**9 if unclean else 0,
        )
        if not read_only:
            try:
                store._ensure_indexes()
            except BaseException:
                store.close()
                raise
        return store

    # -- connections -------------------------------------------------------------------

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
                if self.encrypted:  # the file is attached to an in-memory database
                    cursor.execute(f"USE {ATTACHED_NAME}")
                self._cursors.add(cursor)
            self._local.cursor = cursor
        return cursor

    def _writable_cursor(self) -> duckdb.DuckDBPyConnection:
        if self._read_only:
            raise ReadOnlyStoreError("memory store was opened read-only")
        return self._cursor()

    def check_writable(self) -> None:
        if self._read_only:
            raise ReadOnlyStoreError("memory store was opened read-only")

    def ping(self) -> None:
        """Raise if the database cannot answer a query."""
        self._cursor().execute("SELECT 1").fetchone()

    def close(self) -> None:
        """Finish background work, close every cursor and the connection. Idempotent."""
        self._background.shutdown(wait=True)
        with self._write_lock, self._index_lock, self._cursors_lock:
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
                    cursor.execute(_CREATE_HNSW)
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
            cursor.execute(_CREATE_HNSW)
            cursor.execute("COMMIT")
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        self._deletes_since_index_load = 0

    # -- writes: primitives used by remember, tiers and ownership -----------------------

    def insert_entry(
        self,
        entry: MemoryEntry,
        embedding: np.ndarray,
        sources: Iterable[MemorySource] = (),
        links: Iterable[Link] = (),
        *,
        identity_since: datetime | None = None,
    ) -> None:
        """Insert one memory with its vector, sources and links, in one transaction."""
        vector = vector_param(embedding)
        with self._write_lock, self._index_lock:
            cursor = self._writable_cursor()
            cursor.execute("BEGIN TRANSACTION")
            try:
                cursor.execute(
                    f"INSERT INTO memories ({_ENTRY_COLUMNS}) VALUES "
                    f"({', '.join('?' for _ in range(32))})",
                    _entry_params(entry, identity_since),
                )
                cursor.execute(
                    "INSERT INTO memory_vectors VALUES (?, ?, ?::FLOAT[384])",
                    [entry.id, entry.user_id, vector],
                )
                self._insert_sources(cursor, entry.user_id, entry.id, sources)
                self._insert_links(cursor, entry.user_id, links)
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            self._user_rows.pop(entry.user_id, None)
            self._text_index_stale = True

    def insert_many(
        self, entries: Sequence[MemoryEntry], embeddings: np.ndarray,
        sources: Sequence[Sequence[MemorySource]] | None = None,
    ) -> None:
        """Insert many memories through Arrow (imports, benchmarks): no dedup, no rules."""
        if not entries:
            return
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        if vectors.shape != (len(entries), EMBEDDING_DIM):
            raise ValueError(f"embeddings shape {vectors.shape} does not match the entries")
        names = [c.strip() for c in _ENTRY_COLUMNS.split(",")]
        rows = [_entry_params(e, None) for e in entries]
        table = pa.table({name: [row[i] for row in rows] for i, name in enumerate(names)})
        vec = pa.table({
            "id": [e.id for e in entries],
            "user_id": [e.user_id for e in entries],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), EMBEDDING_DIM),
        })
        src_rows = [
            (e.id, e.user_id, s.kind, s.ref, s.extractor, s.conversation_id, s.recorded_at or e.recorded_at)
            for e, entry_sources in zip(entries, sources or [()] * len(entries), strict=True)
            for s in entry_sources
        ]
        src_names = ("memory_id", "user_id", "kind", "ref", "extractor", "conversation_id", "recorded_at")
        src = pa.table(
            {name: pa.array([row[i] for row in src_rows], type=pa.timestamp("us") if name == "recorded_at" else pa.string())
             for i, name in enumerate(src_names)}
        )
        views = {name: f"import_{name}_{uuid.uuid4().hex}" for name in ("entries", "vectors", "sources")}
        with self._write_lock, self._index_lock:
            cursor = self._writable_cursor()
            for name, data in zip(views, (table, vec, src), strict=True):
                cursor.register(views[name], data)
            cursor.execute("BEGIN TRANSACTION")
            try:
                cursor.execute(f"INSERT INTO memories ({_ENTRY_COLUMNS}) SELECT {_ENTRY_COLUMNS} FROM {views['entries']}")
                cursor.execute(f"INSERT INTO memory_vectors SELECT id, user_id, embedding FROM {views['vectors']}")
                cursor.execute(f"INSERT INTO memory_sources SELECT * FROM {views['sources']}")
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            finally:
                for view in views.values():
                    cursor.unregister(view)
            self._user_rows.clear()
            self._text_index_stale = True

    def bulk_add(
        self, user_id: str, contents: Sequence[str], embeddings: np.ndarray, *,
        source: str = "import", tier: Tier = Tier.LONG_TERM,
    ) -> int:
        """Insert many memories at once, skipping contents already stored for the user (or
        repeated in the batch); returns how many were new. No corroboration, no supersession:
        for imports of plain sentences and for benchmarks."""
        vectors = np.asarray(embeddings, dtype=np.float32)
        if vectors.shape != (len(contents), EMBEDDING_DIM):
            raise ValueError(f"embeddings shape {vectors.shape} does not match ({len(contents)}, {EMBEDDING_DIM})")
        known = {row[0] for row in self._cursor().execute(
            "SELECT content_hash FROM memories WHERE user_id = ? AND valid_to IS NULL", [user_id]
        ).fetchall()}
        keep: dict[str, int] = {}
        for i, content in enumerate(contents):
            digest = content_hash(content)
            if content.strip() and digest not in known:
                keep.setdefault(digest, i)
        origin = _remember.source_from_label(source)
        entries = [
            _remember.build_entry(self, user_id, contents[i], origin, tier=tier) for i in keep.values()
        ]
        self.insert_many(entries, vectors[list(keep.values())], [[origin]] * len(entries))
        return len(entries)

    @staticmethod
    def _insert_sources(
        cursor: duckdb.DuckDBPyConnection, user_id: str, memory_id: str,
        sources: Iterable[MemorySource],
    ) -> None:
        rows = [
            [memory_id, user_id, s.kind, s.ref, s.extractor, s.conversation_id, s.recorded_at]
            for s in sources
        ]
        if rows:
            cursor.executemany("INSERT INTO memory_sources VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def _insert_links(
        self, cursor: duckdb.DuckDBPyConnection, user_id: str, links: Iterable[Link]
    ) -> None:
        now = self.clock.now()
        rows = [[user_id, k.src_id, k.dst_id, k.kind, k.weight, now] for k in links]
        if rows:
            cursor.executemany("INSERT INTO memory_links VALUES (?, ?, ?, ?, ?, ?)", rows)

    def add_source(self, user_id: str, memory_id: str, source: MemorySource) -> None:
        with self._write_lock:
            self._insert_sources(self._writable_cursor(), user_id, memory_id, [source])

    def add_links(self, user_id: str, links: Iterable[Link]) -> None:
        with self._write_lock:
            self._insert_links(self._writable_cursor(), user_id, links)

    def update_entry(self, user_id: str, memory_id: str, **changes: Any) -> bool:
        """Set columns of one of the user's memories; False if there is no such memory."""
        unknown = set(changes) - _UPDATABLE
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}")
        if not changes:
            return self.get(user_id, memory_id) is not None
        values = [v.value if isinstance(v, Tier | TruthCategory | MemoryType) else v
                  for v in changes.values()]
        values = [list(v) if isinstance(v, tuple) else v for v in values]
        assignments = ", ".join(f"{name} = ?" for name in changes)
        with self._write_lock:
            rows = self._writable_cursor().execute(
                f"UPDATE memories SET {assignments} WHERE id = ? AND user_id = ? RETURNING id",
                [*values, memory_id, user_id],
            ).fetchall()
            if "content" in changes:
                self._text_index_stale = True
        return bool(rows)

    def replace_vector(self, user_id: str, memory_id: str, embedding: np.ndarray) -> None:
        """New embedding for an edited memory: a delete and an insert, never an UPDATE."""
        vector = vector_param(embedding)
        with self._write_lock, self._index_lock:
            cursor = self._writable_cursor()
            cursor.execute("BEGIN TRANSACTION")
            try:
                cursor.execute("DELETE FROM memory_vectors WHERE id = ? AND user_id = ?", [memory_id, user_id])
                cursor.execute("INSERT INTO memory_vectors VALUES (?, ?, ?::FLOAT[384])", [memory_id, user_id, vector])
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            self._deletes_since_index_load += 1
            self._rebuild_vector_index_if_due(cursor)

    def record_access(self, user_id: str, memory_ids: Sequence[str]) -> None:
        """Count one retrieval of each memory (in the background: off the request path)."""
        if not memory_ids or self._read_only:
            return
        now = self.clock.now()

        def run() -> None:
            try:
                with self._write_lock:
                    self._writable_cursor().execute(
                        "UPDATE memories SET access_count = access_count + 1, last_accessed = ? "
                        "WHERE user_id = ? AND list_contains(?, id)",
                        [now, user_id, list(memory_ids)],
                    )
            except Exception as exc:
                log.warning("record_access_failed", error=repr(exc))

        try:
            self._background.submit(run)
        except RuntimeError:  # closing: access statistics are best effort
            pass

    def flush(self) -> None:
        """Wait for background writes (access statistics, index refresh) submitted so far."""
        self._background.submit(lambda: None).result()

    def delete_entries(self, user_id: str, memory_ids: Sequence[str]) -> list[str]:
        """Delete memories and every memory derived from them, from every table and index.

        Returns the ids deleted. The text index is rebuilt at once so that no deleted
        content stays searchable.
        """
        with self._write_lock, self._index_lock:
            cursor = self._writable_cursor()
            ids = self._with_derived(cursor, user_id, memory_ids)
            if not ids:
                return []
            cursor.execute("BEGIN TRANSACTION")
            try:
                for table, column in (("memories", "id"), ("memory_vectors", "id"),
                                      ("memory_sources", "memory_id")):
                    cursor.execute(
                        f"DELETE FROM {table} WHERE user_id = ? AND list_contains(?, {column})",
                        [user_id, ids],
                    )
                cursor.execute(
                    "DELETE FROM memory_links WHERE user_id = ? "
                    "AND (list_contains(?, src_id) OR list_contains(?, dst_id))",
                    [user_id, ids, ids],
                )
                cursor.execute(
                    "UPDATE memories SET superseded_by = NULL WHERE user_id = ? "
                    "AND list_contains(?, superseded_by)", [user_id, ids],
                )
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            self._user_rows.pop(user_id, None)
            self._deletes_since_index_load += len(ids)
            self._rebuild_vector_index_if_due(cursor)
        self.refresh_text_index()
        return ids

    @staticmethod
    def _with_derived(
        cursor: duckdb.DuckDBPyConnection, user_id: str, memory_ids: Sequence[str]
    ) -> list[str]:
        """The given ids that exist for the user, plus everything derived from them."""
        rows = cursor.execute(
            "SELECT id FROM memories WHERE user_id = ? AND list_contains(?, id)",
            [user_id, list(memory_ids)],
        ).fetchall()
        found = [r[0] for r in rows]
        seen, frontier = set(found), list(found)
        while frontier:
            rows = cursor.execute(
                "SELECT DISTINCT src_id FROM memory_links WHERE user_id = ? "
                "AND kind = 'derived_from' AND list_contains(?, dst_id)",
                [user_id, frontier],
            ).fetchall()
            frontier = [r[0] for r in rows if r[0] not in seen]
            seen.update(frontier)
            found.extend(frontier)
        return found

    def wipe_user(self, user_id: str) -> dict[str, int]:
        """Remove all of a user's memories, vectors, links, sources and logged interactions;
        then call every wipe hook (the personal model drops its adapters there)."""
        counts: dict[str, int] = {}
        with self._write_lock, self._index_lock:
            cursor = self._writable_cursor()
            cursor.execute("BEGIN TRANSACTION")
            try:
                for table in ("memories", "memory_vectors", "memory_sources", "memory_links",
                              "interactions"):
                    (n,) = cursor.execute(
                        f"SELECT count(*) FROM {table} WHERE user_id = ?", [user_id]
                    ).fetchone()  # type: ignore[misc]
                    cursor.execute(f"DELETE FROM {table} WHERE user_id = ?", [user_id])
                    counts[table] = int(n)
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            self._user_rows.pop(user_id, None)
            self._deletes_since_index_load += counts["memory_vectors"]
            self._rebuild_vector_index_if_due(cursor)
        self.refresh_text_index()
        for hook in self.wipe_hooks:
            hook(user_id)
        return counts

    # -- reads -------------------------------------------------------------------------

    def get(self, user_id: str, memory_id: str) -> MemoryEntry | None:
        found = self.get_many(user_id, [memory_id])
        return found[0] if found else None

    def get_many(
        self, user_id: str, memory_ids: Sequence[str], *, relations: bool = True
    ) -> list[MemoryEntry]:
        """The user's memories with these ids, in the given order; with their links and
        sources unless `relations` is false."""
        if not memory_ids:
            return []
        rows = self._cursor().execute(
            f"SELECT {_ENTRY_COLUMNS} FROM memories WHERE user_id = ? AND list_contains(?, id)",
            [user_id, list(memory_ids)],
        ).fetchall()
        by_id = {row[0]: _entry(row) for row in rows}
        ordered = [by_id[i] for i in dict.fromkeys(memory_ids) if i in by_id]
        return self.with_relations(user_id, ordered) if relations else ordered

    def list(
        self,
        user_id: str,
        *,
        limit: int = 100,
        offset: int = 0,
        tier: Tier | None = None,
        include_history: bool = False,
    ) -> list[MemoryEntry]:
        """The user's memories, newest first; current ones only unless `include_history`."""
        where = ["user_id = ?"]
        params: list[Any] = [user_id]
        if tier is not None:
            where.append("tier = ?")
            params.append(tier.value)
        if not include_history:
            where.append("valid_to IS NULL")
        rows = self._cursor().execute(
            f"SELECT {_ENTRY_COLUMNS} FROM memories WHERE {' AND '.join(where)} "
            f"ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
            [*params, limit, offset],
        ).fetchall()
        return self.with_relations(user_id, [_entry(row) for row in rows])

    def entries_where(self, sql_filter: str, params: Sequence[Any] = ()) -> list[MemoryEntry]:
        """Every memory matching a SQL condition on `memories` (for the maintenance passes)."""
        rows = self._cursor().execute(
            f"SELECT {_ENTRY_COLUMNS} FROM memories WHERE {sql_filter}", list(params)
        ).fetchall()
        return [_entry(row) for row in rows]

    def identity_since(self, memory_id: str) -> datetime | None:
        row = self._cursor().execute(
            "SELECT identity_since FROM memories WHERE id = ?", [memory_id]
        ).fetchone()
        return None if row is None else row[0]

    def count(self, user_id: str | None = None, *, include_history: bool = True) -> int:
        where, params = [], []
        if user_id is not None:
            where.append("user_id = ?")
            params.append(user_id)
        if not include_history:
            where.append("valid_to IS NULL")
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        row = self._cursor().execute(f"SELECT count(*) FROM memories {clause}", params).fetchone()
        assert row is not None
        return int(row[0])

    def current_by_hash(self, user_id: str, digest: str) -> MemoryEntry | None:
        rows = self._cursor().execute(
            f"SELECT {_ENTRY_COLUMNS} FROM memories WHERE user_id = ? AND content_hash = ? "
            f"AND valid_to IS NULL ORDER BY created_at LIMIT 1",
            [user_id, digest],
        ).fetchall()
        return _entry(rows[0]) if rows else None

    def current_by_relation(self, user_id: str, subject: str, relation: str) -> list[MemoryEntry]:
        rows = self._cursor().execute(
            f"SELECT {_ENTRY_COLUMNS} FROM memories WHERE user_id = ? AND subject = ? "
            f"AND relation = ? AND valid_to IS NULL ORDER BY created_at",
            [user_id, subject, relation],
        ).fetchall()
        return [_entry(row) for row in rows]

    def with_relations(self, user_id: str, entries: list[MemoryEntry]) -> list[MemoryEntry]:
        if not entries:
            return entries
        ids = [e.id for e in entries]
        cursor = self._cursor()
        links = cursor.execute(
            "SELECT src_id, dst_id, kind FROM memory_links WHERE user_id = ? "
            "AND (list_contains(?, src_id) OR list_contains(?, dst_id))",
            [user_id, ids, ids],
        ).fetchall()
        sources = cursor.execute(
            "SELECT memory_id, kind, ref, extractor, conversation_id, recorded_at "
            "FROM memory_sources WHERE user_id = ? AND list_contains(?, memory_id) "
            "ORDER BY recorded_at",
            [user_id, ids],
        ).fetchall()
        related: dict[str, dict[str, list[str]]] = {i: {} for i in ids}
        for src, dst, kind in links:
            for mine, other in ((src, dst), (dst, src)):
                if mine in related:
                    key = kind if kind in ("contradicts", "related") else (
                        "supports" if kind == "supports" and mine == src else "related")
                    related[mine].setdefault(key, []).append(other)
        by_memory: dict[str, list[MemorySource]] = {}
        for memory_id, kind, ref, extractor, conversation_id, recorded_at in sources:
            by_memory.setdefault(memory_id, []).append(
                MemorySource(kind, ref, extractor, conversation_id, recorded_at)
            )
        return [
            replace(
                e,
                related_memories=tuple(dict.fromkeys(related[e.id].get("related", []))),
                contradicts=tuple(dict.fromkeys(related[e.id].get("contradicts", []))),
                supports=tuple(dict.fromkeys(related[e.id].get("supports", []))),
                sources=tuple(by_memory.get(e.id, ())),
            )
            for e in entries
        ]

    def links_from(self, user_id: str, memory_ids: Sequence[str]) -> list[Link]:
        """Links touching these memories, as stored (src -> dst)."""
        rows = self._cursor().execute(
            "SELECT src_id, dst_id, kind, weight FROM memory_links WHERE user_id = ? "
            "AND (list_contains(?, src_id) OR list_contains(?, dst_id))",
            [user_id, list(memory_ids), list(memory_ids)],
        ).fetchall()
        return [Link(s, d, k, w) for s, d, k, w in rows]

    def conversation_neighbours(
        self, user_id: str, memory_ids: Sequence[str], *, limit: int
    ) -> list[tuple[str, str]]:
        """(seed id, neighbour id) for current memories learned in the same conversation."""
        rows = self._cursor().execute(
            """
            SELECT DISTINCT a.memory_id, b.memory_id
            FROM memory_sources AS a
            JOIN memory_sources AS b
              ON b.user_id = a.user_id AND b.conversation_id = a.conversation_id
             AND b.memory_id <> a.memory_id
            JOIN memories AS m ON m.id = b.memory_id AND m.valid_to IS NULL
            WHERE a.user_id = ? AND list_contains(?, a.memory_id) AND a.conversation_id IS NOT NULL
            LIMIT ?
            """,
            [user_id, list(memory_ids), limit],
        ).fetchall()
        return [(a, b) for a, b in rows]

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
                rows = cursor.execute(_HNSW_SQL, [query, user_id, fetch]).fetchall()
            if len(rows) >= min(n, user_rows):
                rows.sort(key=lambda r: (-r[1], r[0]))
                return [(i, float(s)) for i, s in rows[:n]]
        rows = cursor.execute(_EXACT_SQL, [query, user_id, n]).fetchall()
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
            rows = self._cursor().execute(_BM25_SQL, [query, user_id, n]).fetchall()
        except duckdb.CatalogException:  # not built yet (read-only store of an old file)
            return []
        return [(i, float(s)) for i, s in rows]

    # -- what users do: the rules live in remember / retrieve / tiers ------------------

    def add(
        self,
        user_id: str,
        content: str,
        *,
        source: str | MemorySource = "api",
        source_ref: str | None = None,
        embedding: np.ndarray | None = None,
        **fields: Any,
    ) -> tuple[MemoryEntry, bool]:
        """Remember `content` for the user (dedup, corroboration, supersession applied);
        returns (the memory now holding it, whether a new memory was created)."""
        if isinstance(source, str):
            source = _remember.source_from_label(source, source_ref)
        result = _remember.remember(self, user_id, content, source=source, embedding=embedding, **fields)
        return result.entry, result.created

    def search(
        self, user_id: str, embedding: np.ndarray, *, k: int = 5, min_score: float = 0.0,
        query: str | None = None, **options: Any,
    ) -> list[MemoryEntry]:
        """The user's k best current memories for a query, each with its `score` parts."""
        return _retrieve.retrieve(self, user_id, embedding, query=query, k=k, min_score=min_score, **options)

    def search_text(self, user_id: str, query: str, *, k: int = 5, min_score: float = 0.0, **options: Any) -> list[MemoryEntry]:
        """`search` with the store's embedder applied to `query`."""
        vector = self.embedder.embed([query])[0]
        return self.search(user_id, vector, k=k, min_score=min_score, query=query, **options)

    def forget(self, user_id: str, memory_id: str) -> bool:
        """Delete a memory, and what was derived from it, for good."""
        return bool(self.delete_entries(user_id, [memory_id]))

    def maintain(self) -> _tiers.MaintenanceReport:
        """Promote, expire and decay by the tier rules, then refresh the text index if stale."""
        report = _tiers.run_maintenance(self)
        if self._text_index_stale:
            self.refresh_text_index()
        return report

    # -- ownership helpers (memory.ownership: export and import) -------------------------

    def vectors_of(self, user_id: str, memory_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored embeddings of these memories of the user, by id."""
        if not memory_ids:
            return {}
        table = self._cursor().execute(
            "SELECT id, embedding FROM memory_vectors WHERE user_id = ? AND list_contains(?, id)",
            [user_id, list(memory_ids)],
        ).fetch_arrow_table()
        if table.num_rows == 0:
            return {}
        vectors = table.column("embedding").combine_chunks().flatten().to_numpy()
        vectors = vectors.reshape(-1, EMBEDDING_DIM).astype(np.float32, copy=False)
        return dict(zip(table.column("id").to_pylist(), vectors, strict=True))

    def identity_since_of(self, user_id: str, memory_ids: Sequence[str]) -> dict[str, datetime]:
        """`identity_since` of those memories that have one."""
        rows = self._cursor().execute(
            "SELECT id, identity_since FROM memories WHERE user_id = ? AND list_contains(?, id) "
            "AND identity_since IS NOT NULL",
            [user_id, list(memory_ids)],
        ).fetchall()
        return dict(rows)

    def links_with_times(self, user_id: str, src_ids: Sequence[str]) -> list[tuple[Link, datetime]]:
        """The user's links leaving these memories, as stored, with their creation times."""
        rows = self._cursor().execute(
            "SELECT src_id, dst_id, kind, weight, created_at FROM memory_links "
            "WHERE user_id = ? AND list_contains(?, src_id) ORDER BY src_id, created_at, dst_id, kind",
            [user_id, list(src_ids)],
        ).fetchall()
        return [(Link(s, d, k, w), t) for s, d, k, w, t in rows]

    def owners_of(self, memory_ids: Sequence[str]) -> dict[str, str]:
        """The user of each of these ids that exists (memory ids are unique across users)."""
        if not memory_ids:
            return {}
        rows = self._cursor().execute(
            "SELECT id, user_id FROM memories WHERE list_contains(?, id)", [list(memory_ids)]
        ).fetchall()
        return dict(rows)

    def restore_entries(
        self,
        entries: Sequence[MemoryEntry],
        embeddings: np.ndarray,
        *,
        identity_since: dict[str, datetime] | None = None,
        links: Sequence[tuple[Link, datetime]] = (),
    ) -> None:
        """Insert exported memories exactly as given (sources from `entry.sources`, links with
        their times; a link belongs to its src's user), in one transaction: no dedup, no rules."""
        if not entries:
            return
        since = identity_since or {}
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        if vectors.shape != (len(entries), EMBEDDING_DIM):
            raise ValueError(f"embeddings shape {vectors.shape} does not match the entries")
        users = {e.id: e.user_id for e in entries}
        names = [c.strip() for c in _ENTRY_COLUMNS.split(",")]
        rows = [_entry_params(e, since.get(e.id)) for e in entries]
        text, time = pa.string(), pa.timestamp("us")
        tables = {
            "memories": (pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)}),
                         f"({_ENTRY_COLUMNS}) SELECT {_ENTRY_COLUMNS}"),
            "memory_vectors": (pa.table({
                "id": [e.id for e in entries],
                "user_id": [e.user_id for e in entries],
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), EMBEDDING_DIM),
            }), "SELECT *"),
            "memory_sources": (pa.table({
                "memory_id": pa.array([e.id for e in entries for _ in e.sources], text),
                "user_id": pa.array([e.user_id for e in entries for _ in e.sources], text),
                "kind": pa.array([s.kind for e in entries for s in e.sources], text),
                "ref": pa.array([s.ref for e in entries for s in e.sources], text),
                "extractor": pa.array([s.extractor for e in entries for s in e.sources], text),
                "conversation_id": pa.array([s.conversation_id for e in entries for s in e.sources], text),
                "recorded_at": pa.array([s.recorded_at or e.recorded_at for e in entries for s in e.sources], time),
            }), "SELECT *"),
            "memory_links": (pa.table({
                "user_id": pa.array([users[k.src_id] for k, _ in links], text),
                "src_id": pa.array([k.src_id for k, _ in links], text),
                "dst_id": pa.array([k.dst_id for k, _ in links], text),
                "kind": pa.array([k.kind for k, _ in links], text),
                "weight": pa.array([k.weight for k, _ in links], pa.float64()),
                "created_at": pa.array([t for _, t in links], time),
            }), "SELECT *"),
        }
        views = {table: f"restore_{table}_{uuid.uuid4().hex}" for table in tables}
        with self._write_lock, self._index_lock:
            cursor = self._writable_cursor()
            for table, (data, _) in tables.items():
                cursor.register(views[table], data)
            cursor.execute("BEGIN TRANSACTION")
            try:
                for table, (_, select) in tables.items():
                    cursor.execute(f"INSERT INTO {table} {select} FROM {views[table]}")
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            finally:
                for view in views.values():
                    cursor.unregister(view)
            self._user_rows.clear()
            self._text_index_stale = True


def _entry_params(entry: MemoryEntry, identity_since: datetime | None) -> list[Any]:
    c = entry.confidence
    return [
        entry.id, entry.user_id, entry.content, entry.summary, entry.content_hash,
        entry.tier.value, entry.truth_category.value, entry.memory_type.value,
        c.overall, c.source_reliability, c.recency, c.corroboration_count, c.contradiction_count,
        entry.importance, list(entry.tags), list(entry.domains), list(entry.entities),
        entry.subject, entry.relation, entry.value, entry.validated, entry.valid_from,
        entry.valid_to, entry.recorded_at, entry.superseded_by, entry.supersedes,
        identity_since, entry.expires_at, entry.created_at, entry.updated_at,
        entry.last_accessed, entry.access_count,
    ]

