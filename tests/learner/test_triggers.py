"""Learning runs: every 10 interactions, every 24 h, on request (API and CLI); a day in milliseconds."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from learner import Exchange, LearnerWorker, TriggerPolicy, find_consolidator, run_due
from memory import HashEmbedder, MemoryStore, NewJob, Tier


class FakeClock:
    def __init__(self) -> None:
        self.t = datetime(2026, 3, 1, 12, 0)

    def now(self) -> datetime:
        return self.t

    def advance(self, **kw: float) -> None:
        self.t += timedelta(**kw)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path, clock) -> MemoryStore:
    s = MemoryStore.open(tmp_path / "t.duckdb", embedder=HashEmbedder(), clock=clock)
    yield s
    s.close()


def exchange(i: int, text: str, user: str = "ada") -> Exchange:
    raw = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}]}).encode()
    return Exchange(f"req_{user}_{i:03d}", user, datetime(2026, 3, 1), "gpt-4o-mini", "openai", False, 200, None,
                    {"messages": [{"role": "user", "content": text}]}, None, raw, 1.0, None, text)


def learn_jobs(store: MemoryStore, user: str, n: int, start: int = 0) -> None:
    """n interactions of `user` learned, through the real queue."""
    from learner import RulesExtractor, run_job
    from memory import RetryPolicy

    ids = [f"{user}_{start + i}" for i in range(n)]
    store.log_interactions_and_jobs([], [NewJob(i, user, "What time is it?") for i in ids])
    for job in store.lease_jobs("w", limit=n, lease_for=timedelta(minutes=1)):
        assert run_job(store, HashEmbedder(), RulesExtractor(), job, "w", RetryPolicy()).state == "done"


def test_the_tenth_interaction_queues_a_training_request(store):
    worker = LearnerWorker(store, HashEmbedder(), consolidate=find_consolidator())
    worker.start()
    try:
        for i in range(9):
            worker.submit(exchange(i, f"I keep {['bees', 'goats', 'koi'][i % 3]}."))
        assert worker.drain()
        assert store.training_requests(user_id="ada") == []
        assert store.learner_user("ada")["pending"] == 9
        worker.submit(exchange(9, "What's the weather like?"))
        assert worker.drain()
    finally:
        worker.stop()
    (request,) = store.training_requests(user_id="ada")
    assert (request.reason, request.interactions, request.state) == ("interactions", 10, "pending")
    assert store.learner_user("ada")["pending"] == 0
    # consolidation ran: the three repeated statements are three memories, corroborated, not nine
    assert sorted(m.content for m in store.list("ada")) == [
        "The user keeps bees.", "The user keeps goats.", "The user keeps koi."]


def test_24_hours_after_the_first_unlearned_interaction_a_run_is_due(store, clock):
    policy = TriggerPolicy(every=10, period=timedelta(hours=24))
    learn_jobs(store, "ada", 3)
    learn_jobs(store, "bob", 0)
    clock.advance(hours=23, minutes=59)
    assert run_due(store, policy, consolidate=None) == []
    clock.advance(minutes=2)
    (run,) = run_due(store, policy, consolidate=None)
    assert (run.user_id, run.reason, run.training_request["interactions"]) == ("ada", "schedule", 3)
    clock.advance(hours=12)
    learn_jobs(store, "ada", 1, start=3)
    clock.advance(hours=11)
    assert run_due(store, policy, consolidate=None) == []  # 23 h since the last run
    clock.advance(hours=2)
    assert [r.reason for r in run_due(store, policy, consolidate=None)] == ["schedule"]
    clock.advance(hours=48)
    assert run_due(store, policy, consolidate=None) == []  # nothing learned since: nothing to train on


def test_a_pending_training_request_grows_instead_of_doubling(store, clock):
    policy = TriggerPolicy(every=2)
    learn_jobs(store, "ada", 2)
    run_due(store, policy, consolidate=None)
    learn_jobs(store, "ada", 3, start=2)
    run_due(store, policy, consolidate=None)
    (request,) = store.training_requests(user_id="ada")
    assert request.interactions == 5
    store.set_training_state(request.id, "done")
    clock.advance(minutes=1)
    learn_jobs(store, "ada", 2, start=5)
    run_due(store, policy, consolidate=None)
    assert [r.state for r in store.training_requests(user_id="ada")] == ["done", "pending"]


def _short_term_memory(store: MemoryStore, clock: FakeClock) -> str:
    entry, _ = store.add("ada", "The user keeps bees.", source="extractor:rules")
    assert entry.tier is Tier.SHORT_TERM
    clock.advance(days=3, hours=1)  # the 3-day rule promotes it on the next pass
    return entry.id


async def test_post_learn_runs_promotion_consolidation_and_queues_training(tmp_path, store, clock):
    from proxy import Settings, create_app

    memory_id = _short_term_memory(store, clock)
    settings = Settings.from_env({}, database=tmp_path / "t.duckdb", embedder="hash", preload_local_model=False)
    app = create_app(settings, store=store, embedder=HashEmbedder())
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://m.test") as client:
        response = await client.post("/v1/learn", headers={"x-memlane-user": "ada"})
        other = await client.post("/v1/learn", headers={"x-memlane-user": "bob"})
    assert response.status_code == 200, response.text
    run = response.json()
    assert run["reason"] == "request" and run["user"] == "ada"
    assert store.get("ada", memory_id).tier is Tier.LONG_TERM
    assert run["promotion"]["promoted"] == {"SHORT_TERM->LONG_TERM": 1}
    assert run["consolidation"]["memories_before"] == 1  # the dream step is installed
    assert run["training_request"]["state"] == "pending"
    assert other.json()["user"] == "bob"
    assert {r.user_id for r in store.training_requests()} == {"ada", "bob"}


def test_memlane_learn_on_the_database_file(tmp_path, monkeypatch, clock):
    from proxy.cli import app

    db = tmp_path / "cli.duckdb"
    with MemoryStore.open(db, embedder=HashEmbedder(), clock=clock) as store:
        _short_term_memory(store, clock)
    monkeypatch.setenv("MEMLANE_EMBEDDER", "hash")
    result = CliRunner().invoke(app, ["learn", "--db", str(db), "--user", "ada"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "user ada: promoted 1" in said and "training request train_" in said
    with MemoryStore.open(db, embedder=HashEmbedder()) as store:
        assert [r.reason for r in store.training_requests(user_id="ada")] == ["request"]


def test_a_learning_run_that_learned_nothing_new_reads_none_of_the_users_memories(store, clock, monkeypatch):
    """A long-time user's run after questions only: promotion, consolidation and preloading
    leave their 400 settled memories unread (the run held the GIL ~1.6 s at 10,000), and
    the run after a new fact still merges it and rebuilds the preloaded contexts."""
    import memory.store
    from learner import learn
    from learner.dream import PreloadCache, Preloader
    from memory import MemorySource

    for i in range(400):
        store.add("ada", f"The user cooks recipe number {i} for dinner.", source=MemorySource("api"),
                  validated=True)
    preloader = Preloader(PreloadCache())
    clock.advance(days=4)
    learn(store, "ada", "interactions", consolidate=find_consolidator(), preload=preloader)
    learn(store, "ada", "interactions", consolidate=find_consolidator(), preload=preloader)  # settles recency

    rows_read = []
    real = memory.store.entry_from_row
    monkeypatch.setattr(memory.store, "entry_from_row", lambda row: rows_read.append(row[0]) or real(row))
    clock.advance(minutes=1)
    quiet = learn(store, "ada", "interactions", consolidate=find_consolidator(), preload=preloader)
    assert rows_read == []
    assert quiet.preloading["reused"] and quiet.preloading["memories_cached"] > 0
    assert quiet.consolidation["memories_before"] == quiet.consolidation["memories_after"] == 400

    clock.advance(minutes=1)
    ids, vectors = store.user_vectors("ada")
    a = vectors[0]
    other = np.eye(len(a), dtype=np.float32)[int(np.argmin(np.abs(a)))]
    other -= (other @ a) * a
    near = 0.93 * a + np.sqrt(1 - 0.93**2) * other / np.linalg.norm(other)  # under write-time dedup, over merging
    content = store.get("ada", ids[0]).content.replace("cooks", "really cooks")
    store.add("ada", content, source=MemorySource("api"), validated=True, embedding=near)
    rows_read.clear()
    after = learn(store, "ada", "interactions", consolidate=find_consolidator(), preload=preloader)
    assert after.consolidation["merged"] == 1 and not after.preloading["reused"]
    # The preload read every row once; consolidation only the rows at the ends of close pairs
    # (here the new one, its twin and the other recipes HashEmbedder puts near them).
    assert 400 <= len(rows_read) < 2 * 400
