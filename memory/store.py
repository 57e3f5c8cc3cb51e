"""The DuckDB memory store: memory entries, their vectors, links and sources, and the teacher log.

Tables (see `memory.migrations`): `memories` holds each MemoryEntry's fields and is updated in
place (access statistics, tiers, counts); `memory_vectors` holds the embeddings under an HNSW
index and is only inserted into and deleted from; `memory_links` and `memory_sources` hold the
relations and the provenance; `interactions` is the teacher log (`memory.interactions`);
`feedback` and `domain_activations` hold the user's ratings of answers and the knowledge domains
their memories and retrievals touch (`memory.feedback`, `memory.domains`).

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
import contextlib
import functools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import duckdb
import numpy as np
import structlog

from memory import indexes as _indexes
from memory import remember as _remember
from memory import retrieve as _retrieve
from memory import tiers as _tiers
from memory.access import AccessBatch, AccessBuffer
from memory.domains import DomainActivations, domains_of
from memory.embed import Embedder
from memory.entry import (
    MemoryEntry,
    MemorySource,
    MemoryType,
    Tier,
    TruthCategory,
)
from memory.extensions import ATTACHED_NAME, connect
from memory.feedback import FeedbackLog
from memory.indexes import IndexedSearch, fetch_user_vectors
from memory.interactions import InteractionLog
from memory.jobs import JobQueue
from memory.migrations import apply_migrations, check_schema_current
from memory.relations import content_hash
from memory.restore import RestoreQueries
from memory.rows import (
    first_row,
    EMBEDDING_DIM,
    ENTRY_COLUMNS,
    UPDATABLE,
    Link,
    entry_from_row,
    entry_params,
    vector_param,
)
from memory.views import VIEW_CACHE_MAX_ROWS, BuildCancelled, UserView, ViewCache, load_view

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

# The learner's done jobs are kept this long for inspection (`GET /v1/learner/jobs/{id}`).
DONE_JOBS_KEPT = timedelta(hours=1)


def _connect(
    path: str | Path, *, read_only: bool, encryption_key: str | None
) -> duckdb.DuckDBPyConnection:
    conn = connect(path, read_only=read_only, encryption_key=encryption_key)
    try:
        conn.execute("SET GLOBAL hnsw_enable_experimental_persistence = true")
    except BaseException:
        conn.close()
        raise
    return conn


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


class MemoryStore(IndexedSearch, RestoreQueries, InteractionLog, JobQueue, FeedbackLog, DomainActivations):
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
        view_rows: int = VIEW_CACHE_MAX_ROWS,
        done_jobs_kept: timedelta | None = DONE_JOBS_KEPT,
    ) -> None:
        self._conn = conn
        self.done_jobs_kept = done_jobs_kept
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
        # `recover` reopens the database after DuckDB invalidated it; every thread's cursor
        # made before that (an older `_generation`) is replaced on its next use.
        self._reconnect: Callable[[], duckdb.DuckDBPyConnection] | None = None
        self._generation = 0
        self._recovering = threading.Lock()
        self._recovery_pending = False
        self._reconnect_failed = False
        self.recoveries = 0  # times the database was reopened
        self._deletes_since_index_load = deletes_since_index_load
        self._user_rows: dict[str, int] = {}
        self._vector_cache: OrderedDict[str, Any] = OrderedDict()
        self._stopwords: frozenset[str] = frozenset()
        self._text_index_stale = True
        self._background = concurrent.futures.ThreadPoolExecutor(1, "memlane-store")
        # Views of large users take tens of seconds to build: not in the queue of index
        # refreshes and access writes.
        self._view_builder = concurrent.futures.ThreadPoolExecutor(1, "memlane-views")
        self._views = ViewCache(max_rows=view_rows)  # users' memories in RAM (memory.views)
        self._text_generation = 0
        self._closing = False
        self._vocabulary = None
        self._stems: dict[str, str] = {}
        self._postings_loading: set[str] = set()
        self._access = AccessBuffer(self._background.submit, self._write_access)  # memory.access
        self._refreshing = False
        self.wipe_hooks: list[Callable[[str], None]] = []  # called with the user id on wipe
        # called with the user id and the ids deleted (the personal model marks adapters stale there)
        self.delete_hooks: list[Callable[[str, list[str]], None]] = []

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
        view_rows: int = VIEW_CACHE_MAX_ROWS,
        done_jobs_kept: timedelta | None = DONE_JOBS_KEPT,
    ) -> MemoryStore:
        """Open (creating if needed) the store at `path`, or ":memory:".

        Loads the extensions, applies pending migrations (a read-only store refuses a database
        whose migrations are not all applied) and makes the derived indexes if missing.
        `encryption_key` encrypts the file (AES-GCM through DuckDB); the same key is needed
        to open it again. `view_rows`: memories held in RAM views across users (a user with
        more is read from DuckDB; 0: no views). `done_jobs_kept`: how long `maintain()` keeps the
        learner's done jobs (None: for ever). `overfetch`: an HNSW scan fetches k * overfetch rows before the
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
        reconnect = functools.partial(_connect, path, read_only=read_only, encryption_key=encryption_key)
        conn = reconnect()
        try:
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
            view_rows=view_rows,
            done_jobs_kept=done_jobs_kept,
        )
        if str(path) != ":memory:":  # an in-memory database is gone with its connection
            store._reconnect = reconnect
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
        if cursor is None or self._local.generation != self._generation:
            with self._cursors_lock:
                if self._closed:
                    raise StoreClosedError("memory store is closed")
                cursor = self._new_cursor()
                self._cursors.add(cursor)
                self._local.generation = self._generation
            self._local.cursor = cursor
        return cursor

    def _new_cursor(self) -> duckdb.DuckDBPyConnection:
        cursor = self._conn.cursor()
        if self.encrypted:  # the file is attached to an in-memory database
            cursor.execute(f"USE {ATTACHED_NAME}")
        return cursor

    def _writable_cursor(self) -> duckdb.DuckDBPyConnection:
        if self._read_only:
            raise ReadOnlyStoreError("memory store was opened read-only")
        return self._cursor()

    @contextlib.contextmanager
    def transaction(self, *, users: Sequence[str] = ()) -> Iterator[duckdb.DuckDBPyConnection]:
        """One transaction for several writes on this thread (the learner applies a job's
        memories and marks it done atomically). Writes inside it (`insert_entry`,
        `log_interactions`, ...) join it instead of opening their own; the write lock is held
        throughout. `users`: whose cached vectors to drop once it ends."""
        with self._write_lock:
            cursor = self._writable_cursor()
            if getattr(self._local, "in_transaction", False):
                yield cursor
                return
            cursor.execute("BEGIN TRANSACTION")
            self._local.in_transaction = True
            self._local.written = set()  # users whose caches `_user_changed` dropped inside it
            self._local.after_commit = []  # `_after_commit` actions
            try:
                yield cursor
                with self._index_lock:  # the commit merges new vectors into the HNSW index
                    cursor.execute("COMMIT")
            except BaseException:
                with self._index_lock:
                    cursor.execute("ROLLBACK")
                raise
            finally:
                self._local.in_transaction = False
                # Again after the commit: a cache rebuilt meanwhile read the old rows.
                for user_id in {*users, *self._local.written}:
                    self._user_changed(user_id)
            for action in self._local.after_commit:
                action()

    @contextlib.contextmanager
    def _joined_transaction(self, cursor: duckdb.DuckDBPyConnection) -> Iterator[None]:
        """BEGIN/COMMIT around a write, unless it runs inside `transaction()`."""
        if getattr(self._local, "in_transaction", False):
            yield
            return
        cursor.execute("BEGIN TRANSACTION")
        try:
            yield
            cursor.execute("COMMIT")
        except BaseException:
            cursor.execute("ROLLBACK")
            raise

    def check_writable(self) -> None:
        if self._read_only:
            raise ReadOnlyStoreError("memory store was opened read-only")

    def ping(self) -> None:
        """Raise if the database cannot answer a query."""
        first_row(self._cursor().execute("SELECT 1"))

    # -- recovery after a fatal DuckDB error ---------------------------------------------

    def recover(self) -> bool:
        """Reopen the database if DuckDB has invalidated it; True if it did.

        After a fatal error (a checkpoint that could not write its file, an out-of-memory error
        inside an index insert) DuckDB refuses every further query on the database until it is
        opened again. What was committed before is on disk: reopening replays the WAL. Waits
        for running writes; an in-memory store is never reopened (its data went with it)."""
        if self._reconnect is None or self._closing:
            return False
        with self._recovering:
            if not self._invalidated():
                return False
            with self._write_lock, self._index_lock, self._cursors_lock:
                if self._closed:
                    return False
                for cursor in list(self._cursors):
                    with contextlib.suppress(duckdb.Error):
                        cursor.close()
                with contextlib.suppress(duckdb.Error):
                    self._conn.close()  # the last reference: DuckDB lets go of the file
                self._reconnect_failed = True  # until the new connection is open
                self._conn = self._reconnect()
                self._reconnect_failed = False
                self._generation += 1
                self._deletes_since_index_load = 10**9  # the WAL replay's deletes: tombstones unknown
                self._vocabulary = None
            self._text_index_stale = True
            self._user_changed(None)
            self.recoveries += 1
        log.warning("store_reopened", recoveries=self.recoveries)
        return True

    def recover_soon(self, error: BaseException) -> None:
        """Start `recover` in the background if `error` is DuckDB saying the database is
        invalidated (callers pass whatever a store call raised)."""
        if not isinstance(error, duckdb.FatalException | duckdb.ConnectionException) or self._reconnect is None:
            return
        if self._recovery_pending or self._closing:
            return
        self._recovery_pending = True

        def run() -> None:
            try:
                self.recover()
            except (duckdb.Error, OSError) as exc:  # the next failing call tries again
                log.error("store_reopen_failed", error=repr(exc))
            finally:
                self._recovery_pending = False

        try:
            self._background.submit(run)
        except RuntimeError:  # shutting down
            self._recovery_pending = False

    def _invalidated(self) -> bool:
        """Whether the database refuses queries with DuckDB's fatal error (or a reopening failed)."""
        if self._reconnect_failed:
            return True
        try:
            with self._cursors_lock:
                probe = self._new_cursor()
            try:
                first_row(probe.execute("SELECT 1"))
            finally:
                probe.close()
        except duckdb.FatalException:
            return True
        return False

    def close(self) -> None:
        """Finish background work, close every cursor and the connection. Idempotent."""
        self._closing = True
        if not self._closed:
            self._access.drain()
        self._view_builder.shutdown(wait=True, cancel_futures=True)
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
            with self._joined_transaction(cursor):
                cursor.execute(
                    f"INSERT INTO memories ({ENTRY_COLUMNS}) VALUES "
                    f"({', '.join('?' for _ in ENTRY_COLUMNS.split(','))})",
                    entry_params(entry, identity_since),
                )
                cursor.execute(
                    "INSERT INTO memory_vectors VALUES (?, ?, ?::FLOAT[384])",
                    [entry.id, entry.user_id, vector],
                )
                self._insert_sources(cursor, entry.user_id, entry.id, sources)
                self._insert_links(cursor, entry.user_id, links)
                self.record_domains(entry.user_id, domains_of(entry.domains, entry.content), "memory")
            self._user_changed(entry.user_id)
            self._text_index_stale = True

    def insert_many(
        self, entries: Sequence[MemoryEntry], embeddings: np.ndarray,
        sources: Sequence[Sequence[MemorySource]] | None = None,
    ) -> None:
        """Insert many memories through Arrow (imports, benchmarks): no dedup, no rules.
        `sources[i]`, when given, replaces `entries[i].sources`."""
        if sources is not None:
            entries = [replace(e, sources=tuple(s)) for e, s in zip(entries, sources, strict=True)]
        self.restore_entries(entries, embeddings)

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
            self._entries_changed(user_id)

    def add_links(self, user_id: str, links: Iterable[Link]) -> None:
        with self._write_lock:
            self._insert_links(self._writable_cursor(), user_id, links)
            self._entries_changed(user_id)

    def update_entry(self, user_id: str, memory_id: str, **changes: Any) -> bool:
        """Set columns of one of the user's memories; False if there is no such memory."""
        unknown = set(changes) - UPDATABLE
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}")
        if not changes:
            return self.get(user_id, memory_id) is not None
        values = [v.value if isinstance(v, Tier | TruthCategory | MemoryType) else v
                  for v in changes.values()]
        values = [list(v) if isinstance(v, tuple) else v for v in values]
        assignments = ", ".join(f"{name} = ?" for name in changes)
        with self._write_lock:
            cursor = self._writable_cursor()
            # By primary key, the owner checked first: `AND user_id = ?` in the UPDATE made it a
            # scan of the user's rows (7 ms against 2 ms at 10k; maintenance updates thousands).
            owner = first_row(cursor.execute("SELECT user_id FROM memories WHERE id = ?", [memory_id]))
            if owner is None or owner[0] != user_id:
                return False
            cursor.execute(f"UPDATE memories SET {assignments} WHERE id = ?", [*values, memory_id])
            if "content" in changes:
                self._text_index_stale = True
            self._entries_changed(user_id)
        return True

    def set_recency_where(self, expression: str, params: Sequence[Any], *, min_change: float) -> list[str]:
        """Set `recency` of every current memory to a SQL `expression` of its row where that moves
        it by more than `min_change`, in one UPDATE; the ids it changed. The users' views are
        patched, not dropped, once the change is committed."""
        with self._write_lock:
            cursor = self._writable_cursor()
            rows = cursor.execute(
                f"UPDATE memories SET recency = {expression} "
                f"WHERE valid_to IS NULL AND abs({expression} - recency) > ? RETURNING user_id, id, recency",
                [*params, *params, min_change],
            ).fetchall()
            changes: dict[str, dict[str, dict[str, float]]] = {}
            for user_id, memory_id, factor in rows:
                changes.setdefault(user_id, {})[memory_id] = {"recency": factor}
            if changes:
                self._after_commit(functools.partial(self._views.patch_scores, changes))
        return [memory_id for _, memory_id, _ in rows]

    def set_importance(self, user_id: str, values: dict[str, float]) -> list[str]:
        """New importance for some of the user's memories (id -> value), in one UPDATE; the ids
        it changed. Like recency, a score: the user's view is patched, not dropped."""
        if not values:
            return []
        with self._write_lock:
            cursor = self._writable_cursor()
            rows = cursor.execute(
                "UPDATE memories SET importance = a.v FROM (SELECT unnest($2::VARCHAR[]) AS id, "
                "unnest($3::DOUBLE[]) AS v) AS a WHERE memories.id = a.id AND memories.user_id = $1 "
                "RETURNING memories.id, memories.importance",
                [user_id, list(values), list(values.values())],
            ).fetchall()
            if rows:
                changes = {user_id: {memory_id: {"importance": value} for memory_id, value in rows}}
                self._after_commit(functools.partial(self._views.patch_scores, changes))
        return [memory_id for memory_id, _ in rows]

    def _after_commit(self, action: Callable[[], None]) -> None:
        """Run `action` now, or when the enclosing `transaction()` commits (never on a rollback)."""
        if getattr(self._local, "in_transaction", False):
            self._local.after_commit.append(action)
        else:
            action()

    def _entries_changed(self, user_id: str) -> None:
        """A write to the user's rows that leaves their vectors alone: drop their view (again
        after the commit when inside `transaction()`)."""
        self._views.invalidate(user_id)
        if getattr(self._local, "in_transaction", False):
            self._local.written.add(user_id)

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
            self._user_changed(user_id)

    def record_access(self, user_id: str, memory_ids: Sequence[str]) -> None:
        """Count one retrieval of each memory: buffered, written in batches off the request
        path (`memory.access`); `flush()` writes what is pending."""
        if memory_ids and not self._read_only:
            self._access.add(user_id, memory_ids, self.clock.now())

    def _write_access(self, batch: AccessBatch, at: datetime) -> None:
        """One UPDATE for a batch of retrievals, and the domains they touched."""
        users, ids, counts = zip(*((u, i, n) for u, per in batch.items() for i, n in per.items()), strict=True)
        try:
            with self._write_lock:
                cursor = self._writable_cursor()
                cursor.execute(
                    "UPDATE memories SET access_count = memories.access_count + a.n, last_accessed = $1 "
                    "FROM (SELECT unnest($2::VARCHAR[]) AS user_id, unnest($3::VARCHAR[]) AS id, "
                    "unnest($4::BIGINT[]) AS n) AS a "
                    "WHERE memories.id = a.id AND memories.user_id = a.user_id",
                    [at, list(users), list(ids), list(counts)],
                )
                self.record_retrieved_domains(batch)
            self._views.patch_access(batch.items(), at)
        except Exception as exc:  # statistics: never worth failing a request or the store thread
            log.warning("record_access_failed", error=repr(exc))

    def flush(self) -> None:
        """Write pending access statistics and wait for background work submitted so far
        (writes, index refreshes, view builds)."""
        self._view_builder.submit(lambda: None).result()
        self._background.submit(self._access.drain).result()

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
            self._user_changed(user_id)
            self._views.drop_previous(user_id)
            self._deletes_since_index_load += len(ids)
            self._rebuild_vector_index_if_due(cursor)
        self.refresh_text_index()
        for hook in self.delete_hooks:
            hook(user_id, ids)
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
                              "interactions", "learner_jobs", "learner_users", "training_requests",
                              "feedback", "domain_activations"):
                    (n,) = first_row(cursor.execute(
                        f"SELECT count(*) FROM {table} WHERE user_id = ?", [user_id]
                    ))  # type: ignore[misc]
                    cursor.execute(f"DELETE FROM {table} WHERE user_id = ?", [user_id])
                    counts[table] = int(n)
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            self._user_changed(user_id)
            self._views.drop_previous(user_id)
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
        view = None if relations else self._view(user_id)
        if view is not None:
            return view.get_many(memory_ids)
        # `id IN (?, ...)` is answered from the primary-key index; adding `user_id = ?` to the
        # SQL turns it into a scan of the user's rows (measured 2 ms against 20 ms at 100k),
        # so the owner is checked here.
        ids = list(dict.fromkeys(memory_ids))
        rows = self._cursor().execute(
            f"SELECT {ENTRY_COLUMNS} FROM memories WHERE id IN ({', '.join('?' * len(ids))})", ids
        ).fetchall()
        by_id = {row[0]: entry_from_row(row) for row in rows if row[1] == user_id}
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
            f"SELECT {ENTRY_COLUMNS} FROM memories WHERE {' AND '.join(where)} "
            f"ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
            [*params, limit, offset],
        ).fetchall()
        return self.with_relations(user_id, [entry_from_row(row) for row in rows])

    def entries_where(self, sql_filter: str, params: Sequence[Any] = ()) -> list[MemoryEntry]:
        """Every memory matching a SQL condition on `memories` (for the maintenance passes)."""
        rows = self._cursor().execute(
            f"SELECT {ENTRY_COLUMNS} FROM memories WHERE {sql_filter}", list(params)
        ).fetchall()
        return [entry_from_row(row) for row in rows]

    def current_entries(self, user_id: str) -> list[MemoryEntry]:
        """The user's current memories, oldest first (without links and sources): from the
        user's RAM view when there is one (no query, no conversion), else from DuckDB."""
        view = self._view(user_id)
        if view is not None:
            return sorted((e for e in view.entries.values() if e.valid_to is None), key=lambda e: (e.created_at, e.id))
        return self.entries_where("user_id = ? AND valid_to IS NULL ORDER BY created_at, id", [user_id])

    def current_ids(self, user_id: str, *, updated_since: datetime | None = None) -> list[str]:
        """Ids of the user's current memories (those updated at or after `updated_since`)."""
        where, params = "user_id = ? AND valid_to IS NULL", [user_id]
        if updated_since is not None:
            where, params = f"{where} AND updated_at >= ?", [user_id, updated_since]
        return [row[0] for row in self._cursor().execute(f"SELECT id FROM memories WHERE {where}", params).fetchall()]

    def identity_since(self, memory_id: str) -> datetime | None:
        row = first_row(self._cursor().execute(
            "SELECT identity_since FROM memories WHERE id = ?", [memory_id]
        ))
        return None if row is None else row[0]

    def count(self, user_id: str | None = None, *, include_history: bool = True) -> int:
        where, params = [], []
        if user_id is not None:
            where.append("user_id = ?")
            params.append(user_id)
        if not include_history:
            where.append("valid_to IS NULL")
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        row = first_row(self._cursor().execute(f"SELECT count(*) FROM memories {clause}", params))
        assert row is not None
        return int(row[0])

    def current_by_hash(self, user_id: str, digest: str) -> MemoryEntry | None:
        rows = self._cursor().execute(
            f"SELECT {ENTRY_COLUMNS} FROM memories WHERE user_id = ? AND content_hash = ? "
            f"AND valid_to IS NULL ORDER BY created_at LIMIT 1",
            [user_id, digest],
        ).fetchall()
        return entry_from_row(rows[0]) if rows else None

    def current_by_relation(self, user_id: str, subject: str, relation: str) -> list[MemoryEntry]:
        rows = self._cursor().execute(
            f"SELECT {ENTRY_COLUMNS} FROM memories WHERE user_id = ? AND subject = ? "
            f"AND relation = ? AND valid_to IS NULL ORDER BY created_at",
            [user_id, subject, relation],
        ).fetchall()
        return [entry_from_row(row) for row in rows]

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
        view = self._view(user_id)
        if view is not None:
            return view.links_from(memory_ids)
        rows = self._cursor().execute(
            "SELECT src_id, dst_id, kind, weight FROM memory_links WHERE user_id = ? "
            "AND (list_contains(?, src_id) OR list_contains(?, dst_id))",
            [user_id, list(memory_ids), list(memory_ids)],
        ).fetchall()
        return [Link(s, d, k, w) for s, d, k, w in rows]

    def conversation_neighbours(
        self, user_id: str, memory_ids: Sequence[str], *, limit: int
    ) -> list[tuple[str, str, int]]:
        """(seed id, neighbour id, the seed's neighbour count) for current memories learned in
        the same conversation; the count is taken before `limit` cuts the rows."""
        view = self._view(user_id)
        if view is not None:
            return view.conversation_neighbours(memory_ids, limit)
        rows = self._cursor().execute(
            """
            SELECT seed, other, COUNT(*) OVER (PARTITION BY seed)
            FROM (
                SELECT DISTINCT a.memory_id AS seed, b.memory_id AS other
                FROM memory_sources AS a
                JOIN memory_sources AS b
                  ON b.user_id = a.user_id AND b.conversation_id = a.conversation_id
                 AND b.memory_id <> a.memory_id
                JOIN memories AS m ON m.id = b.memory_id AND m.valid_to IS NULL
                WHERE a.user_id = ? AND list_contains(?, a.memory_id)
                  AND a.conversation_id IS NOT NULL
            )
            LIMIT ?
            """,
            [user_id, list(memory_ids), limit],
        ).fetchall()
        return [(a, b, n) for a, b, n in rows]

    def _view(self, user_id: str) -> UserView | None:
        """The user's RAM view if there is one; none yet: a build starts in the background
        and this call's caller reads DuckDB. Never inside a transaction (its own writes are
        not in any view)."""
        if getattr(self._local, "in_transaction", False):
            return None
        view = self._views.get(user_id)
        if view is None and self._rows_of(user_id) <= self._views.max_rows and self._views.claim(user_id):
            generation = self._views.generation(user_id)
            try:
                self._view_builder.submit(self._build_view, user_id, generation)
            except RuntimeError:  # closing
                self._views.abandon(user_id)
        return view

    def preload_views(self) -> int:
        """Start building, in the background, the views of the users active most recently (by
        their memories' latest access or change), as many as fit in the store's `view_rows`:
        after a restart their first searches find a view instead of reading DuckDB (at 1M
        memories a light user's first search reads DuckDB for 25-50 ms; with a view, 5-10 ms).
        Returns how many users were queued; their views are built one after the other."""
        if self._views.max_rows <= 0 or self._closing:
            return 0
        users = self._cursor().execute(
            "SELECT user_id, count(*) FROM memories GROUP BY user_id "
            "ORDER BY max(greatest(updated_at, coalesce(last_accessed, updated_at))) DESC, user_id"
        ).fetchall()
        queued = held = 0
        for user_id, rows in users:
            if held + rows > self._views.max_rows:
                continue  # a smaller, less recent user may still fit
            if self._views.claim(user_id):
                try:
                    self._view_builder.submit(self._build_view, user_id, self._views.generation(user_id))
                except RuntimeError:  # closing
                    self._views.abandon(user_id)
                    break
                queued += 1
                held += rows
        return queued

    def _build_view(self, user_id: str, generation: tuple[int, int]) -> None:
        try:
            view = load_view(self._cursor(), user_id, text_generation=self._text_generation,
                             ann_min_rows=_indexes.EXACT_SCAN_MAX_ROWS, cancelled=lambda: self._closing,
                             previous=self._views.take_previous(user_id))
        except BuildCancelled:
            self._views.abandon(user_id)
            return
        except Exception as exc:  # reads go to DuckDB, as without a view
            self._views.abandon(user_id)
            log.warning("memory_view_failed", error=repr(exc))
            return
        self._views.install(user_id, view, generation)

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
        """Promote, expire and decay by the tier rules, prune the learner's old done jobs, then
        refresh the text index if stale."""
        report = _tiers.run_maintenance(self)
        if self.done_jobs_kept is not None:
            report.jobs_pruned = self.prune_done_jobs(self.done_jobs_kept)
            if report.jobs_pruned:
                log.info("learner_jobs_pruned", jobs=report.jobs_pruned)
        if self._text_index_stale:
            self.refresh_text_index()
        return report

    def memory_usage(self) -> dict[str, int]:
        """Bytes DuckDB's buffer manager holds, by tag in lower case (`base_table`, `art_index`,
        `in_memory_table`, ...). Memory its allocator keeps beyond these is not counted."""
        rows = self._cursor().execute("SELECT tag, memory_usage_bytes FROM duckdb_memory()").fetchall()
        return {str(tag).lower(): int(size) for tag, size in rows}

    def user_vectors(self, user_id: str) -> tuple[list[str], np.ndarray]:
        """Every vector of the user's memories, history included: (ids, (n, 384) matrix)."""
        return fetch_user_vectors(self._cursor(), user_id)

    def user_signature(self, user_id: str) -> tuple[int, datetime | None]:
        """(current memories, their latest update): changes whenever the user's memories do."""
        view = self._view(user_id)
        if view is not None:
            return view.signature
        row = first_row(self._cursor().execute(
            "SELECT count(*), max(updated_at) FROM memories WHERE user_id = ? AND valid_to IS NULL",
            [user_id],
        ))
        assert row is not None
        return int(row[0]), row[1]

    def database_path(self) -> Path | None:
        """The database file, None for an in-memory store."""
        row = first_row(self._cursor().execute(
            "SELECT path FROM duckdb_databases() WHERE database_name = current_database()"
        ))
        return Path(row[0]) if row and row[0] else None

    def compact(self) -> int:
        """Rebuild the HNSW index (dropping the tombstones deletes left in it) and the text
        index, then write the WAL into the database file (CHECKPOINT). Returns the deletes the
        old HNSW index had absorbed."""
        with self._write_lock, self._index_lock:
            cursor = self._writable_cursor()
            tombstones = self._deletes_since_index_load
            if self.has_vector_index:
                self._rebuild_vector_index(cursor)
        self.refresh_text_index()
        with self._write_lock:
            self._writable_cursor().execute("CHECKPOINT")
        return tombstones

