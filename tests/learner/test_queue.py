"""The durable queue: jobs born with their interactions, leases, backoff, dead letters, and
exactly-once effects, including across a SIGKILLed `memlane learner` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from learner import ExtractionError, RulesExtractor, apply_facts, run_job, run_jobs
from memory import HashEmbedder, InteractionRecord, MemoryStore, NewJob, RetryPolicy

REPO = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self) -> None:
        self.t = datetime(2026, 3, 1, 12, 0)

    def now(self) -> datetime:
        return self.t

    def advance(self, **kw: float) -> None:
        self.t += timedelta(**kw)


def record(request_id: str, user: str = "ada") -> InteractionRecord:
    return InteractionRecord(request_id, user, datetime(2026, 3, 1), "gpt-4o-mini", "openai", False, 200, None,
                             {"messages": []}, None, None, None, 1.0, None)


def enqueue(store: MemoryStore, texts: list[str], user: str = "ada", prefix: str = "req") -> list[str]:
    ids = [f"{prefix}_{i:04d}" for i in range(len(texts))]
    store.log_interactions_and_jobs([record(i, user) for i in ids],
                                    [NewJob(i, user, t) for i, t in zip(ids, texts, strict=True)])
    return ids


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path, clock) -> MemoryStore:
    s = MemoryStore.open(tmp_path / "q.duckdb", embedder=HashEmbedder(), clock=clock)
    yield s
    s.close()


def test_an_interaction_and_its_job_commit_together_or_not_at_all(store):
    enqueue(store, ["I keep bees."] * 6)  # an Arrow batch
    enqueue(store, ["I keep bees."], prefix="small")  # a parameter batch
    assert store.job_counts()["pending"] == 7 and len(store.interactions(limit=100)) == 7
    with pytest.raises(Exception, match="(?i)constraint|duplicate"):
        store.log_interactions_and_jobs([record("new_1"), record("new_2")],
                                        [NewJob("new_1", "ada", "x"), NewJob("req_0000", "ada", "dup")])
    assert {r["request_id"] for r in store.interactions(limit=100)} & {"new_1", "new_2"} == set()


def test_a_failing_job_backs_off_exponentially_then_is_dead_lettered_and_can_be_retried(store, clock):
    (job_id,) = enqueue(store, ["I keep bees."])

    class Broken:
        name = "broken"

        def extract(self, text):
            raise ExtractionError("no JSON object in the answer")

    policy = RetryPolicy(max_attempts=3, backoff=timedelta(seconds=10))
    waits = []
    for _ in range(3):
        (job,) = store.lease_jobs("w", limit=5, lease_for=timedelta(minutes=1))
        outcome = run_job(store, HashEmbedder(), Broken(), job, "w", policy)
        after = store.get_job(job_id)
        waits.append((after.next_attempt_at - clock.now()).total_seconds())
        assert store.lease_jobs("w", limit=5, lease_for=timedelta(minutes=1)) == []  # not due yet
        clock.advance(seconds=100)
    assert outcome.state == "dead" and waits[:2] == [10.0, 20.0]
    (dead,) = store.jobs(state="dead")
    assert dead.id == job_id and dead.attempts == 3 and "no JSON object" in dead.last_error
    assert store.list("ada") == []

    assert store.retry_job(job_id).state == "pending"
    (job,) = store.lease_jobs("w", limit=5, lease_for=timedelta(minutes=1))
    assert run_job(store, HashEmbedder(), RulesExtractor(), job, "w", policy).state == "done"
    assert [m.content for m in store.list("ada")] == ["The user keeps bees."]
    assert store.job_counts() == {"pending": 0, "leased": 0, "done": 1, "dead": 0}


def test_an_expired_lease_is_taken_over_and_the_late_worker_writes_nothing(store, clock):
    enqueue(store, ["I keep bees."])
    (slow,) = store.lease_jobs("slow", limit=1, lease_for=timedelta(seconds=30))
    clock.advance(seconds=31)
    (fast,) = store.lease_jobs("fast", limit=1, lease_for=timedelta(seconds=30))
    assert fast.id == slow.id and fast.attempts == 2
    facts = RulesExtractor().extract(slow.input)
    apply_facts(store, HashEmbedder(), fast, "fast", facts, "rules")
    with pytest.raises(Exception, match="req_0000"):
        apply_facts(store, HashEmbedder(), slow, "slow", facts, "rules")
    (memory,) = store.list("ada")
    assert memory.confidence.corroboration_count == 0 and len(memory.sources) == 1


def test_a_crash_before_the_done_mark_leaves_no_memory_and_the_rerun_stores_it_once(store):
    enqueue(store, ["I keep bees. I speak Basque."])
    (job,) = store.lease_jobs("w", limit=1, lease_for=timedelta(minutes=1))
    facts = RulesExtractor().extract(job.input)

    def crash(*a, **kw):
        raise RuntimeError("killed between the memories and the done mark")

    original = store.complete_job
    store.complete_job = crash  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        apply_facts(store, HashEmbedder(), job, "w", facts, "rules")
    store.complete_job = original  # type: ignore[method-assign]
    assert store.list("ada") == [] and store.search_text("ada", "bees") == []
    apply_facts(store, HashEmbedder(), job, "w", facts, "rules")
    assert sorted(m.content for m in store.list("ada")) == ["The user keeps bees.", "The user speaks Basque."]


def _facts(n: int) -> list[str]:
    syllables = ["zor", "bla", "quen", "tiv", "mar", "oss", "pel", "dru", "vak", "ine", "sut", "gro"]
    words = [f"{a}{b}{c}" for a in syllables for b in syllables for c in syllables]
    return [f"I collect {words[7 * i]} {words[7 * i + 3]} stamps." for i in range(n)]


def _learner(db: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMLANE_")}
    env.update({"MEMLANE_EMBEDDER": "hash", "MEMLANE_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1"})
    return subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "learner", "--db", str(db), "--until-idle", "--batch", "4"],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _kill_after(process: subprocess.Popen, jobs_done: int, timeout: float = 120) -> int:
    """SIGKILL the learner once it has logged `jobs_done` more finished jobs; returns how many it logged."""
    seen = 0
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    try:
        for line in process.stderr:  # type: ignore[union-attr]
            if '"job_done"' in line:
                seen += 1
                if seen >= jobs_done:
                    process.send_signal(signal.SIGKILL)
                    break
    finally:
        timer.cancel()
    process.wait(30)
    return seen


@pytest.mark.slow
def test_a_sigkilled_learner_loses_and_duplicates_nothing_after_restart(tmp_path):
    db = tmp_path / "kill.duckdb"
    texts = _facts(240)
    with MemoryStore.open(db, embedder=HashEmbedder()) as store:
        ids = enqueue(store, texts)
    killed = [_kill_after(_learner(db), 42), _kill_after(_learner(db), 61)]
    assert killed == [42, 61]
    last = _learner(db)
    _, err = last.communicate(timeout=300)
    assert last.returncode == 0, err[-2000:]

    with MemoryStore.open(db, embedder=HashEmbedder()) as store:
        assert store.job_counts() == {"pending": 0, "leased": 0, "done": len(ids), "dead": 0}
        assert any(store.get_job(i).attempts > 1 for i in ids)  # some were leased when killed
        memories = store.list("ada", limit=1000)
        contents = [m.content for m in memories]
        expected = [t.replace("I collect", "The user collects") for t in texts]
        assert sorted(contents) == sorted(expected)  # none lost, none twice
        assert all(m.confidence.corroboration_count == 0 for m in memories)
        refs = [s.ref for m in memories for s in m.sources]
        assert sorted(refs) == sorted(ids)  # each job's effect recorded exactly once


def test_a_job_that_teaches_nothing_keeps_the_users_searches_warm(store):
    import numpy as np

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((20, 384)).astype(np.float32)
    store.bulk_add("ada", [f"fact {i}" for i in range(20)], vectors / np.linalg.norm(vectors, axis=1, keepdims=True),
                   source="test")
    store.vector_neighbours("ada", vectors[0] / np.linalg.norm(vectors[0]), 3)
    assert "ada" in store._vector_cache  # the RAM copy a search made

    enqueue(store, ["What time is it?"])
    (job,) = store.lease_jobs("w", limit=1, lease_for=timedelta(minutes=1))
    assert run_job(store, HashEmbedder(), RulesExtractor(), job, "w", RetryPolicy()).state == "done"
    assert "ada" in store._vector_cache  # a question wrote no memory: nothing to reload

    enqueue(store, ["I keep bees."], prefix="fact")
    (job,) = store.lease_jobs("w", limit=1, lease_for=timedelta(minutes=1))
    assert run_job(store, HashEmbedder(), RulesExtractor(), job, "w", RetryPolicy()).state == "done"
    assert "ada" not in store._vector_cache  # a new memory: the next search reloads


def test_a_batch_marks_its_fact_free_jobs_done_in_one_transaction(store):
    enqueue(store, ["How do tides work?", "I keep bees.", "What is TCP?", "My cat is called Mochi.",
                    "Tell me a joke."])
    jobs = store.lease_jobs("w", limit=10, lease_for=timedelta(minutes=1))
    # another worker took one of the question jobs meanwhile: it is not ours to finish
    store._writable_cursor().execute("UPDATE learner_jobs SET lease_owner = 'other' WHERE id = 'req_0004'")
    batches = []
    complete = store.complete_jobs
    store.complete_jobs = lambda ids, owner, result: batches.append(list(ids)) or complete(ids, owner, result)
    outcomes = {job.id: o.state for job, o in run_jobs(store, HashEmbedder(), RulesExtractor(), jobs, "w",
                                                         RetryPolicy())}
    assert batches == [["req_0000", "req_0002", "req_0004"]]
    assert outcomes == {"req_0000": "done", "req_0001": "done", "req_0002": "done", "req_0003": "done",
                        "req_0004": "lost"}
    assert store.job_counts()["done"] == 4
    assert sorted(m.content for m in store.list("ada")) == ["The user keeps bees.", "The user's cat is called Mochi."]
    (pending,) = store._cursor().execute("SELECT pending FROM learner_users WHERE user_id = 'ada'").fetchone()
    assert pending == 4  # every finished job counts toward the every-10-interactions trigger


def test_the_runner_leases_again_only_when_woken_after_a_round_that_took_every_due_job(store):
    """Each lease scans the queue table, which holds every job ever run: a round that leased less
    than a full batch already took all that was due, so the runner waits for new jobs."""
    from learner.runner import JobRunner

    leases: list[int] = []
    lease_jobs = store.lease_jobs

    def counted(*args, **kwargs):
        jobs = lease_jobs(*args, **kwargs)
        leases.append(len(jobs))
        return jobs

    store.lease_jobs = counted
    runner = JobRunner(store, HashEmbedder(), RulesExtractor(), triggers=None, batch=4, poll_s=60)
    enqueue(store, ["What time is it?"] * 6)  # more than one batch: leased 4, then 2
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while len(store.jobs(state="done")) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        assert leases == [4, 2]  # not a third, empty, lease right after
        enqueue(store, ["Is it raining?"], prefix="later")
        runner.wake()
        while len(store.jobs(state="done")) < 7 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert leases == [4, 2, 1]
    finally:
        runner.stop()
    assert len(store.jobs(state="done")) == 7


def test_maintenance_deletes_done_jobs_after_an_hour_and_keeps_dead_letters_and_waiting_jobs(store, clock):
    done, dead, waiting = enqueue(store, ["I keep bees.", "I live in Oslo.", "I play chess."])
    leased = {j.id: j for j in store.lease_jobs("w", limit=2, lease_for=timedelta(minutes=10))}
    assert run_job(store, HashEmbedder(), RulesExtractor(), leased[done], "w", RetryPolicy()).state == "done"
    assert store.fail_job(dead, "w", "boom", RetryPolicy(max_attempts=1)) == "dead"

    clock.advance(minutes=59)
    assert store.maintain().jobs_pruned == 0  # kept for an hour, for inspection
    assert store.get_job(done).state == "done"

    clock.advance(minutes=2)
    assert store.maintain().jobs_pruned == 1
    assert store.get_job(done) is None
    assert store.get_job(dead).state == "dead" and store.get_job(waiting).state == "pending"
    assert [m.content for m in store.list("ada")] == ["The user keeps bees."]  # what it did stays
    assert store.interactions(limit=10) and len(store.interactions(limit=10)) == 3
