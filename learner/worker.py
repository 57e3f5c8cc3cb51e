"""The background learner: one thread that owns the writes of interactions and new memories.

The proxy hands each finished exchange to ``LearnerWorker.submit``, which never blocks: the queue
is bounded, and a full queue drops the row and counts it (the request path is never slowed by
the database). The thread writes teacher-log rows in batches, then extracts the user's statements
about themselves from the latest user turn and stores them as memories. ``stop`` drains the
queue, so a graceful shutdown (SIGTERM) loses nothing that was accepted.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import structlog

from learner.extract import Fact, extract_facts
from learner.teacher import assemble
from memory import Embedder, InteractionRecord, MemorySource, MemoryStore

log = structlog.get_logger("memlane.learner")

_STOP = object()
_BATCH = 64
_LINGER_S = 0.05  # wait this long for more rows: one 64-row write costs about what 6 single rows do


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
    extractor: Callable[[str], list[Fact]] = extract_facts
    maintenance_interval_s: float | None = None  # promote, expire and decay this often
    # Streams each successful interaction through the NML/EM model's per-user state.
    nml_feed: Callable[[str, str], object] | None = None

    def __post_init__(self) -> None:
        self._queue: queue.Queue[object] = queue.Queue(self.maxsize)
        self._thread: threading.Thread | None = None
        self._next_maintenance = time.monotonic() + (self.maintenance_interval_s or 0)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="memlane-learner", daemon=True)
            self._thread.start()

    def submit(self, exchange: Exchange) -> bool:
        try:
            self._queue.put_nowait(exchange)
        except queue.Full:
            self.observer.dropped()
            log.warning("teacher_log_dropped", request_id=exchange.request_id, queue_size=self.maxsize)
            return False
        self.observer.queue_depth(self._queue.qsize())
        return True

    def _until_maintenance(self) -> float | None:
        if self.maintenance_interval_s is None:
            return None
        return max(self._next_maintenance - time.monotonic(), 0.0)

    def stop(self, timeout: float = 30.0) -> None:
        """Write everything accepted so far, then end the thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("learner_stop_timeout", pending=self._queue.qsize())
        self._thread = None

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is processed (tests, CLI)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    def _run(self) -> None:
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

    def _maintain_if_due(self) -> None:
        if self.maintenance_interval_s is None or time.monotonic() < self._next_maintenance:
            return
        self._next_maintenance = time.monotonic() + self.maintenance_interval_s
        try:
            self.store.maintain()
        except Exception as exc:  # one failed pass must not stop the learner; the next one retries
            log.error("job_failed", step="maintenance", error=repr(exc))

    def _next_batch(self) -> tuple[list[Exchange], bool]:
        try:
            first = self._queue.get(timeout=self._until_maintenance())
        except queue.Empty:
            return [], False
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = time.monotonic() + _LINGER_S
        while len(batch) < _BATCH:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True  # type: ignore[return-value]
            batch.append(item)
        return batch, False  # type: ignore[return-value]

    def _process(self, batch: Sequence[Exchange]) -> None:
        try:
            self.store.log_interactions([to_record(e) for e in batch])
            self.observer.written(len(batch))
        except Exception as exc:  # per batch: log with the exception and go on to extraction
            log.error("teacher_log_write_failed", rows=len(batch), error=repr(exc))
        for exchange in batch:
            if exchange.status_code >= 400 or not exchange.user_text:
                continue
            try:
                self._learn(exchange)
            except Exception as exc:
                log.error("job_failed", step="extract", request_id=exchange.request_id, error=repr(exc))
            if self.nml_feed is not None:
                try:
                    self._feed_nml(exchange)
                except Exception as exc:
                    log.error("job_failed", step="nml_feed", request_id=exchange.request_id, error=repr(exc))

    def _feed_nml(self, exchange: Exchange) -> None:
        answer, _ = assemble(exchange.response_raw, stream=exchange.stream) if exchange.response_raw else (None, None)
        text = _answer_text(answer)
        self.nml_feed(exchange.user_id, f"user: {exchange.user_text}\nassistant: {text}\n")  # type: ignore[misc]

    def _learn(self, exchange: Exchange) -> None:
        facts = self.extractor(exchange.user_text or "")
        if not facts:
            return
        vectors = self.embedder.embed([f.content for f in facts])
        created = 0
        for fact, vector in zip(facts, vectors, strict=True):
            source = MemorySource("interaction", exchange.request_id, "rules", exchange.conversation_id)
            _, is_new = self.store.add(
                exchange.user_id, fact.content, source=source, embedding=vector, kind=fact.kind,
            )
            created += is_new
        if created:
            self.observer.extracted(created)
        log.info("memories_extracted", request_id=exchange.request_id, facts=len(facts), created=created)


def _answer_text(answer: dict | None) -> str:
    """The assistant's text from an assembled answer message (`learner.teacher.assemble`)."""
    content = (answer or {}).get("content")
    return content if isinstance(content, str) else ""


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
