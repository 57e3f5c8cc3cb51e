"""The promotion engine, expiry and decay, with a clock the tests move by days."""

import math
import random
from dataclasses import replace
from datetime import datetime, timedelta

import pytest

from memory import HashEmbedder, MemorySource, MemoryStore, MemoryType, Tier, TierPolicy, TruthCategory
from memory.remember import remember
from memory.tiers import maintenance_candidates, next_tier, recency

CHAT = MemorySource("interaction", "req-1", "rules")


class Clock:
    def __init__(self) -> None:
        self.t = datetime(2026, 1, 1, 9, 0)

    def now(self) -> datetime:
        return self.t

    def advance(self, **delta: float) -> None:
        self.t += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock):
    with MemoryStore.open(":memory:", embedder=HashEmbedder(), clock=clock) as opened:
        yield opened


def tier_of(store: MemoryStore, memory_id: str) -> Tier | None:
    entry = store.get("ada", memory_id)
    return None if entry is None else entry.tier


def test_a_fact_heard_once_in_chat_starts_short_term_with_a_ttl(store, clock):
    entry, created = store.add("ada", "The user plays the oboe.", source=CHAT)
    assert created and entry.tier is Tier.SHORT_TERM and not entry.validated
    assert entry.expires_at == clock.t + timedelta(hours=72)


def test_corroborated_twice_with_enough_confidence_promotes_to_long_term(store):
    entry, _ = store.add("ada", "The user plays the oboe.", source=CHAT)
    store.add("ada", "The user plays the oboe.", source=CHAT)
    assert tier_of(store, entry.id) is Tier.SHORT_TERM  # once is not enough
    again, created = store.add("ada", "the user plays the OBOE", source=CHAT)
    assert not created and again.confidence.corroboration_count == 2
    assert again.confidence.overall >= 0.6 and again.tier is Tier.LONG_TERM


def test_three_days_without_contradiction_promotes(store, clock):
    entry, _ = store.add("ada", "The user plays the oboe.", source=CHAT)
    clock.advance(days=2, hours=23)
    store.maintain()
    assert tier_of(store, entry.id) is Tier.SHORT_TERM
    clock.advance(hours=1)
    report = store.maintain()
    assert tier_of(store, entry.id) is Tier.LONG_TERM
    assert report.promoted == {"SHORT_TERM->LONG_TERM": 1}


def test_a_contradicted_short_term_memory_expires_at_its_ttl(store, clock):
    paris, _ = store.add("ada", "The user lives in Paris.", source=CHAT)
    berlin, _ = store.add("ada", "The user lives in Berlin.", source=CHAT)
    # Paris is history now; Berlin superseded it and is not itself contradicted.
    clock.advance(hours=72)
    store.maintain()
    assert tier_of(store, berlin.id) is Tier.LONG_TERM
    assert store.get("ada", paris.id).valid_to is not None  # history is kept


def test_an_unpromoted_memory_expires_with_a_short_ttl(clock):
    policy = TierPolicy(short_term_ttl=timedelta(hours=24))
    with MemoryStore.open(":memory:", embedder=HashEmbedder(), clock=clock, tier_policy=policy) as store:
        kept, _ = store.add("ada", "The user plays the oboe.", source=CHAT)
        for _ in range(2):
            store.add("ada", "The user plays the oboe.", source=CHAT)
        gone, _ = store.add("ada", "The user collects stamps.", source=CHAT)
        clock.advance(hours=23)
        assert store.maintain().expired == 0
        clock.advance(hours=1)
        report = store.maintain()
        assert report.expired == 1
        assert store.get("ada", gone.id) is None and store.get("ada", kept.id) is not None
        assert store.search_text("ada", "collects stamps", min_score=0.3) == []


def test_a_ttl_outside_24_to_72_hours_is_refused():
    with pytest.raises(ValueError, match="24 and 72"):
        TierPolicy(short_term_ttl=timedelta(hours=12))


def test_what_the_user_writes_is_validated_and_promoted_at_once(store):
    entry, _ = store.add("ada", "The user prefers dark roast coffee.", source="api")
    assert entry.validated and entry.tier is Tier.LONG_TERM and entry.expires_at is None


def test_validated_later_promotes_a_short_term_memory(store):
    entry, _ = store.add("ada", "The user prefers dark roast coffee.", source=CHAT)
    assert entry.tier is Tier.SHORT_TERM
    store.update_entry("ada", entry.id, validated=True)
    store.maintain()
    assert tier_of(store, entry.id) is Tier.LONG_TERM


def test_an_absolute_truth_held_with_high_confidence_becomes_persistent(store):
    entry = remember(store, "ada", "The user was born in 1990.", source=MemorySource("api"),
                     truth_category=TruthCategory.ABSOLUTE).entry
    assert entry.confidence.overall >= 0.9
    assert entry.tier is Tier.PERSISTENT  # validated -> long-term -> persistent, by the rules
    opinion = remember(store, "ada", "The user thinks tabs are better.", source=MemorySource("api")).entry
    assert opinion.tier is Tier.LONG_TERM


def test_an_identity_fact_becomes_persistent_after_thirty_days(store, clock):
    entry = remember(store, "ada", "The user's name is Ada.", source=MemorySource("import")).entry
    assert "identity" in entry.tags and entry.confidence.overall < 0.9
    clock.advance(days=3)
    store.maintain()
    assert tier_of(store, entry.id) is Tier.LONG_TERM
    clock.advance(days=26)
    store.maintain()
    assert tier_of(store, entry.id) is Tier.LONG_TERM
    clock.advance(days=1)
    store.maintain()
    assert tier_of(store, entry.id) is Tier.PERSISTENT


def test_a_preference_accessed_ten_times_over_sixty_days_becomes_persistent(store, clock):
    entry = remember(store, "ada", "The user likes green tea.", source=MemorySource("cli"),
                     kind="preference").entry
    assert entry.tier is Tier.LONG_TERM
    for _ in range(10):
        clock.advance(days=5)
        assert store.search_text("ada", "green tea", k=1)[0].id == entry.id
        store.flush()
    assert store.get("ada", entry.id).access_count == 10
    store.maintain()
    assert tier_of(store, entry.id) is Tier.LONG_TERM  # 50 days so far
    clock.advance(days=10)
    store.maintain()
    assert tier_of(store, entry.id) is Tier.PERSISTENT


def test_unused_memories_decay_and_the_faintest_are_forgotten(store, clock):
    used = remember(store, "ada", "The user likes green tea.", source=CHAT, validated=False).entry
    idle = remember(store, "ada", "The user owns a kayak.", source=CHAT).entry
    clock.advance(days=3)
    store.maintain()  # both long-term now
    assert tier_of(store, idle.id) is Tier.LONG_TERM
    for _ in range(12):
        clock.advance(days=30)
        store.search_text("ada", "green tea", k=1)
        store.flush()
        store.maintain()
    assert store.get("ada", used.id).confidence.recency > 0.7
    assert store.get("ada", idle.id) is None  # 0.6 x recency fell under 0.05


def test_persistent_memories_never_decay_away(store, clock):
    entry = remember(store, "ada", "The user was born in 1990.", source=MemorySource("api")).entry
    assert entry.tier is Tier.PERSISTENT
    clock.advance(days=3650)
    store.maintain()
    kept = store.get("ada", entry.id)
    assert kept is not None and kept.confidence.recency < 0.01


def _due(entry, now: datetime, policy: TierPolicy, since: datetime | None) -> bool:
    """Whether a pass must read this row, by the rules alone: promotion, expiry, forgetting
    (decay is one UPDATE, checked below)."""
    tier = entry.tier
    while (up := next_tier(replace(entry, tier=tier), now, policy, identity_since=since)) is not None:
        tier = up
    if tier is not entry.tier:
        return True
    if tier is Tier.SHORT_TERM:
        return True  # may expire; the pass looks at every short-term row
    return (tier is Tier.LONG_TERM and not entry.validated
            and entry.confidence.overall * recency(entry, now, policy) < policy.forget_below)


def test_a_pass_reads_every_row_it_could_change_and_not_the_settled_ones(store, clock):
    """The pass reads only `maintenance_candidates`: checked against the rules on 600 rows with
    random tiers, kinds, confidences, recencies, uses and ages, some of them on the thresholds."""
    rng = random.Random(7)
    policy = store.tier_policy
    for i in range(600):
        entry, _ = store.add("ada", f"The user keeps fact number {i}.", source=CHAT)
        idle = rng.choice([0.0, 1.0, 3600.0, 86400 * rng.uniform(0, 400)])
        seen = clock.t - timedelta(seconds=idle)
        exact = math.exp(-math.log(2) * idle / policy.half_life.total_seconds())
        store.update_entry(
            "ada", entry.id,
            tier=rng.choice(list(Tier)), truth_category=rng.choice(list(TruthCategory)),
            memory_type=rng.choice(list(MemoryType)),
            confidence=rng.choice([0.05, 0.5, 0.89, 0.9, 0.95, rng.random()]),
            recency=rng.choice([exact, exact + 0.0011, exact - 0.0009, 1.0, rng.random()]),
            access_count=rng.choice([0, 9, 10, 40]), validated=rng.random() < 0.3,
            tags=rng.choice([[], ["identity"], ["work"]]),
            updated_at=seen, last_accessed=rng.choice([None, seen]),
            expires_at=rng.choice([None, clock.t - timedelta(hours=1), clock.t + timedelta(hours=1)]),
        )
    clock.advance(seconds=1)
    now = clock.now()
    every = store.entries_where("valid_to IS NULL")
    read = {e.id for e in store.entries_where(*maintenance_candidates(policy, now))}
    due = {e.id for e in every if _due(e, now, policy, store.identity_since(e.id))}
    assert due <= read  # nothing the rules would change is skipped
    settled = {e.id for e in every} - due
    assert settled and len(read & settled) < len(settled) / 10  # and the settled rows stay unread


def test_a_pass_over_settled_memories_decays_them_without_reading_them(store, clock, monkeypatch):
    import memory.store

    ids = [remember(store, "ada", f"The user visited city number {i}.", source=CHAT).entry.id for i in range(50)]
    clock.advance(days=3)
    store.maintain()  # promoted, which counts as an update ...
    store.maintain()  # ... so recency moves once more
    assert not store.entries_where(*maintenance_candidates(store.tier_policy, clock.now()))
    rows_read = []
    real = memory.store.entry_from_row
    monkeypatch.setattr(memory.store, "entry_from_row", lambda row: rows_read.append(row[0]) or real(row))
    clock.advance(days=1)  # a day idle moves recency by ~0.008
    assert store.maintain().decayed == 50 and rows_read == []
    expected = math.exp(-math.log(2) * 1 / 90)
    assert all(abs(store.get("ada", i).confidence.recency - expected) < 1e-9 for i in ids)
    assert store.maintain().decayed == 0  # and once only
