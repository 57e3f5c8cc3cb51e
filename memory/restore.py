"""Queries for export and import: a user's rows exactly as stored, and restoring them as given.

A mixin of `MemoryStore`; `memory.ownership` builds the files from these.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from datetime import datetime

import duckdb
import numpy as np
import pyarrow as pa

from memory.entry import MemoryEntry
from memory.rows import EMBEDDING_DIM, ENTRY_COLUMNS, Link, arrow_table, entry_params

__all__ = ["RestoreQueries"]


class RestoreQueries:
    _write_lock: threading.RLock
    _index_lock: threading.Lock
    _user_rows: dict[str, int]
    _text_index_stale: bool

    def _cursor(self) -> duckdb.DuckDBPyConnection: ...  # provided by MemoryStore

    def _writable_cursor(self) -> duckdb.DuckDBPyConnection: ...  # provided by MemoryStore

    # -- ownership helpers (memory.ownership: export and import) -------------------------

    def vectors_of(self, user_id: str, memory_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored embeddings of these memories of the user, by id."""
        if not memory_ids:
            return {}
        table = arrow_table(self._cursor().execute(
            "SELECT id, embedding FROM memory_vectors WHERE user_id = ? AND list_contains(?, id)",
            [user_id, list(memory_ids)],
        ))
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
        names = [c.strip() for c in ENTRY_COLUMNS.split(",")]
        rows = [entry_params(e, since.get(e.id)) for e in entries]
        text, time = pa.string(), pa.timestamp("us")
        tables = {
            "memories": (pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)}),
                         f"({ENTRY_COLUMNS}) SELECT {ENTRY_COLUMNS}"),
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
            self._user_changed(None)
            self._text_index_stale = True
