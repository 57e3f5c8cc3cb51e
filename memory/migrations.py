"""Numbered schema migrations, recorded in `schema_migrations` and applied on open.

Each migration is a function `mNNN_<name>(conn)` listed in `MIGRATIONS`. A migration
is never edited once released: schema changes are new migrations appended to the
list. Each one runs in its own transaction together with its `schema_migrations` row.
The HNSW index needs the vss extension loaded and
`hnsw_enable_experimental_persistence` on (see `memory.store`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import duckdb

__all__ = [
    "CREATE_HNSW_INDEX_SQL",
    "HNSW_INDEX",
    "MIGRATIONS",
    "Migration",
    "MigrationError",
    "apply_migrations",
    "applied_versions",
    "check_schema_current",
]


class MigrationError(RuntimeError):
    """The database schema cannot be brought to, or is not at, the code's version."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    apply: Callable[[duckdb.DuckDBPyConnection], None]


# The store drops and rebuilds this index (see `MemoryStore.forget`), so the statement
# lives here once. A later change to the index is a new migration, not an edit.
HNSW_INDEX = "memories_embedding_hnsw"
CREATE_HNSW_INDEX_SQL = (
    f"CREATE INDEX {HNSW_INDEX} ON memories USING HNSW (embedding) WITH (metric = 'cosine')"
)


def m001_initial(conn: duckdb.DuckDBPyConnection) -> None:
    """Memories with their embeddings, and the teacher log of proxied interactions."""
    conn.execute(
        """
        CREATE TABLE memories (
            id           VARCHAR PRIMARY KEY,      -- uuid4 hex
            user_id      VARCHAR NOT NULL,
            content      VARCHAR NOT NULL,
            content_hash VARCHAR NOT NULL,         -- sha256 of the normalised content
            embedding    FLOAT[384] NOT NULL,      -- all-MiniLM-L6-v2, L2-normalised
            source       VARCHAR NOT NULL,         -- 'extractor:rules', 'cli', 'api', ...
            source_ref   VARCHAR,                  -- request id it came from
            created_at   TIMESTAMP NOT NULL,       -- naive UTC
            updated_at   TIMESTAMP NOT NULL
        )
        """
    )
    conn.execute("CREATE INDEX memories_user_id ON memories (user_id)")
    # Deduplication key: one row per normalised content per user.
    conn.execute(
        "CREATE UNIQUE INDEX memories_user_content_hash ON memories (user_id, content_hash)"
    )
    conn.execute(CREATE_HNSW_INDEX_SQL)
    conn.execute(
        """
        CREATE TABLE interactions (
            request_id       VARCHAR PRIMARY KEY,
            user_id          VARCHAR,
            created_at       TIMESTAMP,            -- naive UTC
            model            VARCHAR,
            provider         VARCHAR,
            stream           BOOLEAN,
            status_code      INTEGER,
            error            VARCHAR,
            request_received JSON,                 -- the client's request as received
            request_sent     JSON,                 -- what went upstream (with injected memory)
            response         JSON,
            usage            JSON,
            latency_ms       DOUBLE,
            ttft_ms          DOUBLE                -- time to first token, streams only
        )
        """
    )


MIGRATIONS: tuple[Migration, ...] = (Migration(1, "m001_initial", m001_initial),)


def _ensure_migrations_table(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute(
        """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version    INTEGER PRIMARY KEY,
            name       VARCHAR NOT NULL,
            applied_at TIMESTAMP NOT NULL
        )
        """
    )


def applied_versions(conn: duckdb.DuckDBPyConnection) -> list[int]:
    """Versions recorded in `schema_migrations`, ascending; [] for a fresh database."""
    exists = conn.execute(
        "SELECT count(*) FROM information_schema.tables "
        "WHERE table_schema = current_schema() AND table_name = 'schema_migrations'"
    ).fetchone()
    if not exists or exists[0] == 0:
        return []
    rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    return [version for (version,) in rows]


def _check_not_newer(applied: list[int], migrations: tuple[Migration, ...]) -> None:
    known = {m.version for m in migrations}
    unknown = [v for v in applied if v not in known]
    if unknown:
        raise MigrationError(
            f"database has schema versions {unknown} unknown to this memlane "
            f"(latest known: {max(known)}); upgrade memlane"
        )


def check_schema_current(
    conn: duckdb.DuckDBPyConnection, migrations: tuple[Migration, ...] = MIGRATIONS
) -> None:
    """Raise unless every migration is applied (for read-only connections)."""
    applied = applied_versions(conn)
    _check_not_newer(applied, migrations)
    pending = [m.name for m in migrations if m.version not in applied]
    if pending:
        raise MigrationError(
            f"database needs migrations {pending}; open it read-write once to apply them"
        )


def apply_migrations(
    conn: duckdb.DuckDBPyConnection,
    *,
    now: datetime,
    migrations: tuple[Migration, ...] = MIGRATIONS,
) -> list[str]:
    """Apply pending migrations in version order; return the names applied."""
    _ensure_migrations_table(conn)
    applied = set(applied_versions(conn))
    _check_not_newer(sorted(applied), migrations)
    done: list[str] = []
    for migration in sorted(migrations, key=lambda m: m.version):
        if migration.version in applied:
            continue
        conn.execute("BEGIN TRANSACTION")
        try:
            migration.apply(conn)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                [migration.version, migration.name, now],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        done.append(migration.name)
    return done
