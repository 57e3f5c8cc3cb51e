"""The user's feedback on answers: one row per rated response, in the `feedback` table.

A mixin of `MemoryStore`. The rules (weights, correcting memories) live in `learner.feedback`;
this module stores and reads the rows, and finds the logged interaction a response id names.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import duckdb

__all__ = ["FeedbackLog", "FeedbackRecord"]


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    request_id: str  # the interaction rated
    user_id: str
    rating: str | None  # "good" | "bad" | None
    correction: str | None
    weight: float
    result: dict  # {"superseded": [...], "created": [...]}
    created_at: datetime
    updated_at: datetime


_COLUMNS = "request_id, user_id, rating, correction, weight, result, created_at, updated_at"


def _record(row: Sequence) -> FeedbackRecord:
    request_id, user_id, rating, correction, weight, result, created_at, updated_at = row
    return FeedbackRecord(request_id, user_id, rating, correction, float(weight),
                          json.loads(result) if result else {}, created_at, updated_at)


class FeedbackLog:
    """Needs `_write_lock` and `_writable_cursor()`/`_cursor()` from the store."""

    _write_lock: threading.RLock

    def _cursor(self) -> duckdb.DuckDBPyConnection: ...  # provided by MemoryStore

    def _writable_cursor(self) -> duckdb.DuckDBPyConnection: ...  # provided by MemoryStore

    def save_feedback(self, record: FeedbackRecord) -> None:
        """Store feedback on a response; feedback sent again on the same response replaces it
        (keeping when it was first given)."""
        with self._write_lock:
            self._writable_cursor().execute(
                f"INSERT INTO feedback ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (request_id) DO UPDATE SET rating = excluded.rating, "
                "correction = excluded.correction, weight = excluded.weight, "
                "result = excluded.result, updated_at = excluded.updated_at",
                [record.request_id, record.user_id, record.rating, record.correction, record.weight,
                 json.dumps(record.result, sort_keys=True), record.created_at, record.updated_at],
            )

    def feedback_of(self, user_id: str) -> dict[str, FeedbackRecord]:
        """The user's feedback by request id."""
        rows = self._cursor().execute(
            f"SELECT {_COLUMNS} FROM feedback WHERE user_id = ? ORDER BY request_id", [user_id]
        ).fetchall()
        return {row[0]: _record(row) for row in rows}

    def interaction_for_response(self, response_id: str) -> dict | None:
        """The logged interaction a response id names: the request id (x-request-id) or the
        completion's own id when the logged answer kept it. JSON columns decoded."""
        rows = self._cursor().execute(
            "SELECT request_id, user_id, created_at, model, status_code, request_received, "
            "request_sent, response FROM interactions "
            "WHERE request_id = ? OR json_extract_string(response, '$.id') = ? "
            "ORDER BY request_id = ? DESC LIMIT 1",
            [response_id, response_id, response_id],
        ).fetchall()
        if not rows:
            return None
        names = ("request_id", "user_id", "created_at", "model", "status_code", "request_received",
                 "request_sent", "response")
        doc = dict(zip(names, rows[0], strict=True))
        for name in ("request_received", "request_sent", "response"):
            doc[name] = json.loads(doc[name]) if doc[name] is not None else None
        return doc

    def conversation_labels(self, user_id: str, request_ids: Sequence[str]) -> set[str]:
        """Sensitivity labels of every memory (history included) learned from these requests
        or from any turn of their conversations: what a model distilled from those logged
        conversations may have picked up (a turn carries the conversation before it)."""
        if not request_ids:
            return set()
        rows = self._cursor().execute(
            """
            SELECT DISTINCT m.sensitivity FROM memory_sources AS s
            JOIN memories AS m ON m.id = s.memory_id
            WHERE s.user_id = $1 AND (list_contains($2, s.ref) OR s.conversation_id IN (
                SELECT conversation_id FROM interactions
                WHERE user_id = $1 AND list_contains($2, request_id) AND conversation_id IS NOT NULL
            ))
            """,
            [user_id, list(request_ids)],
        ).fetchall()
        return {str(label) for (label,) in rows}

    def memories_from_request(self, user_id: str, request_id: str) -> list[str]:
        """Ids of current memories that a request's user turn gave or corroborated."""
        rows = self._cursor().execute(
            "SELECT DISTINCT s.memory_id FROM memory_sources AS s "
            "JOIN memories AS m ON m.id = s.memory_id AND m.valid_to IS NULL "
            "WHERE s.user_id = ? AND s.ref = ? ORDER BY s.memory_id",
            [user_id, request_id],
        ).fetchall()
        return [r[0] for r in rows]
