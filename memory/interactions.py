"""The teacher log: every proxied interaction as received, as sent, and as answered.

A mixin of `MemoryStore`: it shares the store's connection, cursors and write lock.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime

import duckdb
import pyarrow as pa

__all__ = ["InteractionLog", "InteractionRecord"]

_SMALL_BATCH = 4  # rows; above this an interactions batch goes in as an Arrow table
_COLUMNS = (
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
    "conversation_id",
)
_JSON_COLUMNS = frozenset({"request_received", "request_sent", "response", "usage"})


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
    conversation_id: str | None = None


def _json_param(value: dict | None) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


class InteractionLog:
    """Needs `_write_lock` and `_writable_cursor()`/`_cursor()` from the store."""

    _write_lock: threading.Lock

    def _cursor(self) -> duckdb.DuckDBPyConnection: ...  # provided by MemoryStore

    def _writable_cursor(self) -> duckdb.DuckDBPyConnection: ...  # provided by MemoryStore

    def _joined_transaction(self, cursor: duckdb.DuckDBPyConnection) -> AbstractContextManager[None]: ...

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
                _json_param(value) if name in _JSON_COLUMNS else value
                for name in _COLUMNS
                for value in (getattr(r, name),)
            ]
            for r in records
        ]
        columns = ", ".join(_COLUMNS)
        with self._write_lock:
            cursor = self._writable_cursor()
            if len(params) <= _SMALL_BATCH:
                placeholders = ", ".join("?" for _ in _COLUMNS)
                with self._joined_transaction(cursor):
                    cursor.executemany(
                        f"INSERT INTO interactions ({columns}) VALUES ({placeholders})", params
                    )
                return
            batch = pa.table({name: [row[i] for row in params] for i, name in enumerate(_COLUMNS)})
            cursor.register("interactions_batch", batch)
            try:
                cursor.execute(
                    f"INSERT INTO interactions ({columns}) SELECT {columns} FROM interactions_batch"
                )
            finally:
                cursor.unregister("interactions_batch")

    def interactions(self, *, user_id: str | None = None, limit: int = 100) -> list[dict]:
        """Logged interactions, newest first, JSON columns decoded to dicts."""
        where, params = ("WHERE user_id = ?", [user_id]) if user_id is not None else ("", [])
        rows = self._cursor().execute(
            f"SELECT {', '.join(_COLUMNS)} FROM interactions {where} "
            f"ORDER BY created_at DESC, request_id LIMIT ?",
            [*params, limit],
        ).fetchall()
        return [
            {
                column: json.loads(value) if column in _JSON_COLUMNS and value is not None else value
                for column, value in zip(_COLUMNS, row, strict=True)
            }
            for row in rows
        ]
