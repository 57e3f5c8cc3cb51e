"""The background learner: one thread that owns the writes of interactions and new memories.

The proxy hands each finished exchange to ``LearnerWorker.submit``, which never blocks: the queue
is bounded, and a full queue drops the row and counts it (the request path is never slowed by
the database). The thread writes teacher-log rows in batches, each batch in one transaction with
the extraction jobs of its interactions (`memory.jobs`), so a logged interaction always has its
job. A `JobRunner` on a second thread leases the jobs, extracts the user's statements about
themselves and stores them as memories (or, with ``run_jobs=False``, leaves them to an external
``memlane learner`` and only runs the triggers). ``stop`` drains the queue and runs every job
already due, so a graceful shutdown (SIGTERM) loses nothing that was accepted; jobs of a crash
are still in the database and run on the next start.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any, Protocol

import duckdb
import structlog

from learner.extract import Fact, extract_facts
from learner.extractor import Extractor, RulesExtractor
from learner.journal import InteractionJournal
from learner.queue import job_for
from learner.runner import JobRunner
from learner.teacher import assemble
from learner.triggers import Consolidator, TriggerPolicy
from memory import Embedder, InteractionRecord, MemoryStore, NewJob, RetryPolicy

log = structlog.get_logger("memlane.learner")

_STOP = object()
_BATCH = 64
# Wait this long for more rows: one 64-row write costs about what 6 single rows do. The journal
# (on beside a file database that is not encrypted) has the rows already, so waiting delays
# only when the learner sees them. At 0.25 s instead of 0.05, a lone client's batches hold
# ~4x the rows, and memlane's CPU per request at c = 1 fell from 2.85-3.18 to 2.08-2.40 ms.
_LINGER_S = 0.25
# While it lingers the writer looks at the queue this often instead of waking for each row: a
# wake-up per row took the interpreter lock from the event loop in the middle of the request
# that queued it, ~400 times a second at one client in a closed loop.
_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class Exchange:
    """One chat interaction as the proxy saw it."""

    request_id: str
    user_id: str
    created_at: datetime
    model: str
    provider: str
    stream: bool
    status_code: int
    error: str | None
    request_received: dict
    request_sent: dict | None
    response_raw: bytes
    latency_ms: float
    ttft_ms: float | None
    user_text: str | None  # the latest user turn, the only text facts are taken from
    conversation_id: str | None = None  # same for every turn of one conversation


class LearnerObserver(Protocol):
    def queue_depth(self, depth: int) -> None: ...
    def dropped(self) -> None: ...
    def written(self, rows: int) -> None: ...
    def extracted(self, memories: int) -> None: ...


class _NullObserver:
    def queue_depth(self, depth: int) -> None: ...
    def dropped(self) -> None: ...
    def written(self, rows: int) -> None: ...
    def extracted(self, memories: int) -> None: ...


@dataclass
class LearnerWorker:
    store: MemoryStore
    embedder: Embedder
    maxsize: int = 10_000
    observer: LearnerObserver = field(default_factory=_NullObserver)
    extractor: Extractor | Callable[[str], list[Fact]] = extract_facts  # a plain function: rules
    maintenance_interval_s: float | None = None  # promote, expire and decay this often
    # Streams each successful interaction through the NML/EM model's per-user state.
    nml_feed: Callable[[str, str], object] | None = None
    run_jobs: bool = True  # False: an external `memlane learner` leases the jobs over HTTP
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    triggers: TriggerPolicy | None = field(default_factory=TriggerPolicy)
    consolidate: Consolidator | None = None
    lease_for: timedelta = timedelta(minutes=2)
    # Acknowledged exchanges on disk until they are logged: survives a killed process.
    journal: InteractionJournal | None = None
    preload: Any = None  # learner.dream.Preloader: learning runs fill the cache requests read

    def __post_init__(self) -> None:
        self._queue: queue.Queue[object] = queue.Queue(self.maxsize)
        self._submit_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._next_maintenance = time.monotonic() + (self.maintenance_interval_s or 0)
        extractor = self.extractor if hasattr(self.extractor, "extract") else RulesExtractor(self.extractor)
        # The rules extractor takes microseconds: it runs here, as the jobs are written, and a turn
        # with no fact (most of them) is written done, without a lease and a completion.
        self._settles = extractor if self.run_jobs and isinstance(extractor, RulesExtractor) else None
        self.runner = JobRunner(
            self.store, self.embedder, extractor if self.run_jobs else None,  # type: ignore[arg-type]
            retry=self.retry, triggers=self.triggers, consolidate=self.consolidate,
            lease_for=self.lease_for, extracted=self.observer.extracted,
            finished=getattr(self.observer, "job_finished", None), preload=self.preload,
        )

    def start(self) -> None:
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="memlane-learner", daemon=True)
            self._thread.start()
            self.runner.start()

    def submit(self, exchange: Exchange) -> bool:
        with self._submit_lock:  # the journal keeps the queue's order
            try:
                self._queue.put_nowait(exchange)
            except queue.Full:
                self.observer.dropped()
                log.warning("teacher_log_dropped", request_id=exchange.request_id, queue_size=self.maxsize)
                return False
            if self.journal is not None:
                try:
                    self.journal.append(exchange_line(exchange))
                except OSError as exc:  # the row is still queued; only a crash could lose it now
                    log.error("journal_write_failed", request_id=exchange.request_id, error=repr(exc))
                    self.journal = None  # its order is broken: off until restart (which replays it)
        self.observer.queue_depth(self._queue.qsize())
        return True

    def _until_maintenance(self) -> float | None:
        if self.maintenance_interval_s is None:
            return None
        return max(self._next_maintenance - time.monotonic(), 0.0)

    def stop(self, timeout: float = 30.0) -> None:
        """Write everything accepted so far and run the jobs due, then end both threads."""
        if self._thread is None:
            return
        self._stopping.set()  # ends a linger at once
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("learner_stop_timeout", pending=self._queue.qsize())
        self._thread = None
        self.runner.stop(timeout)
        if self.journal is not None:
            self.journal.close()

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is written and its jobs run (tests, CLI)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                self.runner.wake()
                if self.runner.idle():
                    return True
            time.sleep(0.01)
        return False

    def _run(self) -> None:
        if self.journal is not None:
            self._replay_journal()
        while True:
            self._maintain_if_due()
            batch, stopping = self._next_batch()
            if batch:
                self._process(batch)
            for _ in range(len(batch) + stopping):
                self._queue.task_done()
            self.observer.queue_depth(self._queue.qsize())
            if stopping:
                return

    def _replay_journal(self) -> None:
        """Write the exchanges a killed previous run had acknowledged but not logged."""
        assert self.journal is not None
        replayed = present = 0
        for data in self.journal.leftovers():
            exchange = exchange_from(data)
            job = job_of(exchange)
            try:
                self.store.log_interactions_and_jobs([to_record(exchange)], [job] if job else [])
                replayed += 1
            except duckdb.ConstraintException:  # it was written before the process died
                present += 1
            except Exception as exc:
                log.error("journal_replay_failed", request_id=exchange.request_id, error=repr(exc))
        self.journal.forget_leftovers()
        if replayed or present:
            log.info("journal_replayed", rows=replayed, already_logged=present)
            self.runner.wake()

    def _maintain_if_due(self) -> None:
        if self.maintenance_interval_s is None or time.monotonic() < self._next_maintenance:
            return
        self._next_maintenance = time.monotonic() + self.maintenance_interval_s
        try:
            self.store.maintain()
        except Exception as exc:  # one failed pass must not stop the learner; the next one retries
            log.error("job_failed", step="maintenance", error=repr(exc))
            self.store.recover_soon(exc)

    def _next_batch(self) -> tuple[list[Exchange], bool]:
        try:
            first = self._queue.get(timeout=self._until_maintenance())
        except queue.Empty:
            return [], False
        if first is _STOP:
            return [], True
        deadline = time.monotonic() + _LINGER_S
        while self._queue.qsize() < _BATCH - 1 and (left := deadline - time.monotonic()) > 0:
            if self._stopping.wait(min(left, _POLL_S)):
                break
        batch = [first]
        while len(batch) < _BATCH:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True  # type: ignore[return-value]
            batch.append(item)
        return batch, False  # type: ignore[return-value]

    def _process(self, batch: Sequence[Exchange]) -> None:
        jobs, done = self._settle([j for e in batch if (j := job_of(e)) is not None])
        records = [to_record(e) for e in batch]
        try:
            self._write(records, jobs, done)
            self.observer.written(len(batch))
        except Exception as exc:  # per batch: logged with the exception; the rows are lost
            log.error("teacher_log_write_failed", rows=len(batch), jobs=len(jobs) + len(done), error=repr(exc))
            done = []
        with self._submit_lock:  # so every exchange taken from the queue is in the journal
            if self.journal is not None:
                self.journal.committed(len(batch))
        if jobs:
            self.runner.wake()
        if done:
            self.runner.settled(len(done))
        if self.nml_feed is None:
            return
        for exchange in batch:
            if exchange.status_code >= 400 or not exchange.user_text:
                continue
            try:
                self._feed_nml(exchange)
            except Exception as exc:
                log.error("job_failed", step="nml_feed", request_id=exchange.request_id, error=repr(exc))

    def _settle(self, jobs: list[NewJob]) -> tuple[list[NewJob], list[tuple[NewJob, dict]]]:
        """(jobs to queue, jobs done here with their result): with the rules extractor, a turn
        with no fact is done now; one with facts, or whose extraction failed, goes to the queue
        (storing facts embeds them, and a failure gets the queue's retries)."""
        if self._settles is None:
            return jobs, []
        queued, done = [], []
        for job in jobs:
            try:
                facts = self._settles.extract(job.input or "")
            except Exception:  # the queue runs it again and records the error
                facts = None
            if facts == []:
                done.append((job, {"extractor": self._settles.name, "facts": 0, "memories": []}))
            else:
                queued.append(job)
        return queued, done

    def _write(self, records: list[InteractionRecord], jobs: list[NewJob], done: list[tuple[NewJob, dict]]) -> None:
        """Write a batch; if DuckDB invalidated the database, reopen it and write the batch again."""
        try:
            self.store.log_interactions_and_jobs(records, jobs, done)
        except duckdb.FatalException:
            if not self.store.recover():
                raise
            try:
                self.store.log_interactions_and_jobs(records, jobs, done)
            except duckdb.ConstraintException:  # committed before the error struck (the WAL kept it)
                pass

    def _feed_nml(self, exchange: Exchange) -> None:
        answer, _ = assemble(exchange.response_raw, stream=exchange.stream) if exchange.response_raw else (None, None)
        text = _answer_text(answer)
        self.nml_feed(exchange.user_id, f"user: {exchange.user_text}\nassistant: {text}\n")  # type: ignore[misc]


def _answer_text(answer: dict | None) -> str:
    """The assistant's text from an assembled answer message (`learner.teacher.assemble`)."""
    content = (answer or {}).get("content")
    return content if isinstance(content, str) else ""


def exchange_line(exchange: Exchange) -> bytes:
    """One exchange as one JSON line for the journal (the raw response as latin-1: lossless)."""
    data = {f.name: getattr(exchange, f.name) for f in fields(Exchange)}
    data["created_at"] = exchange.created_at.isoformat()
    data["response_raw"] = exchange.response_raw.decode("latin-1")
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def exchange_from(data: dict) -> Exchange:
    data = dict(data)
    data["created_at"] = datetime.fromisoformat(data["created_at"])
    data["response_raw"] = data["response_raw"].encode("latin-1")
    known = {f.name for f in fields(Exchange)}
    return Exchange(**{k: v for k, v in data.items() if k in known})


def job_of(exchange: Exchange) -> NewJob | None:
    return job_for(exchange.request_id, exchange.user_id, exchange.status_code, exchange.user_text,
                   exchange.conversation_id)


def to_record(exchange: Exchange) -> InteractionRecord:
    answer, usage = assemble(exchange.response_raw, stream=exchange.stream) if exchange.response_raw else (None, None)
    return InteractionRecord(
        request_id=exchange.request_id,
        user_id=exchange.user_id,
        created_at=exchange.created_at,
        model=exchange.model,
        provider=exchange.provider,
        stream=exchange.stream,
        status_code=exchange.status_code,
        error=exchange.error,
        request_received=exchange.request_received,
        request_sent=exchange.request_sent,
        response=answer,
        usage=usage,
        latency_ms=exchange.latency_ms,
        ttft_ms=exchange.ttft_ms,
        conversation_id=exchange.conversation_id,
    )
