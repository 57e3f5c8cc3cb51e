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

__all__ = ["InteractionLog", "InteractionRecord"]

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
_TYPES = {"created_at": "TIMESTAMP", "stream": "BOOLEAN", "status_code": "INTEGER",
          "latency_ms": "DOUBLE", "ttft_ms": "DOUBLE"}  # the rest: VARCHAR (JSON columns cast on insert)
_INSERT = (
    f"INSERT INTO interactions ({', '.join(_COLUMNS)}) SELECT "
    + ", ".join(f"unnest(${i}::{_TYPES.get(name, 'VARCHAR')}[])" for i, name in enumerate(_COLUMNS, 1))
)


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


def _column_lists(records: Sequence[InteractionRecord]) -> list[list]:
    return [
        [_json_param(getattr(r, name)) for r in records] if name in _JSON_COLUMNS
        else [getattr(r, name) for r in records]
        for name in _COLUMNS
    ]


class InteractionLog:
    """Needs `_write_lock` and `_writable_cursor()`/`_cursor()` from the store."""

    _write_lock: threading.Lock

    def _cursor(self) -> duckdb.DuckDBPyConnection: ...  # provided by MemoryStore

    def _writable_cursor(self) -> duckdb.DuckDBPyConnection: ...  # provided by MemoryStore

    def _joined_transaction(self, cursor: duckdb.DuckDBPyConnection) -> AbstractContextManager[None]: ...

    def log_interactions(self, records: Sequence[InteractionRecord]) -> None:
        """Append interactions in one transaction, as one statement: each column goes in as one
        list parameter and `unnest` zips them back into rows.

        Request ids are unique by construction (the proxy makes them); a duplicate is an error.
        Rows as parameters cost ~1 ms a row; an Arrow table held the interpreter lock while
        DuckDB bound its view (three times) and built its scanner, and the request path waited
        (docs/benchmarks.md, "What the c = 1 tail is made of").
        """
        if not records:
            return
        with self._write_lock:
            cursor = self._writable_cursor()
            with self._joined_transaction(cursor):
                cursor.execute(_INSERT, _column_lists(records))

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
