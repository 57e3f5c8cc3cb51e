"""The dream agents: each one's effect on a real DuckDB store, and its logged objective."""

from __future__ import annotations

import statistics
import time
from datetime import datetime, timedelta

import numpy as np
import pytest
from structlog.testing import capture_logs

from learner.dream import (
    ConsolidationReport,
    PreloadCache,
    consolidate,
    dream,
    forget,
    optimize,
    preload,
)
from memory import HashEmbedder, MemoryStore


class Clock:
    def __init__(self, start: datetime = datetime(2026, 1, 1, 12)) -> None:
        self.at = start

    def now(self) -> datetime:
        return self.at

    def advance(self, **delta: float) -> None:
        self.at += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    with MemoryStore.open(tmp_path / "dream.duckdb", embedder=HashEmbedder(), clock=clock) as opened:
        yield opened


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def _pair(seed: int, cosine: float) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors at about `cosine` from each other."""
    rng = np.random.default_rng(seed)
    a = _unit(rng.normal(size=384))
    noise = rng.normal(size=384)
    noise = _unit(noise - (noise @ a) * a)
    b = _unit(cosine * a + np.sqrt(1 - cosine**2) * noise)
    return a, b


def _current(store: MemoryStore, user: str = "ada") -> list[str]:
    return sorted(m.content for m in store.list(user))


def test_consolidation_merges_near_duplicates_into_the_strongest(store):
    a, b = _pair(1, 0.93)  # under the write-time dedup (0.95), over the merge threshold (0.9)
    first, _ = store.add("ada", "The user likes green tea.", source="api", embedding=a)
    second, _ = store.add("ada", "The user really likes green tea.", source="extractor:rules",
                          source_ref="req_1", embedding=b)
    store.add("ada", "The user lives in Oslo.")
    report = consolidate(store, "ada", clock=store.clock)
    assert (report.memories_before, report.memories_after, report.merged) == (3, 2, 1)
    assert _current(store) == ["The user likes green tea.", "The user lives in Oslo."]
    survivor, merged = store.get("ada", first.id), store.get("ada", second.id)
    assert survivor.confidence.corroboration_count == 1 and survivor.confidence.overall > first.confidence.overall
    assert "req_1" in [s.ref for s in survivor.sources]  # provenance kept
    assert merged.superseded_by == first.id and "merged" in merged.tags and not merged.is_current


def test_consolidation_since_a_time_compares_only_what_changed_since(store, clock):
    before = clock.now()
    a, b = _pair(5, 0.93)
    store.add("ada", "The user likes green tea.", embedding=a)
    store.add("ada", "The user really likes green tea.", embedding=b)
    clock.advance(seconds=60)
    assert consolidate(store, "ada", since=clock.now()).merged == 0  # nothing changed since: not compared
    assert len(store.list("ada")) == 2
    assert consolidate(store, "ada", since=before).merged == 1  # both written since: merged
    assert len(_current(store)) == 1


def test_consolidation_never_merges_different_facts_however_close_their_vectors(store):
    a, b = _pair(3, 0.93)  # two template facts MiniLM puts close together
    one = "The user writes TypeScript in Neovim at work."
    other = "The user writes Elixir in Sublime Text at work."
    store.add("ada", one, embedding=a)
    store.add("ada", other, embedding=b)
    assert consolidate(store, "ada").merged == 0
    assert _current(store) == sorted([one, other])


@pytest.mark.parametrize(("one", "other"), [
    ("The user has two kids.", "The user has three kids."),
    ("The user likes mushrooms.", "The user doesn't like mushrooms."),
    ("The user prefers chai over green tea.", "The user prefers green tea over chai."),
])
def test_consolidation_never_merges_different_numbers_or_polarity(store, one, other):
    a, b = _pair(2, 0.93)
    store.add("ada", one, embedding=a)
    store.add("ada", other, embedding=b)
    assert consolidate(store, "ada").merged == 0
    assert _current(store) == sorted([one, other])


def test_consolidation_strengthens_memories_in_use(store):
    used, _ = store.add("ada", "The user speaks French.")
    idle, _ = store.add("ada", "The user owns a bicycle.")
    for _ in range(7):
        store.record_access("ada", [used.id])
    store.flush()
    report = consolidate(store, "ada")
    assert report.strengthened == 1
    assert store.get("ada", used.id).importance == pytest.approx(0.8)  # 0.5 + 0.1 * log2(8)
    assert store.get("ada", idle.id).importance == 0.5
    assert report.used_importance_after > report.used_importance_before


def test_strengthening_patches_the_users_view_instead_of_rebuilding_it(store):
    """Importance raised by use is a score, like recency: the user's RAM view is patched (a
    rebuild of a 10,000-memory view took ~0.5 s, and a learning run every minute caused one)."""
    used, _ = store.add("ada", "The user speaks French.")
    store.add("ada", "The user owns a bicycle.")
    store._views.settle_s = 0.0
    for _ in range(7):
        store.record_access("ada", [used.id])
    store.user_signature("ada")  # starts the view's build
    store.flush()
    assert store._views.get("ada") is not None
    builds = []
    build = store._build_view
    store._build_view = lambda *a: (builds.append(a), build(*a))[1]
    assert consolidate(store, "ada").strengthened == 1
    store.user_signature("ada")
    store.flush()
    view = store._views.get("ada")
    assert builds == [] and view is not None
    assert view.entries[used.id].importance == pytest.approx(0.8) == store.get("ada", used.id).importance


def test_consolidation_logs_its_objective_with_before_and_after(store):
    store.add("ada", "The user lives in Oslo.")
    with capture_logs() as logs:
        consolidate(store, "ada")
    (event,) = [e for e in logs if e["event"] == "dream_consolidation"]
    assert event["memories_before"] == 1 and event["memories_after"] == 1 and "objective" in event


def test_forgetting_removes_irrelevant_and_redundant_memories_and_decays_the_rest(store, clock):
    stale, _ = store.add("ada", "The user watched a documentary about owls.", source="extractor:rules")
    validated, _ = store.add("ada", "The user is allergic to penicillin.", source="api")
    used, _ = store.add("ada", "The user plays chess on Sundays.", source="extractor:rules")
    a, b = _pair(3, 0.93)
    keep, _ = store.add("ada", "The user likes green tea.", source="api", embedding=a)
    clock.advance(seconds=1)  # the older of two equals survives a merge
    dup, _ = store.add("ada", "The user really likes green tea.", source="api", embedding=b)
    store.record_access("ada", [used.id])
    store.flush()
    consolidate(store, "ada")
    store.update_entry("ada", stale.id, confidence=0.3)
    clock.advance(days=200)
    with capture_logs() as logs:
        report = forget(store, "ada")
    assert report.removed_irrelevant == 1 and store.get("ada", stale.id) is None
    assert report.removed_redundant == 1 and store.get("ada", dup.id) is None
    assert store.get("ada", validated.id) is not None and store.get("ada", used.id) is not None
    assert store.get("ada", keep.id) is not None
    assert report.memories_after == report.memories_before - 2
    assert store.get("ada", validated.id).confidence.recency < 0.3  # 200 days at a 90-day half-life
    assert any(e["event"] == "dream_forgetting" for e in logs)


def test_forgetting_keeps_young_memories(store, clock):
    store.add("ada", "The user watched a documentary about owls.", source="extractor:rules")
    clock.advance(days=5)
    assert forget(store, "ada").removed_irrelevant == 0


def test_preloading_caches_context_of_frequent_domains_and_makes_the_next_request_faster(store):
    food = ["The user is vegetarian.", "The user loves spicy Thai food.", "The user can't eat gluten."]
    code = ["The user writes Python at work.", "The user prefers Postgres over MySQL."]
    for content in food + code + ["The user lives in Oslo."]:
        store.add("ada", content)
    store.record_domains("ada", ["food"] * 30 + ["programming"] * 10, "retrieval")
    cache = PreloadCache()
    report = preload(store, "ada", cache=cache, domains=2)
    assert report.domains == ["food", "programming"]
    hit = cache.lookup(store, "ada", "Any ideas for a quick dinner recipe?")
    assert hit is not None and hit.domain == "food" and sorted(hit.contents) == sorted(food)
    assert cache.lookup(store, "bob", "Any ideas for a quick dinner recipe?") is None

    def median_ms(work) -> float:
        times = []
        for _ in range(15):
            started = time.perf_counter()
            work()
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000

    query = "What should I cook for dinner?"
    cold = median_ms(lambda: store.search_text("ada", query, k=5, touch=False))
    warm = median_ms(lambda: cache.lookup(store, "ada", query))
    assert warm < cold
    assert all(report.warm_ms[d] < report.cold_ms[d] for d in report.domains)


def test_preloading_from_the_users_view_builds_what_duckdb_builds(store):
    """The learner preloads from the user's RAM view when there is one (no 10,000-row read);
    the contexts are the same as from DuckDB, history and expired memories left out alike."""
    for i, content in enumerate(["The user is vegetarian.", "The user loves spicy Thai food.",
                                 "The user writes Python at work.", "The user prefers Postgres.",
                                 "The user bakes bread on Sundays.", "The user codes in Rust."]):
        entry, _ = store.add("ada", content)
        store.record_access("ada", [entry.id] * i)
    old, _ = store.add("ada", "The user likes cooking pasta.")
    store.update_entry("ada", old.id, valid_to=store.clock.now())  # history: never preloaded
    store.record_domains("ada", ["food"] * 30 + ["programming"] * 10, "retrieval")
    store.flush()
    store._views.settle_s = 0.0
    store.user_signature("ada")
    store.flush()
    assert store._views.get("ada") is not None
    from_view = PreloadCache()
    reads = []
    entries_where = store.entries_where
    store.entries_where = lambda *a: reads.append(a) or entries_where(*a)
    preload(store, "ada", cache=from_view, domains=2, measure=False)
    assert reads == []  # every row came from the view
    store._views.invalidate("ada")
    store._views.claim = lambda user_id: False  # no view: DuckDB answers
    from_db = PreloadCache()
    preload(store, "ada", cache=from_db, domains=2, measure=False)
    assert [(c.domain, c.memory_ids) for c in from_view.contexts("ada")] == \
        [(c.domain, c.memory_ids) for c in from_db.contexts("ada")]
    assert len(from_db.contexts("ada")) == 2 and old.id not in {i for c in from_db.contexts("ada") for i in c.memory_ids}


def test_a_preloaded_context_goes_stale_when_the_users_memories_change(store):
    store.add("ada", "The user is vegetarian.")
    cache = PreloadCache()
    preload(store, "ada", cache=cache)
    assert cache.lookup(store, "ada", "what should I cook") is not None
    store.add("ada", "The user is allergic to peanuts.")
    assert cache.lookup(store, "ada", "what should I cook") is None


def test_optimization_rebuilds_indexes_and_checkpoints_the_file(store):
    ids = [store.add("ada", f"The user visited city number {i} in the north.")[0].id for i in range(40)]
    store.delete_entries("ada", ids[:10])  # fewer than the store's own rebuild threshold
    store.add("ada", "The user collects antique typewriters.")  # not yet in the BM25 snapshot
    with capture_logs() as logs:
        report = optimize(store, probe_user="ada")
    assert report.index_tombstones == 10
    assert report.wal_bytes_before > 0 and report.wal_bytes_after == 0 and report.file_bytes_after > 0
    assert [i for i, _ in store.text_matches("ada", "typewriters", 5)]  # text index rebuilt
    assert store.search_text("ada", "antique typewriters", k=1)[0].content == "The user collects antique typewriters."
    assert any(e["event"] == "dream_optimization" for e in logs)


def test_dream_runs_the_four_agents_and_consolidate_fits_the_trigger_hook(store):
    store.add("ada", "The user is vegetarian.")
    report = dream(store, "ada", cache=PreloadCache())
    assert report.consolidation.memories_after == 1 and report.preloading.domains == ["food"]
    assert isinstance(consolidate(store, "ada", clock=store.clock), ConsolidationReport)


def test_cli_dream_runs_on_the_database_file(tmp_path):
    import json

    from typer.testing import CliRunner

    from proxy.cli import app

    db = tmp_path / "cli.duckdb"
    with MemoryStore.open(db, embedder=HashEmbedder()) as s:
        a, b = _pair(4, 0.93)
        s.add("default", "The user likes green tea.", embedding=a)
        s.add("default", "The user really likes green tea.", embedding=b)
    result = CliRunner().invoke(app, ["dream", "--db", str(db)], env={"MEMLANE_EMBEDDER": "hash"})
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["consolidation"]["merged"] == 1 and report["optimization"]["file_bytes_after"] > 0
    with MemoryStore.open(db, embedder=HashEmbedder()) as s:
        assert len(s.list("default")) == 1
