"""The steps of one learner job: extract facts from the user's turn, then apply them.

Processing is at-least-once (a job whose worker dies is leased again once its lease runs out)
and each job's effect is exactly-once: `apply_facts` writes the job's memories and marks the job
done in one store transaction, so a crash before the commit leaves neither, and a second
worker finishing the same job finds it no longer leased to itself and rolls its writes back.
Extraction failures are never dropped: `run_job` records them on the job (`fail_job`), which
retries it with exponential backoff and dead-letters it after its last attempt.

`run_jobs` runs a leased batch: most interactions teach nothing (questions, requests), and
their jobs are marked done together in one transaction instead of one each; a job with facts
still writes them and is marked done in its own transaction.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from learner.extractor import ExtractedFact, ExtractionError, Extractor
from memory import Embedder, Job, MemorySource, MemoryStore, NewJob, RetryPolicy

__all__ = ["JobOutcome", "LeaseLost", "apply_facts", "job_for", "run_job", "run_jobs"]

log = structlog.get_logger("memlane.learner")


class LeaseLost(Exception):
    """The job is no longer leased to this worker (its lease ran out and another took it)."""


@dataclass(frozen=True, slots=True)
class JobOutcome:
    job_id: str
    state: str  # done | pending (will retry) | dead | lost
    created: int = 0  # new memories


def job_for(request_id: str, user_id: str, status_code: int, user_text: str | None,
            conversation_id: str | None) -> NewJob | None:
    """The extraction job of one interaction: only answered requests with a user turn."""
    if status_code >= 400 or not user_text or not user_text.strip():
        return None
    return NewJob(request_id, user_id, user_text, conversation_id)


def apply_facts(store: MemoryStore, embedder: Embedder, job: Job, owner: str,
                facts: Sequence[ExtractedFact], extractor: str) -> dict:
    """Write the job's facts as memories and mark it done, atomically; returns the job's result.
    Raises `LeaseLost` (nothing written) if `owner` no longer holds the job."""
    vectors = embedder.embed([f.statement for f in facts]) if facts else []
    memories = []
    # Only a job that writes memories changes what the user's searches see (and drops the
    # store's RAM copy of their vectors); most interactions teach nothing.
    with store.transaction(users=[job.user_id] if facts else []):
        for fact, vector in zip(facts, vectors, strict=True):
            source = MemorySource("interaction", job.id, extractor, job.conversation_id)
            entry, created = store.add(
                job.user_id, fact.statement, source=source, embedding=vector, kind=fact.kind,
                memory_type=fact.memory_type, truth_category=fact.truth_category,
                domains=fact.domains, entities=fact.entities,
            )
            memories.append({"id": entry.id, "action": "created" if created else "corroborated"})
        result = {"extractor": extractor, "facts": len(facts), "memories": memories}
        if not store.complete_job(job.id, owner, result):
            raise LeaseLost(job.id)  # rolls the memories back with the transaction
    return result


def run_job(store: MemoryStore, embedder: Embedder, extractor: Extractor, job: Job, owner: str,
            policy: RetryPolicy) -> JobOutcome:
    """Extract and apply one leased job; a failure goes on the job for retry or dead letter."""
    started = time.perf_counter()
    try:
        facts = extractor.extract(job.input or "")
    except Exception as exc:
        return _failed(store, job, owner, policy, exc)
    return _apply(store, embedder, job, owner, policy, facts, extractor.name, started)


def _apply(store: MemoryStore, embedder: Embedder, job: Job, owner: str, policy: RetryPolicy,
           facts: Sequence[ExtractedFact], extractor: str, started: float) -> JobOutcome:
    try:
        result = apply_facts(store, embedder, job, owner, facts, extractor)
    except LeaseLost:
        log.warning("job_lease_lost", job_id=job.id)
        return JobOutcome(job.id, "lost")
    except Exception as exc:
        return _failed(store, job, owner, policy, exc)
    created = sum(m["action"] == "created" for m in result["memories"])
    log.info("job_done", job_id=job.id, attempt=job.attempts, facts=result["facts"], created=created,
             extractor=extractor, ms=round((time.perf_counter() - started) * 1000, 1))
    return JobOutcome(job.id, "done", created)


def _failed(store: MemoryStore, job: Job, owner: str, policy: RetryPolicy, exc: Exception) -> JobOutcome:
    """Per job: recorded on the job, retried or dead-lettered, never dropped."""
    error = f"{type(exc).__name__}: {exc}" if isinstance(exc, ExtractionError) else repr(exc)
    state = store.fail_job(job.id, owner, error, policy)
    log.error("job_failed", job_id=job.id, attempt=job.attempts, state=state, error=error[:300])
    return JobOutcome(job.id, state or "lost")


def run_jobs(store: MemoryStore, embedder: Embedder, extractor: Extractor, jobs: Sequence[Job], owner: str,
             policy: RetryPolicy) -> list[tuple[Job, JobOutcome]]:
    """`run_job` for each of a leased batch, the jobs that found no fact marked done at once."""
    outcomes: dict[str, JobOutcome] = {}
    empty: list[Job] = []
    for job in jobs:
        started = time.perf_counter()
        try:
            facts = extractor.extract(job.input or "")
        except Exception as exc:
            outcomes[job.id] = _failed(store, job, owner, policy, exc)
            continue
        if facts:
            outcomes[job.id] = _apply(store, embedder, job, owner, policy, facts, extractor.name, started)
        else:
            empty.append(job)
    if empty:
        started = time.perf_counter()
        try:
            completed = store.complete_jobs([j.id for j in empty], owner,
                                            {"extractor": extractor.name, "facts": 0, "memories": []})
        except Exception:  # one at a time then, each failure recorded on its own job
            for job in empty:
                outcomes[job.id] = _apply(store, embedder, job, owner, policy, [], extractor.name, started)
        else:
            for job in empty:
                outcomes[job.id] = JobOutcome(job.id, "done" if job.id in completed else "lost")
            log.info("jobs_done", jobs=len(completed), facts=0, extractor=extractor.name,
                     ms=round((time.perf_counter() - started) * 1000, 1))
    return [(job, outcomes[job.id]) for job in jobs]
