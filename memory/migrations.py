"""Numbered schema migrations, recorded in `schema_migrations` and applied on open.

Each migration is a function `mNNN_<name>(conn)` listed in `MIGRATIONS`. A migration
is never edited once released: schema changes are new migrations appended to the
list. Each one runs in its own transaction together with its `schema_migrations` row.
Indexes that are derived data (the HNSW vector index, the full-text index) are not made
here: the store creates and rebuilds them (see `memory.store`), since an encrypted database
cannot hold the HNSW index and both must be rebuilt at times anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import duckdb

from memory.rows import first_row

__all__ = [
    "MIGRATIONS",
    "Migration",
    "MigrationError",
    "applied_versions",
    "apply_migrations",
    "check_schema_current",
]


class MigrationError(RuntimeError):
    """The database schema cannot be brought to, or is not at, the code's version."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    apply: Callable[[duckdb.DuckDBPyConnection], None]


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


def m002_pms(conn: duckdb.DuckDBPyConnection) -> None:
    """The full MemoryEntry: tiers, truth and type, confidence parts, relations, bi-temporal
    validity, access statistics; vectors, links and provenance in their own tables.

    Vectors move to `memory_vectors`, which is only ever inserted into and deleted from:
    the vss HNSW index hangs on repeated UPDATEs (see `memory.store`), and `memories` is now
    updated on every access. m001's memories become LONG_TERM facts (they were already served).
    """
    conn.execute("DROP INDEX IF EXISTS memories_embedding_hnsw")  # made by m001 before 0.2
    conn.execute(
        """
        CREATE TABLE memory_entries (
            id                  VARCHAR PRIMARY KEY,
            user_id             VARCHAR NOT NULL,
            content             VARCHAR NOT NULL,
            summary             VARCHAR,
            content_hash        VARCHAR NOT NULL,
            tier                VARCHAR NOT NULL,   -- SHORT_TERM | LONG_TERM | PERSISTENT
            truth_category      VARCHAR NOT NULL,   -- ABSOLUTE | CONTEXTUAL | OPINION | INFERRED
            memory_type         VARCHAR NOT NULL,   -- FACT | BELIEF | PREFERENCE | SKILL | EVENT | CONTEXT
            confidence          DOUBLE NOT NULL,    -- overall, 0-1
            source_reliability  DOUBLE NOT NULL,
            recency             DOUBLE NOT NULL,    -- decay factor, refreshed by the decay pass
            corroboration_count INTEGER NOT NULL,
            contradiction_count INTEGER NOT NULL,
            importance          DOUBLE NOT NULL,
            tags                VARCHAR[] NOT NULL,
            domains             VARCHAR[] NOT NULL,
            entities            VARCHAR[] NOT NULL,
            subject             VARCHAR,            -- "user", "user.dog"
            relation            VARCHAR,            -- "residence", "name": single-valued relations
            value               VARCHAR,
            validated           BOOLEAN NOT NULL,   -- confirmed by the user
            valid_from          TIMESTAMP NOT NULL, -- naive UTC, as every timestamp here
            valid_to            TIMESTAMP,          -- set when superseded: history, not current
            recorded_at         TIMESTAMP NOT NULL,
            superseded_by       VARCHAR,
            supersedes          VARCHAR,
            identity_since      TIMESTAMP,          -- when the 'identity' tag was first set
            expires_at          TIMESTAMP,          -- short-term TTL
            created_at          TIMESTAMP NOT NULL,
            updated_at          TIMESTAMP NOT NULL,
            last_accessed       TIMESTAMP,
            access_count        INTEGER NOT NULL
        )
        """
    )
    conn.execute(
        """
        INSERT INTO memory_entries
        SELECT id, user_id, content, NULL, content_hash, 'LONG_TERM', 'CONTEXTUAL', 'FACT',
               0.6, 0.6, 1.0, 0, 0, 0.5, [], [], [], NULL, NULL, NULL, false,
               created_at, NULL, created_at, NULL, NULL, NULL, NULL, created_at, updated_at,
               NULL, 0
        FROM memories
        """
    )
    conn.execute(
        """
        CREATE TABLE memory_vectors (
            id        VARCHAR PRIMARY KEY,
            user_id   VARCHAR NOT NULL,
            embedding FLOAT[384] NOT NULL       -- all-MiniLM-L6-v2, L2-normalised
        )
        """
    )
    conn.execute("INSERT INTO memory_vectors SELECT id, user_id, embedding FROM memories")
    conn.execute(
        """
        CREATE TABLE memory_sources (
            memory_id       VARCHAR NOT NULL,
            user_id         VARCHAR NOT NULL,
            kind            VARCHAR NOT NULL,   -- interaction | api | cli | import | consolidation
            ref             VARCHAR,            -- request id, file name
            extractor       VARCHAR,            -- rules, llm:<model>
            conversation_id VARCHAR,
            recorded_at     TIMESTAMP NOT NULL
        )
        """
    )
    conn.execute(
        """
        INSERT INTO memory_sources
        SELECT id, user_id,
               CASE WHEN source LIKE 'extractor:%' THEN 'interaction' ELSE source END,
               source_ref,
               CASE WHEN source LIKE 'extractor:%' THEN substr(source, 11) END,
               NULL, created_at
        FROM memories
        """
    )
    conn.execute(
        """
        CREATE TABLE memory_links (
            user_id    VARCHAR NOT NULL,
            src_id     VARCHAR NOT NULL,
            dst_id     VARCHAR NOT NULL,
            kind       VARCHAR NOT NULL,        -- related | supports | contradicts | supersedes | derived_from
            weight     DOUBLE NOT NULL,
            created_at TIMESTAMP NOT NULL
        )
        """
    )
    conn.execute("DROP TABLE memories")
    conn.execute("ALTER TABLE memory_entries RENAME TO memories")
    conn.execute("CREATE INDEX memories_user ON memories (user_id)")
    conn.execute("CREATE INDEX memory_vectors_user ON memory_vectors (user_id)")
    conn.execute("CREATE INDEX memory_sources_memory ON memory_sources (memory_id)")
    conn.execute("CREATE INDEX memory_links_src ON memory_links (src_id)")
    conn.execute("CREATE INDEX memory_links_dst ON memory_links (dst_id)")
    conn.execute("ALTER TABLE interactions ADD COLUMN conversation_id VARCHAR")


def m003_learner_jobs(conn: duckdb.DuckDBPyConnection) -> None:
    """The learner's durable queue (`memory.jobs`): one job per interaction to learn from, its
    state (pending -> leased -> done, or back to pending with a later `next_attempt_at`, or dead:
    the dead letters), per-user trigger counters, and training requests for the personal model.

    No index on `state`: DuckDB updates an indexed column as delete + insert, which its unique
    checks reject when the same row changes twice in one transaction.
    """
    conn.execute(
        """
        CREATE TABLE learner_jobs (
            id              VARCHAR PRIMARY KEY,  -- the interaction's request id
            kind            VARCHAR NOT NULL,     -- extract
            user_id         VARCHAR NOT NULL,
            input           VARCHAR,              -- the user's latest turn, as the client sent it
            conversation_id VARCHAR,
            state           VARCHAR NOT NULL,     -- pending | leased | done | dead
            attempts        INTEGER NOT NULL,     -- leases so far
            next_attempt_at TIMESTAMP NOT NULL,   -- naive UTC; a retry waits until then
            lease_owner     VARCHAR,
            leased_until    TIMESTAMP,
            last_error      VARCHAR,
            result          JSON,                 -- what applying it did: memory ids, extractor
            created_at      TIMESTAMP NOT NULL,
            updated_at      TIMESTAMP NOT NULL,
            finished_at     TIMESTAMP             -- done or dead
        )
        """
    )
    conn.execute(
        """
        CREATE TABLE learner_users (
            user_id          VARCHAR PRIMARY KEY,
            pending          INTEGER NOT NULL,    -- interactions learned since the last run
            first_pending_at TIMESTAMP,
            last_run_at      TIMESTAMP
        )
        """
    )
    conn.execute(
        """
        CREATE TABLE training_requests (
            id           VARCHAR PRIMARY KEY,
            user_id      VARCHAR NOT NULL,
            reason       VARCHAR NOT NULL,        -- interactions | schedule | request
            interactions INTEGER NOT NULL,        -- learned since the previous request
            requested_at TIMESTAMP NOT NULL,
            state        VARCHAR NOT NULL,        -- pending | running | done | failed
            updated_at   TIMESTAMP NOT NULL,
            error        VARCHAR
        )
        """
    )
    conn.execute("CREATE INDEX learner_jobs_user ON learner_jobs (user_id)")
    conn.execute("CREATE INDEX training_requests_user ON training_requests (user_id)")


def m004_feedback_domains(conn: duckdb.DuckDBPyConnection) -> None:
    """The user's feedback on answers, and per-user counts of the knowledge domains touched.

    `feedback` holds one row per rated response (the interaction's request id): rating good or
    bad, an optional correction, the training weight it gives (x1.5 good, x0.5 bad, x3.0 a
    correction) and what it did to memories. `domain_activations` counts, per user and domain,
    how often retrieval served a memory of it and how often a new memory of it was written
    (seed 004, phase 3: which domains a personal model can prune).
    """
    conn.execute(
        """
        CREATE TABLE feedback (
            request_id  VARCHAR PRIMARY KEY,   -- the interaction rated (x-request-id)
            user_id     VARCHAR NOT NULL,
            rating      VARCHAR,               -- good | bad | NULL (a correction alone)
            correction  VARCHAR,               -- the answer the user wanted
            weight      DOUBLE NOT NULL,       -- 1.5 good, 0.5 bad, 3.0 with a correction
            result      JSON,                  -- memories corrected: superseded and created ids
            created_at  TIMESTAMP NOT NULL,
            updated_at  TIMESTAMP NOT NULL
        )
        """
    )
    conn.execute("CREATE INDEX feedback_user ON feedback (user_id)")
    conn.execute(
        """
        CREATE TABLE domain_activations (
            user_id    VARCHAR NOT NULL,
            domain     VARCHAR NOT NULL,
            source     VARCHAR NOT NULL,       -- retrieval | memory
            count      BIGINT NOT NULL,
            first_at   TIMESTAMP NOT NULL,
            last_at    TIMESTAMP NOT NULL,
            PRIMARY KEY (user_id, domain, source)
        )
        """
    )


def m006_sensitivity(conn: duckdb.DuckDBPyConnection) -> None:
    """A sensitivity label per memory (none | personal | health | finance | credentials): the
    proxy's egress policy decides which upstreams may be told memories of each label."""
    conn.execute("ALTER TABLE memories ADD COLUMN sensitivity VARCHAR DEFAULT 'none'")
    conn.execute("UPDATE memories SET sensitivity = 'none' WHERE sensitivity IS NULL")


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "m001_initial", m001_initial),
    Migration(2, "m002_pms", m002_pms),
    Migration(3, "m003_learner_jobs", m003_learner_jobs),
    Migration(4, "m004_feedback_domains", m004_feedback_domains),
    Migration(6, "m006_sensitivity", m006_sensitivity),
)


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
    exists = first_row(conn.execute(
        "SELECT count(*) FROM information_schema.tables "
        "WHERE table_schema = current_schema() AND table_name = 'schema_migrations'"
    ))
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
