"""Ending open streams cleanly when the server is asked to stop.

On SIGTERM uvicorn stops accepting connections and waits for open responses; past its own
timeout it cancels them, and a client sees its stream cut off without a word. `Draining` comes
first: `begin()` (called as the signal arrives) gives open streams ``grace_s`` seconds to finish,
then interrupts every stream still open, which ends with an OpenAI-shaped error event
(``server_shutting_down``) and is logged with status 503. `memlane serve` sets uvicorn's
timeout a few seconds past ``grace_s`` so the streams end here, in words, before that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

log = structlog.get_logger("memlane.shutdown")


class Draining:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._streams: set[asyncio.Task] = set()
        self._interrupted: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._begun = False
        self._on_begin: list[Callable[[], None]] = []

    def on_begin(self, callback: Callable[[], None]) -> None:
        """Call `callback` (quick, thread-safe, idempotent) as soon as the stop signal arrives:
        background work such as an adapter update stops then, not after the streams drained."""
        self._on_begin.append(callback)

    def register(self) -> asyncio.Task | None:
        """Track the current task (one relaying a stream) until `unregister`."""
        task = asyncio.current_task()
        if task is not None:
            self._loop = task.get_loop()
            self._streams.add(task)
        return task

    def unregister(self, task: asyncio.Task | None) -> None:
        self._streams.discard(task)  # type: ignore[arg-type]
        self._interrupted.discard(task)  # type: ignore[arg-type]

    def interrupted(self, task: asyncio.Task | None) -> bool:
        """Whether `task` was cancelled by this shutdown (not by its client leaving)."""
        return task is not None and task in self._interrupted

    def begin(self) -> None:
        """The server was asked to stop. Safe to call from a signal handler, more than once."""
        for callback in self._on_begin:
            callback()
        if self._begun or self._loop is None:
            return  # no stream was ever relayed: nothing to end
        self._begun = True
        self._loop.call_soon_threadsafe(self._arm)

    def _arm(self) -> None:
        assert self._loop is not None
        log.info("shutdown_draining", open_streams=len(self._streams), grace_s=self.grace_s)
        self._loop.call_later(self.grace_s, self._interrupt)

    def _interrupt(self) -> None:
        if self._streams:
            log.warning("shutdown_interrupting_streams", open_streams=len(self._streams))
        for task in list(self._streams):
            self._interrupted.add(task)
            task.cancel(msg="memlane is shutting down")
