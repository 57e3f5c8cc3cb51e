"""Rows of the memory tables as Python values: column lists, conversions, the link type.

Shared by the store and its mixins (`memory.indexes`, `memory.restore`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from memory.entry import Confidence, MemoryEntry, MemoryType, Sensitivity, Tier, TruthCategory

__all__ = [
    "ARROW_BATCH_ROWS",
    "EMBEDDING_DIM",
    "ENTRY_COLUMNS",
    "UPDATABLE",
    "Link",
    "arrow_table",
    "entry_from_row",
    "entry_params",
    "first_row",
    "new_memory_id",
    "vector_param",
]

EMBEDDING_DIM = 384

ENTRY_COLUMNS = (
    "id, user_id, content, summary, content_hash, tier, truth_category, memory_type, "
    "confidence, source_reliability, recency, corroboration_count, contradiction_count, "
    "importance, tags, domains, entities, subject, relation, value, validated, valid_from, "
    "valid_to, recorded_at, superseded_by, supersedes, identity_since, expires_at, "
    "created_at, updated_at, last_accessed, access_count, sensitivity"
)
# Columns `update_entry` may set; everything else is fixed at insert.
UPDATABLE = frozenset(
    {
        "content", "summary", "content_hash", "tier", "truth_category", "memory_type",
        "confidence", "source_reliability", "recency", "corroboration_count",
        "contradiction_count", "importance", "tags", "domains", "entities", "subject",
        "relation", "value", "validated", "valid_from", "valid_to", "superseded_by",
        "supersedes", "identity_since", "expires_at", "updated_at", "last_accessed",
        "access_count", "sensitivity",
    }
)


@dataclass(frozen=True, slots=True)
class Link:
    src_id: str
    dst_id: str
    kind: str  # related | supports | contradicts | supersedes | derived_from
    weight: float = 1.0


def first_row(result: Any) -> tuple[Any, ...] | None:
    """The first row of a query's result (None if it has none), the rest read and dropped.

    Use it instead of `fetchone()`: DuckDB keeps a query's transaction open until its result
    is read to the end or the cursor runs another query, so a `fetchone()` on a thread's cursor
    holds a transaction for as long as that thread then sits idle. Meanwhile no checkpoint runs
    and no superseded row version is freed: the WAL and DuckDB's memory grow with every write
    (measured: 300 small write batches on 100k rows, 6 MiB against 349 MiB and a 65 MiB WAL)."""
    rows = result.fetchall()
    return rows[0] if rows else None


# Rows per Arrow record batch when a result is read as an Arrow table. DuckDB's default batch,
# 1,000,000 rows, makes it reserve buffers for that many rows of every column before the first
# row is read: 1.5 GiB for a FLOAT[384] column and 8 MiB per 64-bit column (measured under load:
# 82 mmaps of 2 GiB a minute, and 36 glibc heaps made and freed, from vector and hash reads; a
# host with strict overcommit may refuse the 2 GiB).
ARROW_BATCH_ROWS = 2048


def arrow_table(result: Any) -> pa.Table:
    """A query's result as an Arrow table, read in batches of `ARROW_BATCH_ROWS` rows."""
    return result.to_arrow_table(ARROW_BATCH_ROWS)


def vector_param(embedding: np.ndarray) -> list[float]:
    """A vector as a Python list (DuckDB converts lists ~3x faster than numpy arrays)."""
    vector = np.asarray(embedding, dtype=np.float32).reshape(-1)
    if vector.shape != (EMBEDDING_DIM,):
        raise ValueError(f"embedding must have {EMBEDDING_DIM} values, got {vector.size}")
    if not np.all(np.isfinite(vector)) or not np.any(vector):
        raise ValueError("embedding must be finite and non-zero")
    return vector.tolist()


def entry_from_row(row: Sequence[Any]) -> MemoryEntry:
    (id_, user_id, content, summary, digest, tier, truth, mtype, overall, reliability, recency,
     corroborations, contradictions, importance, tags, domains, entities, subject, relation,
     value, validated, valid_from, valid_to, recorded_at, superseded_by, supersedes,
     identity_since, expires_at, created_at, updated_at, last_accessed, access_count, sensitivity) = row
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
        access_count=access_count, sensitivity=Sensitivity(sensitivity or Sensitivity.NONE),
    )


def new_memory_id() -> str:
    return uuid.uuid4().hex


def entry_params(entry: MemoryEntry, identity_since: datetime | None) -> list[Any]:
    c = entry.confidence
    return [
        entry.id, entry.user_id, entry.content, entry.summary, entry.content_hash,
        entry.tier.value, entry.truth_category.value, entry.memory_type.value,
        c.overall, c.source_reliability, c.recency, c.corroboration_count, c.contradiction_count,
        entry.importance, list(entry.tags), list(entry.domains), list(entry.entities),
        entry.subject, entry.relation, entry.value, entry.validated, entry.valid_from,
        entry.valid_to, entry.recorded_at, entry.superseded_by, entry.supersedes,
        identity_since, entry.expires_at, entry.created_at, entry.updated_at,
        entry.last_accessed, entry.access_count, entry.sensitivity.value,
    ]
