"""The learner's durable queue: jobs, dead letters, trigger counters and training requests.

A mixin of `MemoryStore` sharing its connection, cursors and write lock (tables: m003).

A job is born in the transaction that logs its interaction (`log_interactions_and_jobs`), so an
acknowledged interaction always has its job. A worker *leases* due jobs (pending with
`next_attempt_at` passed, or leased by someone whose lease ran out: a killed learner's jobs come
back by themselves), and then either *completes* one (`complete_job`, called inside
`MemoryStore.transaction()` together with the memory writes, so a job's effects and its `done`
mark commit together or not at all) or *fails* it: back to pending after an exponential backoff,
or, after `max_attempts` leases, `dead` (the dead letters, requeued by `retry_job`).
A lease is counted as an attempt when it is taken, so a job that crashes its worker every time
is dead-lettered too instead of looping for ever.

A job whose result is known when it is written (the rules extractor, run by the writer, found no
fact in the turn: most turns) is born `done` in that same transaction: no lease and no completion
follow, the two UPDATEs that cost most of the queue's time, each a scan of every job ever run.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import duckdb

from memory.rows import first_row

__all__ = ["JOB_STATES", "Job", "JobQueue", "NewJob", "RetryPolicy", "TrainingRequest"]

JOB_STATES = ("pending", "leased", "done", "dead")
_JOB_COLUMNS = (
    "id", "kind", "user_id", "input", "conversation_id", "state", "attempts", "next_attempt_at",
    "lease_owner", "leased_until", "last_error", "result", "created_at", "updated_at", "finished_at",
)
_JOB_TYPES = {"attempts": "INTEGER", "next_attempt_at": "TIMESTAMP", "leased_until": "TIMESTAMP",
              "created_at": "TIMESTAMP", "updated_at": "TIMESTAMP", "finished_at": "TIMESTAMP"}
# One list parameter per column, zipped back into rows by `unnest` (see `log_interactions`).
_INSERT_JOBS = (
    f"INSERT INTO learner_jobs ({', '.join(_JOB_COLUMNS)}) SELECT "
    + ", ".join(f"unnest(${i}::{_JOB_TYPES.get(name, 'VARCHAR')}[])" for i, name in enumerate(_JOB_COLUMNS, 1))
)


@dataclass(frozen=True, slots=True)
class NewJob:
    id: str  # the interaction's request id
    user_id: str
    input: str | None  # the user's latest turn
    conversation_id: str | None = None
    kind: str = "extract"


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    kind: str
    user_id: str
    input: str | None
    conversation_id: str | None
    state: str
    attempts: int
    next_attempt_at: datetime
    lease_owner: str | None
    leased_until: datetime | None
    last_error: str | None
    result: dict | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    def to_dict(self, *, with_input: bool = False) -> dict[str, Any]:
        """JSON-ready; the user's text only when asked (a worker needs it, a listing does not)."""
        out: dict[str, Any] = {"object": "learner.job"}
        for name in _JOB_COLUMNS:
            value = getattr(self, name)
            if name == "input" and not with_input:
                continue
            out[name] = value.isoformat() if isinstance(value, datetime) else value
        return out


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff: timedelta = timedelta(seconds=5)  # before the 2nd attempt; doubles each time
    max_backoff: timedelta = timedelta(hours=1)

    def delay(self, attempts: int) -> timedelta:
        """Wait before the attempt after `attempts` failed ones."""
        return min(self.backoff * (2 ** max(attempts - 1, 0)), self.max_backoff)


@dataclass(frozen=True, slots=True)
class TrainingRequest:
    id: str
    user_id: str
    reason: str
    interactions: int
    requested_at: datetime
    state: str
    updated_at: datetime
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"object": "training_request", "id": self.id, "user_id": self.user_id, "reason": self.reason,
                "interactions": self.interactions, "requested_at": self.requested_at.isoformat(),
                "state": self.state, "updated_at": self.updated_at.isoformat(), "error": self.error}


def _job(row: tuple) -> Job:
    data = dict(zip(_JOB_COLUMNS, row, strict=True))
    if data["result"] is not None:
        data["result"] = json.loads(data["result"])
    return Job(**data)


class JobQueue:
    """Needs `_write_lock`, `_cursor()`, `_writable_cursor()`, `clock`, `transaction()` and
    `log_interactions` from the store."""

    _write_lock: threading.RLock
    clock: Any

    def _cursor(self) -> duckdb.DuckDBPyConnection: ...  # provided by MemoryStore

    def _writable_cursor(self) -> duckdb.DuckDBPyConnection: ...  # provided by MemoryStore

    def transaction(self, *, users: Sequence[str] = ()) -> AbstractContextManager[duckdb.DuckDBPyConnection]: ...

    def log_interactions(self, records: Sequence[Any]) -> None: ...  # provided by InteractionLog

    # -- enqueue ---------------------------------------------------------------------------

    def log_interactions_and_jobs(
        self, records: Sequence[Any], jobs: Sequence[NewJob], done: Sequence[tuple[NewJob, dict]] = (),
    ) -> None:
        """Log interactions and queue their jobs in one transaction (one round trip per batch).
        `done`: jobs already run by the writer, each with its result: written as done (one
        attempt) and counted for their users' triggers, as `complete_jobs` would have."""
        if not records and not jobs and not done:
            return
        now = self.clock.now()
        with self.transaction() as cursor:
            self.log_interactions(records)
            rows = [[j.id, j.kind, j.user_id, j.input, j.conversation_id, "pending", 0, now, None, None,
                     None, None, now, now, None] for j in jobs]
            rows += [[j.id, j.kind, j.user_id, j.input, j.conversation_id, "done", 1, now, None, None,
                      None, json.dumps(result), now, now, now] for j, result in done]
            if not rows:
                return
            self._count_learned(cursor, Counter(j.user_id for j, _ in done), now)
            cursor.execute(_INSERT_JOBS, [list(column) for column in zip(*rows, strict=True)])

    # -- lease, complete, fail -------------------------------------------------------------

    def lease_jobs(self, owner: str, *, limit: int, lease_for: timedelta) -> list[Job]:
        """Take up to `limit` due jobs, oldest first, for `lease_for`; each lease is an attempt."""
        now = self.clock.now()
        with self._write_lock:
            rows = self._writable_cursor().execute(
                f"""
                UPDATE learner_jobs SET state = 'leased', lease_owner = ?, leased_until = ?,
                       attempts = attempts + 1, updated_at = ?
                WHERE id IN (
                    SELECT id FROM learner_jobs
                    WHERE (state = 'pending' AND next_attempt_at <= ?)
                       OR (state = 'leased' AND leased_until <= ?)
                    ORDER BY created_at, id LIMIT ?)
                RETURNING {', '.join(_JOB_COLUMNS)}
                """,
                [owner, now + lease_for, now, now, now, limit],
            ).fetchall()
        return sorted((_job(r) for r in rows), key=lambda j: (j.created_at, j.id))

    def complete_job(self, job_id: str, owner: str, result: dict) -> bool:
        """Mark a job leased by `owner` done and count it for its user's triggers; False (and no
        change) if it is not leased by `owner` any more. Call inside `transaction()` with the
        job's memory writes: a False there means roll them back."""
        now = self.clock.now()
        with self.transaction() as cursor:
            rows = cursor.execute(
                "UPDATE learner_jobs SET state = 'done', result = ?, finished_at = ?, updated_at = ?, "
                "leased_until = NULL, last_error = NULL "
                "WHERE id = ? AND state = 'leased' AND lease_owner = ? RETURNING user_id",
                [json.dumps(result), now, now, job_id, owner],
            ).fetchall()
            if not rows:
                return False
            cursor.execute(
                "INSERT INTO learner_users VALUES (?, 1, ?, NULL) ON CONFLICT (user_id) DO UPDATE SET "
                "pending = learner_users.pending + 1, "
                "first_pending_at = coalesce(learner_users.first_pending_at, excluded.first_pending_at)",
                [rows[0][0], now],
            )
        return True

    def complete_jobs(self, job_ids: Sequence[str], owner: str, result: dict) -> set[str]:
        """`complete_job` for many jobs with the same result (jobs that found no fact), in one
        transaction; returns the ids that were still leased by `owner` and are now done."""
        if not job_ids:
            return set()
        now = self.clock.now()
        with self.transaction() as cursor:
            rows = cursor.execute(
                "UPDATE learner_jobs SET state = 'done', result = $1, finished_at = $2, updated_at = $2, "
                "leased_until = NULL, last_error = NULL "
                "WHERE list_contains($3::VARCHAR[], id) AND state = 'leased' AND lease_owner = $4 "
                "RETURNING id, user_id",
                [json.dumps(result), now, list(job_ids), owner],
            ).fetchall()
            self._count_learned(cursor, Counter(user_id for _, user_id in rows), now)
        return {job_id for job_id, _ in rows}

    @staticmethod
    def _count_learned(cursor: duckdb.DuckDBPyConnection, per_user: Counter[str], now: datetime) -> None:
        """Add finished jobs to their users' trigger counters (learning runs every N interactions)."""
        if not per_user:
            return
        users, counts = zip(*sorted(per_user.items()), strict=True)
        cursor.execute(
            "INSERT INTO learner_users SELECT unnest($1::VARCHAR[]), unnest($2::BIGINT[]), $3, NULL "
            "ON CONFLICT (user_id) DO UPDATE SET pending = learner_users.pending + excluded.pending, "
            "first_pending_at = coalesce(learner_users.first_pending_at, excluded.first_pending_at)",
            [list(users), list(counts), now],
        )

    def fail_job(self, job_id: str, owner: str, error: str, policy: RetryPolicy) -> str | None:
        """Record a failed attempt: back to pending after the policy's backoff, or dead after
        its last attempt. Returns the new state, None if `owner` does not hold the job."""
        now = self.clock.now()
        with self._write_lock:
            cursor = self._writable_cursor()
            row = first_row(cursor.execute(
                "SELECT attempts FROM learner_jobs WHERE id = ? AND state = 'leased' AND lease_owner = ?",
                [job_id, owner],
            ))
            if row is None:
                return None
            dead = row[0] >= policy.max_attempts
            cursor.execute(
                "UPDATE learner_jobs SET state = ?, next_attempt_at = ?, last_error = ?, leased_until = NULL, "
                "updated_at = ?, finished_at = ? WHERE id = ?",
                ["dead" if dead else "pending", now + policy.delay(row[0]), error[:2000], now,
                 now if dead else None, job_id],
            )
        return "dead" if dead else "pending"

    def release_leases(self, owner: str | None = None) -> int:
        """Put leased jobs (of `owner`, or all) back to pending now: a restarted learner takes
        back what its previous run held without waiting for the leases to run out."""
        now = self.clock.now()
        where, params = ("AND lease_owner = ?", [owner]) if owner else ("", [])
        with self._write_lock:
            rows = self._writable_cursor().execute(
                f"UPDATE learner_jobs SET state = 'pending', next_attempt_at = ?, leased_until = NULL, "
                f"updated_at = ? WHERE state = 'leased' {where} RETURNING id",
                [now, now, *params],
            ).fetchall()
        return len(rows)

    def retry_job(self, job_id: str, *, user_id: str | None = None) -> Job | None:
        """Requeue a dead (or waiting) job to run now with a fresh attempt count; None if there
        is no such job (of `user_id`, when given) or it is done or leased."""
        now = self.clock.now()
        owner_sql, params = ("AND user_id = ?", [user_id]) if user_id is not None else ("", [])
        with self._write_lock:
            rows = self._writable_cursor().execute(
                f"UPDATE learner_jobs SET state = 'pending', attempts = 0, next_attempt_at = ?, "
                f"finished_at = NULL, updated_at = ? WHERE id = ? AND state IN ('dead', 'pending') {owner_sql} "
                f"RETURNING {', '.join(_JOB_COLUMNS)}",
                [now, now, job_id, *params],
            ).fetchall()
        return _job(rows[0]) if rows else None

    def prune_done_jobs(self, kept: timedelta) -> int:
        """Delete the jobs done more than `kept` ago; returns how many. Dead letters stay until
        they are retried or their user is wiped. Every lease and `next_job_due` reads the whole
        table, and a job's row carries a copy of the user's turn: kept for ever, both would grow
        with every interaction served. What a job did stays where it is used: the interaction in
        the teacher log, the memories and their sources."""
        cutoff = self.clock.now() - kept
        with self._write_lock:
            row = first_row(self._writable_cursor().execute(
                "DELETE FROM learner_jobs WHERE state = 'done' AND finished_at < ?", [cutoff]
            ))
        return int(row[0]) if row else 0

    # -- reads -----------------------------------------------------------------------------

    def get_job(self, job_id: str) -> Job | None:
        rows = self._cursor().execute(
            f"SELECT {', '.join(_JOB_COLUMNS)} FROM learner_jobs WHERE id = ?", [job_id]
        ).fetchall()
        return _job(rows[0]) if rows else None

    def jobs(self, *, state: str | None = None, user_id: str | None = None, limit: int = 100) -> list[Job]:
        """Jobs, newest first, filtered by state and user."""
        where, params = [], []
        if state is not None:
            where.append("state = ?")
            params.append(state)
        if user_id is not None:
            where.append("user_id = ?")
            params.append(user_id)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._cursor().execute(
            f"SELECT {', '.join(_JOB_COLUMNS)} FROM learner_jobs {clause} "
            f"ORDER BY created_at DESC, id DESC LIMIT ?", [*params, limit],
        ).fetchall()
        return [_job(r) for r in rows]

    def job_counts(self) -> dict[str, int]:
        rows = self._cursor().execute("SELECT state, count(*) FROM learner_jobs GROUP BY state").fetchall()
        return {state: 0 for state in JOB_STATES} | {s: int(n) for s, n in rows}

    def next_job_due(self) -> datetime | None:
        """When the earliest pending job or running lease comes due."""
        row = first_row(self._cursor().execute(
            "SELECT min(CASE WHEN state = 'pending' THEN next_attempt_at ELSE leased_until END) "
            "FROM learner_jobs WHERE state IN ('pending', 'leased')"
        ))
        return row[0] if row else None

    # -- triggers and training requests ----------------------------------------------------

    def learner_users_due(
        self, *, every: int, period: timedelta, min_gap: timedelta = timedelta(0)
    ) -> list[tuple[str, str]]:
        """(user, reason) for users with `every` interactions learned since their last run
        ("interactions"), or some and `period` since the last run or the first of them
        ("schedule"); never within `min_gap` of the user's last run."""
        now = self.clock.now()
        rows = self._cursor().execute(
            "SELECT user_id, pending >= ? FROM learner_users WHERE (pending >= ? OR (pending > 0 AND "
            "coalesce(last_run_at, first_pending_at) <= ?)) AND (last_run_at IS NULL OR last_run_at <= ?) "
            "ORDER BY user_id",
            [every, every, now - period, now - min_gap],
        ).fetchall()
        return [(u, "interactions" if by_count else "schedule") for u, by_count in rows]

    def learner_user(self, user_id: str) -> dict[str, Any] | None:
        row = first_row(self._cursor().execute(
            "SELECT pending, first_pending_at, last_run_at FROM learner_users WHERE user_id = ?", [user_id]
        ))
        if row is None:
            return None
        return {"pending": row[0], "first_pending_at": row[1], "last_run_at": row[2]}

    def request_training(self, user_id: str, reason: str) -> TrainingRequest:
        """Reset the user's trigger counter and queue a training request for their personal model,
        in one transaction; a request still pending is kept (its count grows) rather than doubled."""
        now = self.clock.now()
        with self.transaction() as cursor:
            row = first_row(cursor.execute("SELECT pending FROM learner_users WHERE user_id = ?", [user_id]))
            learned = int(row[0]) if row else 0
            cursor.execute(
                "INSERT INTO learner_users VALUES (?, 0, NULL, ?) ON CONFLICT (user_id) DO UPDATE SET "
                "pending = 0, first_pending_at = NULL, last_run_at = excluded.last_run_at",
                [user_id, now],
            )
            pending = first_row(cursor.execute(
                "SELECT id FROM training_requests WHERE user_id = ? AND state = 'pending' "
                "ORDER BY requested_at LIMIT 1", [user_id],
            ))
            if pending is not None:
                cursor.execute(
                    "UPDATE training_requests SET interactions = interactions + ?, updated_at = ? WHERE id = ?",
                    [learned, now, pending[0]],
                )
                request_id = pending[0]
            else:
                request_id = f"train_{uuid.uuid4().hex}"
                cursor.execute(
                    "INSERT INTO training_requests VALUES (?, ?, ?, ?, ?, 'pending', ?, NULL)",
                    [request_id, user_id, reason, learned, now, now],
                )
        found = self.training_requests(user_id=user_id, request_id=request_id)
        return found[0]

    def training_requests(
        self, *, user_id: str | None = None, state: str | None = None, request_id: str | None = None,
        limit: int = 100,
    ) -> list[TrainingRequest]:
        """Training requests, oldest first (the personal-model trainer takes them in order)."""
        where, params = [], []
        for column, value in (("user_id", user_id), ("state", state), ("id", request_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._cursor().execute(
            "SELECT id, user_id, reason, interactions, requested_at, state, updated_at, error "
            f"FROM training_requests {clause} ORDER BY requested_at, id LIMIT ?", [*params, limit],
        ).fetchall()
        return [TrainingRequest(*r) for r in rows]

    def set_training_state(self, request_id: str, state: str, error: str | None = None) -> bool:
        """Move a training request along (pending -> running -> done | failed)."""
        with self._write_lock:
            rows = self._writable_cursor().execute(
                "UPDATE training_requests SET state = ?, error = ?, updated_at = ? WHERE id = ? RETURNING id",
                [state, error, self.clock.now(), request_id],
            ).fetchall()
        return bool(rows)
