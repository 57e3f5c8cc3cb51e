"""Personal-adapter updates inside the server: the learner's training requests, served as they come.

The learner queues a `training_requests` row for a user after 10 interactions, after 24 hours,
or on request (`learner.triggers`). `UpdateScheduler` is a worker thread in the server process
that takes them, oldest first, and runs the same update and gate as `memlane adapters update`
(`adapters.plm.update.run_request`) one at a time:

- It uses the server's own store (DuckDB has one writer, and the server holds it; the CLI
  cannot open the file while the server runs) and the server's adapter registry, whose lock
  orders its writes with the memory store's delete and wipe hooks.
- It trains on its own copy of the base model (`load_runtime`, loaded on the first update and
  kept), so serving never waits for a training step, and with `threads` torch threads in its
  own thread (OpenMP's thread count is per thread), so serving keeps the other cores.
- A user is updated at most once per `min_gap_s`: a chatty user's requests wait (the learner
  merges them into one pending row) instead of retraining back to back.
- `stop()` stops a running update at its next training step or gate batch. Nothing is
  registered then: the live adapter stays as it was, and the request goes back to pending for
  the next start. A request a killed process left `running` is put back to pending on start.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

import structlog

from adapters.plm.registry import AdapterRegistry
from adapters.plm.update import UpdateCancelled, UpdateConfig, run_request

if TYPE_CHECKING:
    from adapters.plm.model import PLMRuntime
    from memory import MemoryStore, TrainingRequest

log = structlog.get_logger("memlane.plm.scheduler")


class UpdateObserver(Protocol):
    """Where the scheduler reports (the server's Prometheus metrics)."""

    def started(self) -> None: ...

    def finished(self, outcome: str, seconds: float) -> None: ...  # accepted|rejected|failed|empty|cancelled


class UpdateScheduler:
    def __init__(
        self, store: MemoryStore, registry: AdapterRegistry, load_runtime: Callable[[], PLMRuntime], *,
        config: UpdateConfig | None = None, threads: int = 1, min_gap_s: float = 1800.0, poll_s: float = 5.0,
        observer: UpdateObserver | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.load_runtime = load_runtime
        self.config = config or UpdateConfig()
        self.threads = threads
        self.min_gap_s = min_gap_s
        self.poll_s = poll_s
        self.observer = observer
        self._runtime: PLMRuntime | None = None
        self._last: dict[str, float] = {}  # user -> when their last update ended (time.time())
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        for request in self.store.training_requests(state="running", limit=1000):
            self.store.set_training_state(request.id, "pending")  # its process died mid-update
        self._thread = threading.Thread(target=self._loop, name="memlane-plm-updates", daemon=True)
        self._thread.start()
        log.info("plm_updates_started", min_gap_s=self.min_gap_s, threads=self.threads)

    def cancel(self) -> None:
        """Asks the thread to stop (a running update at its next step) without waiting: safe
        from a signal handler."""
        self._stopping.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stops the thread, a running update at its next step; waits for it (the store must
        stay open until then)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("plm_updates_stop_timeout", timeout_s=timeout)
        log.info("plm_updates_stopped")

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the worker thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        import torch

        torch.set_num_threads(self.threads)  # this thread's only: serving keeps its own
        while not self._stopping.is_set():
            try:
                request = self._next()
                if request is not None:
                    self._serve(request)
                    continue
            except UpdateCancelled:
                return
            except Exception as exc:  # noqa: BLE001 - a store hiccup must not end the updates; retried next poll
                log.error("job_failed", step="plm_schedule", error=repr(exc))
            self._stopping.wait(self.poll_s)

    def _next(self) -> TrainingRequest | None:
        """The oldest pending request whose user is not within the minimum gap."""
        for request in self.store.training_requests(state="pending", limit=1000):
            if self._due(request.user_id):
                return request
        return None

    def _due(self, user_id: str) -> bool:
        if self.min_gap_s <= 0:
            return True
        last = self._last.get(user_id)
        if last is None:  # after a restart: the newest version's time
            created = [v.created_at for v in self.registry.versions(user_id)]
            last = datetime.fromisoformat(max(created)).timestamp() if created else 0.0
            self._last[user_id] = last
        return time.time() - last >= self.min_gap_s

    def _serve(self, request: TrainingRequest) -> None:
        user_hash = hashlib.sha256(request.user_id.encode()).hexdigest()[:12]
        log.info("plm_update_started", request_id=request.id, user_hash=user_hash, reason=request.reason)
        if self.observer is not None:
            self.observer.started()
        started = time.perf_counter()
        try:
            runtime = self._load()
            result = run_request(self.store, request, runtime=runtime, registry=self.registry, config=self.config,
                                 should_stop=self._stopping.is_set)
        except UpdateCancelled:
            self._finished("cancelled", started)
            raise
        except Exception as exc:  # noqa: BLE001 - the base model did not load: the request says why
            log.error("job_failed", step="plm_update", request_id=request.id, error=repr(exc))
            self.store.set_training_state(request.id, "failed", repr(exc)[:500])
            self._finished("failed", started)
        else:
            self._finished(result.outcome, started)
            log.info("plm_update_finished", request_id=request.id, user_hash=user_hash, outcome=result.outcome,
                     version=result.version.version if result.version else None,
                     seconds=round(time.perf_counter() - started, 1))
        finally:
            self._last[request.user_id] = datetime.now(UTC).timestamp()

    def _load(self) -> PLMRuntime:
        if self._runtime is None:
            self._runtime = self.load_runtime()
        return self._runtime

    def _finished(self, outcome: str, started: float) -> None:
        if self.observer is not None:
            self.observer.finished(outcome, time.perf_counter() - started)
