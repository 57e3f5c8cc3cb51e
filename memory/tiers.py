"""The three tiers and the promotion engine: promotion, expiry and decay, by the seed's rules.

Short-term to long-term (any one):
  confidence >= 0.6 and corroborated >= 2 times; or persisted 3+ days with no contradiction;
  or validated by the user.
Long-term to persistent (any one):
  truth category ABSOLUTE with confidence >= 0.9; or tagged `identity` for 30+ days; or a
  PREFERENCE accessed 10+ times over 60+ days (counted from when it was recorded).
A short-term memory that reaches its TTL (24-72 h, `short_term_ttl`) without meeting a
promotion rule expires: it is deleted with everything derived from it. Promotion is checked
first, so with a 72 h TTL an uncontradicted memory is promoted by the 3-day rule when its TTL
runs out; with a shorter TTL only corroborated or validated memories survive.

Decay: every current memory's `recency` is exp(-ln 2 * idle / half_life), idle counted from its
last access or update. A long-term memory nobody validated whose confidence x recency falls
below `forget_below` is forgotten; persistent memories and history are never decayed away.

The clock is the store's (`store.clock`), so tests run months of rules in milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import structlog

from memory.entry import MemoryEntry, MemoryType, Tier, TruthCategory

if TYPE_CHECKING:
    from memory.store import MemoryStore

__all__ = ["MaintenanceReport", "TierPolicy", "maintenance_candidates", "next_tier", "run_maintenance",
           "short_term_expiry"]

log = structlog.get_logger("memlane.tiers")


@dataclass(frozen=True, slots=True)
class TierPolicy:
    short_term_ttl: timedelta = timedelta(hours=72)  # the seed allows 24-72 h
    promote_confidence: float = 0.6  # with ...
    promote_corroborations: int = 2
    promote_after: timedelta = timedelta(days=3)  # uncontradicted for this long
    persist_confidence: float = 0.9  # for ABSOLUTE truths
    identity_for: timedelta = timedelta(days=30)
    preference_accesses: int = 10
    preference_span: timedelta = timedelta(days=60)
    half_life: timedelta = timedelta(days=90)  # recency halves after this long unused
    forget_below: float = 0.05  # confidence x recency under which a long-term memory goes

    def __post_init__(self) -> None:
        if not timedelta(hours=24) <= self.short_term_ttl <= timedelta(hours=72):
            raise ValueError("short_term_ttl must be between 24 and 72 hours")


def short_term_expiry(policy: TierPolicy, recorded_at: datetime) -> datetime:
    return recorded_at + policy.short_term_ttl


def next_tier(
    entry: MemoryEntry, now: datetime, policy: TierPolicy, *, identity_since: datetime | None = None
) -> Tier | None:
    """The tier `entry` should move up to now, or None if it stays."""
    c = entry.confidence
    if entry.tier is Tier.SHORT_TERM:
        if c.overall >= policy.promote_confidence and c.corroboration_count >= policy.promote_corroborations:
            return Tier.LONG_TERM
        # Contradictions it received: superseding an older memory counts one on both sides.
        received = c.contradiction_count - (1 if entry.supersedes else 0)
        if received <= 0 and now - entry.recorded_at >= policy.promote_after:
            return Tier.LONG_TERM
        if entry.validated:
            return Tier.LONG_TERM
        return None
    if entry.tier is Tier.LONG_TERM:
        if entry.truth_category is TruthCategory.ABSOLUTE and c.overall >= policy.persist_confidence:
            return Tier.PERSISTENT
        if "identity" in entry.tags and identity_since is not None and now - identity_since >= policy.identity_for:
            return Tier.PERSISTENT
        if (entry.memory_type is MemoryType.PREFERENCE
                and entry.access_count >= policy.preference_accesses
                and now - entry.recorded_at >= policy.preference_span):
            return Tier.PERSISTENT
    return None


def recency(entry: MemoryEntry, now: datetime, policy: TierPolicy) -> float:
    seen = max(entry.last_accessed or entry.updated_at, entry.updated_at)
    idle_days = max((now - seen).total_seconds(), 0.0) / 86400
    return math.exp(-math.log(2) * idle_days / (policy.half_life.total_seconds() / 86400))


# Seconds since a memory was last used or changed, as `recency` counts them.
_IDLE_SQL = ("greatest(epoch(?::TIMESTAMP) - epoch(greatest(coalesce(last_accessed, updated_at), "
             "updated_at)), 0)")
_SLACK = 1e-6  # the SQL is looser than the rules by this much: float rounding never hides a row
RECENCY_STEP = 1e-3  # a pass writes a memory's recency when it moved by more than this


def recency_sql(policy: TierPolicy, now: datetime) -> tuple[str, list[object]]:
    """`recency` as a SQL expression on `memories` (the same formula as `recency`)."""
    return f"exp(-ln(2) * {_IDLE_SQL} / ?)", [now, policy.half_life.total_seconds()]


def maintenance_candidates(policy: TierPolicy, now: datetime) -> tuple[str, list[object]]:
    """A filter on `memories` for the current rows a pass reads: every short-term row
    (promotion by age, expiry), the long-term rows a persistence rule may fire for, and those
    that may fall under `forget_below`. A superset: the rules above decide on each row it
    returns; a long-time user's settled memories are not read (10,000 of them were a third of
    a second of the learner holding the GIL, every run). Decay is one UPDATE (`run_maintenance`)."""
    factor, factor_params = recency_sql(policy, now)
    where = (
        "valid_to IS NULL AND ("
        "tier = 'SHORT_TERM'"
        " OR (tier = 'LONG_TERM' AND ((truth_category = 'ABSOLUTE' AND confidence >= ?)"
        " OR (list_contains(tags, 'identity') AND identity_since <= ?)"
        " OR (memory_type = 'PREFERENCE' AND access_count >= ? AND recorded_at <= ?)"
        f" OR (NOT validated AND confidence * {factor} < ?))))"
    )
    params: list[object] = [
        policy.persist_confidence - _SLACK, now - policy.identity_for,
        policy.preference_accesses, now - policy.preference_span,
        *factor_params, policy.forget_below + _SLACK,
    ]
    return where, params


@dataclass(slots=True)
class MaintenanceReport:
    promoted: dict[str, int] = field(default_factory=dict)  # "SHORT_TERM->LONG_TERM": n
    expired: int = 0
    decayed: int = 0
    forgotten: int = 0
    jobs_pruned: int = 0  # learner jobs done longer ago than the store keeps them


def run_maintenance(store: MemoryStore) -> MaintenanceReport:
    """One pass over every user's current memories: decay, promote, expire, forget."""
    policy, now = store.tier_policy, store.clock.now()
    report = MaintenanceReport()
    expired: dict[str, list[str]] = {}
    forgotten: dict[str, list[str]] = {}
    # One transaction for the pass. Decay first, in SQL: after days without a pass every
    # memory's recency has moved (10k rows), and none of them needs to become a Python object.
    with store.transaction():
        factor, params = recency_sql(policy, now)
        decayed = set(store.set_recency_where(factor, params, min_change=RECENCY_STEP))
        _promote_expire_forget(store, policy, now, report, expired, forgotten)
    for user_id, ids in expired.items():
        report.expired += len(store.delete_entries(user_id, ids))
    for user_id, ids in forgotten.items():
        report.forgotten += len(store.delete_entries(user_id, ids))
    report.decayed = len(decayed.difference(*expired.values(), *forgotten.values()))
    log.info("maintenance_done", promoted=sum(report.promoted.values()), expired=report.expired,
             decayed=report.decayed, forgotten=report.forgotten)
    return report


def _promote_expire_forget(store: MemoryStore, policy: TierPolicy, now: datetime, report: MaintenanceReport,
                           expired: dict[str, list[str]], forgotten: dict[str, list[str]]) -> None:
    """Promote in place; collect what expired or is to be forgotten."""
    for entry in store.entries_where(*maintenance_candidates(policy, now)):
        tier = entry.tier
        since = store.identity_since(entry.id) if "identity" in entry.tags else None
        while (up := next_tier(replace(entry, tier=tier), now, policy, identity_since=since)) is not None:
            key = f"{tier.value}->{up.value}"
            report.promoted[key] = report.promoted.get(key, 0) + 1
            tier = up
        if tier is Tier.SHORT_TERM and entry.expires_at is not None and now >= entry.expires_at:
            expired.setdefault(entry.user_id, []).append(entry.id)
            continue
        if (tier is Tier.LONG_TERM and not entry.validated
                and entry.confidence.overall * recency(entry, now, policy) < policy.forget_below):
            forgotten.setdefault(entry.user_id, []).append(entry.id)
            continue
        if tier is not entry.tier:
            store.update_entry(entry.user_id, entry.id, tier=tier, expires_at=None, updated_at=now)
