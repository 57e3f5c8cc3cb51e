"""What a user controls over their memories: editing them, and taking them out and back in.

Forgetting is the store's `delete_entries` (a memory and everything derived from it, from
every table and index) and wiping a user is `wipe_user` (memories, vectors, sources, links,
logged interactions, then the wipe hooks).

Export writes one record per memory, history included: every field of the MemoryEntry (as
`entry_to_dict` writes it, less the search score), `identity_since`, the embedding, and the
links leaving the memory with their kind, weight and time. JSONL holds one record per line;
Parquet holds the same records as typed columns (timestamps, lists, a FIXED_SIZE_LIST of 384
float32 for the embedding). Either imports back into any store without loss.

Import is a restore, not a rewrite: rows go in as they are, without dedup or tier rules.
- Into the user who exported them: ids are kept, and a memory whose id is already stored is
  skipped, so importing the same file twice changes nothing.
- Into another user: memory ids name one user's memory across the whole store, so each id
  becomes uuid5(user, old id). Links, `supersedes` and `superseded_by` follow the new ids, and
  the mapping is deterministic, so importing the same file twice into that user changes nothing.
The embeddings are taken from the file: export and import assume the same embedding model.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memory.entry import (
    MemoryEntry,
    MemoryType,
    Tier,
    TruthCategory,
    entry_from_dict,
    entry_to_dict,
)
from memory.relations import content_hash, parse_relation
from memory.store import EMBEDDING_DIM, Link, MemoryStore
from memory.tiers import short_term_expiry

__all__ = [
    "DuplicateContentError",
    "ImportFormatError",
    "ImportReport",
    "edit_memory",
    "export_jsonl",
    "export_parquet",
    "import_jsonl",
    "import_parquet",
]

BATCH = 1000  # memories read or written at a time
_ID_NAMESPACE = uuid.UUID("6f0b5a8e-3c1d-4f7a-9e2b-5d4c3b2a1f00")
_TIMES = ("valid_from", "valid_to", "recorded_at", "expires_at", "created_at", "updated_at",
          "last_accessed", "identity_since")

_EXTRAS = ("identity_since", "embedding", "links")  # record fields beside the entry's own

Target = str | Path | IO[Any]


class ImportFormatError(ValueError):
    """The file is not a memlane export (the message names the record)."""


class DuplicateContentError(ValueError):
    """An edit would give a current memory the content another current memory holds."""

    def __init__(self, existing_id: str) -> None:
        super().__init__(f"memory {existing_id} already holds this content")
        self.existing_id = existing_id


@dataclass(frozen=True, slots=True)
class ImportReport:
    imported: int = 0  # memories inserted
    skipped: int = 0  # memories already in the store (same id)
    links: int = 0  # links inserted


# -- editing ---------------------------------------------------------------------------


def edit_memory(
    store: MemoryStore,
    user_id: str,
    memory_id: str,
    *,
    content: str | None = None,
    tags: Iterable[str] | None = None,
    domains: Iterable[str] | None = None,
    importance: float | None = None,
    validated: bool | None = None,
    tier: Tier | None = None,
    memory_type: MemoryType | None = None,
    truth_category: TruthCategory | None = None,
) -> MemoryEntry | None:
    """Change fields of one of the user's memories (None leaves a field as it is); None if the
    user has no such memory.

    New content gets a new hash, relation and embedding. A memory moved to SHORT_TERM expires
    after the short-term TTL from now; moved out of it, it no longer expires. Tagging a memory
    `identity` starts its identity clock (the 30-day promotion rule); untagging stops it.
    """
    entry = store.get(user_id, memory_id)
    if entry is None:
        return None
    now = store.clock.now()
    changes: dict[str, Any] = {
        name: value
        for name, value in (("importance", importance), ("validated", validated), ("tier", tier),
                            ("memory_type", memory_type), ("truth_category", truth_category))
        if value is not None
    }
    embedding = None
    if content is not None:
        content = content.strip()
        if not content:
            raise ValueError("memory content is empty")
        digest = content_hash(content)
        other = store.current_by_hash(user_id, digest)
        if entry.is_current and other is not None and other.id != memory_id:
            raise DuplicateContentError(other.id)
        relation = parse_relation(content)
        changes.update(
            content=content, content_hash=digest, subject=relation and relation.subject,
            relation=relation and relation.relation, value=relation and relation.value,
        )
        embedding = store.embedder.embed([content])[0]
    if tags is not None:
        changes["tags"] = tuple(dict.fromkeys(tags))
        if ("identity" in changes["tags"]) != ("identity" in entry.tags):
            changes["identity_since"] = now if "identity" in changes["tags"] else None
    if domains is not None:
        changes["domains"] = tuple(dict.fromkeys(domains))
    if tier is not None and tier is not entry.tier:
        changes["expires_at"] = short_term_expiry(store.tier_policy, now) if tier is Tier.SHORT_TERM else None
    store.update_entry(user_id, memory_id, **changes, updated_at=now)
    if embedding is not None:
        store.replace_vector(user_id, memory_id, embedding)
    return store.get(user_id, memory_id)


# -- export ----------------------------------------------------------------------------


def export_records(store: MemoryStore, user_id: str) -> Iterator[dict[str, Any]]:
    """The user's memories, history included, newest first, as export records."""
    offset = 0
    while page := store.list(user_id, limit=BATCH, offset=offset, include_history=True):
        ids = [e.id for e in page]
        vectors = store.vectors_of(user_id, ids)
        since = store.identity_since_of(user_id, ids)
        links: dict[str, list[dict[str, Any]]] = {}
        for link, created_at in store.links_with_times(user_id, ids):
            links.setdefault(link.src_id, []).append(
                {"dst_id": link.dst_id, "kind": link.kind, "weight": link.weight,
                 "created_at": created_at.isoformat()}
            )
        for entry in page:
            record = entry_to_dict(entry)
            del record["score"]
            since_at = since.get(entry.id)
            record["identity_since"] = since_at.isoformat() if since_at else None
            record["embedding"] = vectors[entry.id].tolist()
            record["links"] = links.get(entry.id, [])
            yield record
        offset += len(page)


def export_jsonl(store: MemoryStore, user_id: str, target: Target) -> int:
    """Write the user's memories as JSONL to a path or a text or binary file; returns how many."""
    count = 0
    with _text(target, "w") as out:
        for record in export_records(store, user_id):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def _parquet_schema() -> pa.Schema:
    text, time, texts = pa.string(), pa.timestamp("us"), pa.list_(pa.string())
    source = pa.struct([("kind", text), ("ref", text), ("extractor", text),
                        ("conversation_id", text), ("recorded_at", time)])
    confidence = pa.struct([("overall", pa.float64()), ("source_reliability", pa.float64()),
                            ("recency", pa.float64()), ("corroboration_count", pa.int64()),
                            ("contradiction_count", pa.int64())])
    link = pa.struct([("dst_id", text), ("kind", text), ("weight", pa.float64()), ("created_at", time)])
    fields = {
        "id": text, "user_id": text, "content": text, "content_hash": text, "tier": text,
        "truth_category": text, "memory_type": text, "confidence": confidence,
        "created_at": time, "updated_at": time, "valid_from": time, "recorded_at": time,
        "summary": text, "importance": pa.float64(), "tags": texts, "domains": texts,
        "entities": texts, "subject": text, "relation": text, "value": text,
        "validated": pa.bool_(), "valid_to": time, "superseded_by": text, "supersedes": text,
        "expires_at": time, "last_accessed": time, "access_count": pa.int64(),
        "related_memories": texts, "contradicts": texts, "supports": texts,
        "sources": pa.list_(source), "identity_since": time,
        "embedding": pa.list_(pa.float32(), EMBEDDING_DIM), "links": pa.list_(link),
    }
    return pa.schema(list(fields.items()), metadata={"memlane_export": "1"})


def export_parquet(store: MemoryStore, user_id: str, target: str | Path | IO[bytes]) -> int:
    """Write the user's memories as one Parquet file; returns how many."""
    schema, count = _parquet_schema(), 0
    with pq.ParquetWriter(target, schema) as writer:
        for batch in _chunks(export_records(store, user_id)):
            rows = [_times(record, datetime.fromisoformat) for record in batch]
            writer.write_table(pa.Table.from_pylist(rows, schema))
            count += len(rows)
    return count


# -- import ----------------------------------------------------------------------------


def import_jsonl(store: MemoryStore, user_id: str, source: Target) -> ImportReport:
    """Import a JSONL export (path, or text or binary file) into the user's memories."""
    with _text(source, "r") as lines:
        records = (_json_line(n, line) for n, line in enumerate(lines, 1) if line.strip())
        return import_records(store, user_id, records)


def import_parquet(store: MemoryStore, user_id: str, source: str | Path | IO[bytes]) -> ImportReport:
    """Import a Parquet export (path or binary file) into the user's memories."""
    try:
        parquet = pq.ParquetFile(source)
    except (pa.ArrowException, OSError) as exc:
        raise ImportFormatError(f"not a Parquet file: {exc}") from exc

    def records() -> Iterator[dict[str, Any]]:
        for batch in parquet.iter_batches(BATCH):
            for record in batch.to_pylist():
                yield _times(record, lambda t: t.isoformat())

    return import_records(store, user_id, records())


def import_records(store: MemoryStore, user_id: str, records: Iterable[dict[str, Any]]) -> ImportReport:
    """Import export records in batches of `BATCH` (one transaction each); see the module
    docstring for what happens to ids."""
    report = ImportReport()
    for batch in _chunks(records):
        report = _restore(store, user_id, batch, report)
    if report.imported:
        store.refresh_text_index()
    return report


def _restore(store: MemoryStore, user_id: str, records: list[dict[str, Any]], report: ImportReport) -> ImportReport:
    try:
        entries = {}
        for record in records:
            entry = _entry_of(user_id, record)
            entries.setdefault(entry.id, (entry, record))
        stored = store.owners_of(list(entries))
        fresh = [(entry, record) for entry, record in entries.values() if entry.id not in stored]
        vectors = np.array([record["embedding"] for _, record in fresh], dtype=np.float32)
        links = [
            (Link(entry.id, _id_for(user_id, record["user_id"], link["dst_id"]), link["kind"],
                  float(link["weight"])),
             datetime.fromisoformat(link["created_at"]))
            for entry, record in fresh for link in record.get("links") or ()
        ]
        since = {
            entry.id: datetime.fromisoformat(record["identity_since"])
            for entry, record in fresh if record.get("identity_since")
        }
        store.restore_entries([entry for entry, _ in fresh], vectors.reshape(len(fresh), EMBEDDING_DIM),
                              identity_since=since, links=links)
    except (KeyError, TypeError, ValueError) as exc:
        first = report.imported + report.skipped + 1
        raise ImportFormatError(f"a record from record {first} on is malformed: {exc!r}") from exc
    return ImportReport(report.imported + len(fresh), report.skipped + len(records) - len(fresh),
                        report.links + len(links))


def _entry_of(user_id: str, record: dict[str, Any]) -> MemoryEntry:
    """The record's memory as the user's memory (ids mapped by `_id_for`)."""
    entry = entry_from_dict({k: v for k, v in record.items() if k not in _EXTRAS})
    if entry.user_id == user_id:
        return entry
    owner = entry.user_id

    def new(memory_id: str | None) -> str | None:
        return None if memory_id is None else _id_for(user_id, owner, memory_id)

    return replace(entry, id=new(entry.id), user_id=user_id, superseded_by=new(entry.superseded_by),
                   supersedes=new(entry.supersedes), related_memories=(), contradicts=(), supports=())


def _id_for(user_id: str, owner: str, memory_id: str) -> str:
    """The id, in `user_id`'s store, of the memory `owner` exported as `memory_id`."""
    if owner == user_id:
        return memory_id
    return uuid.uuid5(_ID_NAMESPACE, f"{user_id}\x00{memory_id}").hex


def _chunks(items: Iterable[Any]) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


# -- file plumbing ---------------------------------------------------------------------


@contextmanager
def _text(target: Target, mode: str) -> Iterator[IO[str]]:
    """A text stream over a path, a text file or a binary file (left open if given open)."""
    if isinstance(target, str | Path):
        with open(target, mode, encoding="utf-8") as f:
            yield f
    elif isinstance(target, io.TextIOBase):
        yield target  # type: ignore[misc]
    else:
        wrapper = io.TextIOWrapper(target, encoding="utf-8")  # type: ignore[arg-type]
        try:
            yield wrapper
        finally:
            wrapper.flush()
            wrapper.detach()


def _json_line(n: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ImportFormatError(f"line {n} is not JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise ImportFormatError(f"line {n} is not a JSON object")
    return record


def _times(record: dict[str, Any], convert: Any) -> dict[str, Any]:
    """The record with its timestamps converted (ISO strings <-> datetimes, for Parquet)."""

    def fix(value: Any) -> Any:
        return None if value is None else convert(value)

    out = {k: fix(v) if k in _TIMES else v for k, v in record.items()}
    out["sources"] = [{**s, "recorded_at": fix(s.get("recorded_at"))} for s in record.get("sources") or ()]
    out["links"] = [{**k, "created_at": fix(k.get("created_at"))} for k in record.get("links") or ()]
    return out
