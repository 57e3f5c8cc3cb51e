"""Writing a memory: dedup and corroboration, contradiction and supersession, first tier.

`remember` is the one way a memory is written (API, CLI, extractor, import of single rows):
1. the same normalised content (content hash), or a memory at cosine >= 0.95, among the user's
   current memories is corroborated instead of duplicated: its corroboration count and
   confidence go up and the new source is added to its provenance;
2. a sentence stating a single-valued relation ("The user lives in Berlin.") that a current
   memory states with a different value ("The user lives in Paris.") supersedes it: the old one
   gets `valid_to` and `superseded_by`, stays as history and is no longer retrieved; both carry
   a `contradicts` link and their contradiction counts go up; the same value corroborates;
3. anything else is a new SHORT_TERM memory expiring after the TTL, promoted at once if the
   tier rules already allow it (a memory the user wrote themselves counts as validated).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np

from memory.entry import (
    Confidence,
    MemoryEntry,
    MemorySource,
    MemoryType,
    Tier,
    TruthCategory,
)
from memory.relations import classify, content_hash, parse_relation
from memory.rows import new_memory_id
from memory.tiers import next_tier, short_term_expiry

if TYPE_CHECKING:
    from memory.store import MemoryStore

__all__ = ["DEDUP_COSINE", "SOURCE_RELIABILITY", "RememberResult", "remember", "source_from_label"]

DEDUP_COSINE = 0.95
# How far each kind of source is trusted (confidence of a first statement).
SOURCE_RELIABILITY = {
    "api": 0.9,  # the user wrote it, through the API or the CLI
    "cli": 0.9,
    "import": 0.8,
    "interaction": 0.6,  # extracted from what the user said in a chat
    "consolidation": 0.5,
}
USER_WRITTEN = frozenset({"api", "cli"})


@dataclass(frozen=True, slots=True)
class RememberResult:
    entry: MemoryEntry  # the memory now holding the content
    action: str  # "created" | "corroborated" | "superseded" (created, replacing older ones)
    superseded: tuple[str, ...] = ()

    @property
    def created(self) -> bool:
        return self.action != "corroborated"


def source_from_label(label: str, ref: str | None = None) -> MemorySource:
    """The provenance for a short label: "api", "cli", "import", "extractor:rules"."""
    if label.startswith("extractor:"):
        return MemorySource("interaction", ref, label.removeprefix("extractor:"))
    return MemorySource(label, ref)


def remember(
    store: MemoryStore,
    user_id: str,
    content: str,
    *,
    source: MemorySource,
    embedding: np.ndarray | None = None,
    kind: str | None = None,
    memory_type: MemoryType | None = None,
    truth_category: TruthCategory | None = None,
    tags: Sequence[str] = (),
    domains: Sequence[str] = (),
    entities: Sequence[str] = (),
    importance: float = 0.5,
    validated: bool | None = None,
    summary: str | None = None,
    derived_from: Sequence[str] = (),
) -> RememberResult:
    content = content.strip()
    if not content:
        raise ValueError("memory content is empty")
    store.check_writable()
    now = store.clock.now()
    source = replace(source, recorded_at=source.recorded_at or now)
    reliability = SOURCE_RELIABILITY.get(source.kind, 0.5)
    validated = source.kind in USER_WRITTEN if validated is None else validated

    existing = store.current_by_hash(user_id, content_hash(content))
    if existing is not None:
        return _corroborate(store, existing, source, reliability, validated)
    if embedding is None:
        embedding = store.embedder.embed([content])[0]
    for memory_id, similarity in store.vector_neighbours(user_id, embedding, 3):
        if similarity < DEDUP_COSINE:
            break
        near = store.get(user_id, memory_id)
        if near is not None and near.is_current:
            return _corroborate(store, near, source, reliability, validated)

    relation = parse_relation(content)
    conflicting: list[MemoryEntry] = []
    if relation is not None:
        for current in store.current_by_relation(user_id, relation.subject, relation.relation):
            if current.value == relation.value:
                return _corroborate(store, current, source, reliability, validated)
            conflicting.append(current)

    auto_type, auto_truth, auto_tags = classify(content, kind)
    all_tags = tuple(dict.fromkeys([*tags, *auto_tags]))
    entry = MemoryEntry(
        id=new_memory_id(),
        user_id=user_id,
        content=content,
        summary=summary,
        content_hash=content_hash(content),
        tier=Tier.SHORT_TERM,
        truth_category=truth_category or auto_truth,
        memory_type=memory_type or auto_type,
        confidence=Confidence(reliability, reliability, 1.0, 0, len(conflicting)),
        created_at=now,
        updated_at=now,
        valid_from=now,
        recorded_at=now,
        importance=importance,
        tags=all_tags,
        domains=tuple(domains),
        entities=tuple(entities),
        subject=relation.subject if relation else None,
        relation=relation.relation if relation else None,
        value=relation.value if relation else None,
        validated=validated,
        supersedes=conflicting[-1].id if conflicting else None,
        expires_at=short_term_expiry(store.tier_policy, now),
    )
    identity_since = now if "identity" in all_tags else None
    entry = _initial_tier(entry, store, identity_since, now)
    from memory.rows import Link

    links = [Link(entry.id, old.id, "contradicts") for old in conflicting]
    links += [Link(entry.id, old.id, "supersedes") for old in conflicting]
    links += [Link(entry.id, parent, "derived_from") for parent in derived_from]
    store.insert_entry(entry, embedding, [source], links, identity_since=identity_since)
    for old in conflicting:
        store.update_entry(
            user_id, old.id, valid_to=now, superseded_by=entry.id, updated_at=now,
            contradiction_count=old.confidence.contradiction_count + 1,
        )
    superseded = tuple(old.id for old in conflicting)
    return RememberResult(entry, "superseded" if superseded else "created", superseded)


def build_entry(
    store: MemoryStore, user_id: str, content: str, source: MemorySource, *,
    tier: Tier | None = None, kind: str | None = None,
) -> MemoryEntry:
    """A new memory with classification, relation and confidence from its source, no rules
    against stored memories applied (for bulk inserts)."""
    now = store.clock.now()
    content = content.strip()
    reliability = SOURCE_RELIABILITY.get(source.kind, 0.5)
    relation = parse_relation(content)
    memory_type, truth, tags = classify(content, kind)
    short = (tier or Tier.SHORT_TERM) is Tier.SHORT_TERM
    return MemoryEntry(
        id=new_memory_id(), user_id=user_id, content=content, content_hash=content_hash(content),
        tier=tier or Tier.SHORT_TERM, truth_category=truth, memory_type=memory_type,
        confidence=Confidence(reliability, reliability), created_at=now, updated_at=now,
        valid_from=now, recorded_at=now, tags=tags,
        subject=relation.subject if relation else None,
        relation=relation.relation if relation else None,
        value=relation.value if relation else None,
        validated=source.kind in USER_WRITTEN,
        expires_at=short_term_expiry(store.tier_policy, now) if short else None,
    )


def _initial_tier(
    entry: MemoryEntry, store: MemoryStore, identity_since: datetime | None, now: datetime
) -> MemoryEntry:
    while (up := next_tier(entry, now, store.tier_policy, identity_since=identity_since)) is not None:
        entry = replace(entry, tier=up, expires_at=None)
    return entry


def _corroborate(
    store: MemoryStore, entry: MemoryEntry, source: MemorySource, reliability: float, validated: bool
) -> RememberResult:
    """Another statement of a current memory: more confidence, one more source, fresh again."""
    c = entry.confidence
    now = store.clock.now()
    confidence = replace(
        c,
        overall=round(1 - (1 - c.overall) * (1 - 0.5 * reliability), 6),
        recency=1.0,
        corroboration_count=c.corroboration_count + 1,
    )
    store.add_source(entry.user_id, entry.id, source)
    store.update_entry(
        entry.user_id, entry.id,
        confidence=confidence.overall, recency=1.0,
        corroboration_count=confidence.corroboration_count,
        validated=entry.validated or validated, updated_at=now,
    )
    updated = replace(entry, confidence=confidence, validated=entry.validated or validated, updated_at=now)
    promoted = _initial_tier(updated, store, store.identity_since(entry.id), now)
    if promoted.tier is not entry.tier:
        store.update_entry(entry.user_id, entry.id, tier=promoted.tier, expires_at=None)
    fresh = store.get(entry.user_id, entry.id)
    return RememberResult(fresh or promoted, "corroborated")

