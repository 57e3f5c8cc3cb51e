"""The one loop that schedules the learner's jobs and triggers in the process that writes.

`JobRunner` leases due jobs from the store, runs them (`learner.queue.run_jobs`) and checks the
triggers (`learner.triggers.run_due`) after jobs finish and every `trigger_check_s`. With a
`preload` step (`learner.dream.Preloader`, holding the cache the server's requests read), the
learning runs preload the user's frequent domains, and a job that changed a preloaded user's
memories preloads them again at once, so the cache is not left stale until the next run. In the
server it runs on its own thread beside the `LearnerWorker`'s writer thread, so a slow LLM
extraction never holds up the teacher-log writes. With no extractor (an external
`memlane learner` leases the jobs over HTTP) it only runs the triggers. `memlane learner`
without a server runs the same loop in the foreground (`run_forever`).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import structlog

from learner.extractor import Extractor
from learner.queue import run_jobs
from learner.triggers import Consolidator, TriggerPolicy, run_due
from memory import Embedder, MemoryStore, RetryPolicy

__all__ = ["JobRunner"]

log = structlog.get_logger("memlane.learner")


@dataclass
class JobRunner:
    store: MemoryStore
    embedder: Embedder
    extractor: Extractor | None  # None: jobs are leased by an external learner
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    triggers: TriggerPolicy | None = field(default_factory=TriggerPolicy)  # None: no triggers here
    consolidate: Consolidator | None = None
    preload: Any = None  # learner.dream.Preloader: called by learning runs; .refresh after jobs
    lease_for: timedelta = timedelta(minutes=2)
    batch: int = 16
    poll_s: float = 1.0  # look for due retries this often when idle
    trigger_check_s: float = 60.0
    extracted: Any = None  # called with the number of new memories of each job
    finished: Any = None  # called with each job's outcome: done, pending, dead, lost
    owner: str = field(default_factory=lambda: f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}")

    def __post_init__(self) -> None:
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy = False
        self._next_trigger_check = 0.0
        self._new_jobs = False
        self._next_poll = 0.0

    # -- one round ----------------------------------------------------------------------

    def run_once(self, *, lease: bool = True) -> int:
        """Lease and run one batch of due jobs, then check the triggers; returns jobs run.
        `lease=False`: the triggers only (nothing new is queued and no retry is due yet)."""
        self._busy = True
        try:
            done = 0
            if self.extractor is not None and lease:
                jobs = self.store.lease_jobs(self.owner, limit=self.batch, lease_for=self.lease_for)
                for job, outcome in run_jobs(self.store, self.embedder, self.extractor, jobs, self.owner, self.retry):
                    done += 1
                    if outcome.created and self.extracted is not None:
                        self.extracted(outcome.created)
                    if outcome.created and self.preload is not None:  # nothing new: nothing to preload
                        self._refresh_preload(job.user_id)
                    if self.finished is not None:
                        self.finished(outcome.state)
            if done or time.monotonic() >= self._next_trigger_check:
                self.check_triggers()
            return done
        finally:
            self._busy = False

    def check_triggers(self) -> None:
        self._next_trigger_check = time.monotonic() + self.trigger_check_s
        if self.triggers is not None:
            run_due(self.store, self.triggers, consolidate=self.consolidate, preload=self.preload)

    def _refresh_preload(self, user_id: str) -> None:
        try:
            self.preload.refresh(self.store, user_id)
        except Exception as exc:  # the cache stays stale (and unused) until the next learning run
            log.error("job_failed", step="preload", error=repr(exc))

    # -- the thread ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._serve, name="memlane-learner-jobs", daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        if self.extractor is not None:  # the only consumer of this database: take back the
            try:                        # jobs a killed previous run held without waiting
                released = self.store.release_leases()
                if released:
                    log.info("jobs_released", jobs=released)
            except Exception as exc:
                log.error("job_failed", step="release", error=repr(exc))
        self.run_forever()

    def wake(self) -> None:
        """New jobs were queued: lease on the next round."""
        self._new_jobs = True
        self._wake.set()

    def settled(self, jobs: int) -> None:
        """The writer ran `jobs` itself (born done, `JobQueue.log_interactions_and_jobs`): count
        them like the jobs run here and check the triggers, without a lease."""
        if self.finished is not None:
            for _ in range(jobs):
                self.finished("done")
        self.poke_triggers()

    def _lease_due(self) -> bool:
        """Whether this round leases: new jobs were queued, or a poll is due (retries after
        their backoff, leases a killed learner left); each lease scans the queue table."""
        if self._new_jobs or time.monotonic() >= self._next_poll:
            self._new_jobs = False  # before the lease: a wake-up during it makes the next round lease
            self._next_poll = time.monotonic() + self.poll_s
            return True
        return False

    def poke_triggers(self) -> None:
        """Check the triggers on the next round (an external learner just finished a job)."""
        self._next_trigger_check = 0.0
        self._wake.set()

    def run_forever(self, *, until_idle: bool = False) -> None:
        """Rounds until `stop()` (or, with `until_idle`, until no job is due); on stop it first
        runs every job already due, so a graceful shutdown leaves nothing that could run."""
        while True:
            try:
                ran = self.run_once(lease=self._stopping.is_set() or until_idle or self._lease_due())
            except Exception as exc:  # the store is gone or broken: log, wait, try again
                log.error("job_failed", step="lease", error=repr(exc))
                self.store.recover_soon(exc)  # DuckDB invalidated the database: reopen it
                ran = 0
                if self._stopping.is_set():
                    return
            # A round that leased less than a full batch took every job due then: the next lease
            # waits for a wake-up (new jobs) or the poll, instead of scanning the queue again at
            # once. When stopping or draining, one more round catches jobs that came meanwhile.
            if ran >= self.batch or (ran and (self._stopping.is_set() or until_idle)):
                self._new_jobs = True  # more may be due: lease again at once
                continue
            if self._stopping.is_set() or until_idle:
                return
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("learner_stop_timeout", step="jobs")
        self._thread = None

    def idle(self) -> bool:
        """No round running and no job due now (tests, drain)."""
        if self._busy or self.extractor is None:
            return not self._busy
        due = self.store.next_job_due()
        return due is None or due > self.store.clock.now()
