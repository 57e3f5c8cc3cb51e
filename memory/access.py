"""Access statistics written in batches: every retrieval counts, few transactions do.

Each chat request with memory on retrieves a handful of memories, and each retrieval must
raise their `access_count`, set `last_accessed` and count the domains they belong to. Written
per request that was two write transactions and a scan of the user's rows on the store's
background thread (measured 10-14 ms of CPU per request at 10k memories, more than the
query embedding). `AccessBuffer` adds the retrievals up in RAM and writes them together,
`ACCESS_LINGER_S` after the first one: one UPDATE and one upsert per batch.

Nothing is lost on a clean shutdown (`MemoryStore.close` and `flush` drain the buffer). A
crash loses at most the last linger's access counts, which are statistics, not memories.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime

__all__ = ["ACCESS_LINGER_S", "AccessBatch", "AccessBuffer"]

ACCESS_LINGER_S = 0.5

AccessBatch = dict[str, Counter[str]]  # user id -> memory id -> retrievals


class AccessBuffer:
    """Retrievals not yet written; `write` gets each batch on the store's background thread."""

    def __init__(self, submit: Callable[[Callable[[], None]], object],
                 write: Callable[[AccessBatch, datetime], None], *, linger_s: float = ACCESS_LINGER_S) -> None:
        self._submit = submit  # runs a function on the store's background thread
        self._write = write
        self.linger_s = linger_s
        self._pending: AccessBatch = {}
        self._last: datetime | None = None
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def add(self, user_id: str, memory_ids: Sequence[str], at: datetime) -> None:
        with self._lock:
            self._pending.setdefault(user_id, Counter()).update(dict.fromkeys(memory_ids, 1))
            self._last = at if self._last is None else max(self._last, at)
            if self._timer is None:
                self._timer = threading.Timer(self.linger_s, self._due)
                self._timer.daemon = True
                self._timer.start()

    def _due(self) -> None:
        try:
            self._submit(self.drain)
        except RuntimeError:  # the store is closing: close() drains what is left
            pass

    def drain(self) -> None:
        """Write what is pending now (on the calling thread)."""
        with self._lock:
            batch, at = self._pending, self._last
            self._pending, self._last = {}, None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if batch and at is not None:
            self._write(batch, at)
