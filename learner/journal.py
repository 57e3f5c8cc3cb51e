"""The interaction journal: each accepted exchange is on disk before its answer completes.

The learner writes teacher-log rows in batches on its own thread, after the answer; until then
an exchange lives only in the learner's queue, and a killed process (SIGKILL, the OOM killer)
would lose it although the client got its answer. `LearnerWorker.submit` therefore appends the
exchange to a journal segment first (one ``write(2)`` of one JSON line, no fsync: a few
microseconds), and the learner thread deletes a segment once every exchange in it is committed
to the database. Segments left by a killed process are replayed on the next start.

What it survives: a killed process (the kernel's page cache keeps the write). What it does not:
a power cut or kernel crash in the seconds before the kernel writes the page out.
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("memlane.learner")

SEGMENT_ROWS = 1000  # a new segment after this many exchanges
SEGMENT_BYTES = 16 * 1024 * 1024  # or this many bytes


@dataclass
class _Segment:
    path: Path
    fd: int
    appended: int = 0
    committed: int = 0
    size: int = 0


class InteractionJournal:
    """Append-only segments in ``directory``; FIFO, like the learner's queue."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._leftovers = sorted(self.directory.glob("segment-*.jsonl"))  # from a run that did not stop cleanly
        self._segments: deque[_Segment] = deque()
        self._serial = int(self._leftovers[-1].stem.split("-")[1]) if self._leftovers else 0

    def leftovers(self) -> Iterator[dict]:
        """The exchanges of segments a previous run left; a torn last line is skipped."""
        for path in self._leftovers:
            for line in path.read_bytes().splitlines():
                try:
                    yield json.loads(line)
                except ValueError:
                    log.warning("journal_torn_line", segment=path.name, bytes=len(line))

    def forget_leftovers(self) -> None:
        for path in self._leftovers:
            path.unlink(missing_ok=True)
        self._leftovers = []

    def append(self, line: bytes) -> None:
        """Add one exchange (a JSON document without newlines). Call in queue order."""
        with self._lock:
            segment = self._segments[-1] if self._segments else None
            if segment is None or segment.fd < 0 or segment.appended >= SEGMENT_ROWS or segment.size >= SEGMENT_BYTES:
                if segment is not None:
                    self._seal(segment)
                segment = self._open()
            segment.size += os.write(segment.fd, line + b"\n")
            segment.appended += 1
            self._drop_committed()

    def committed(self, rows: int) -> None:
        """The oldest `rows` appended exchanges are in the database."""
        with self._lock:
            for segment in self._segments:
                take = min(rows, segment.appended - segment.committed)
                segment.committed += take
                rows -= take
                if rows == 0:
                    break
            self._drop_committed()

    def close(self) -> None:
        """After the learner has written everything: no segment is needed any more."""
        with self._lock:
            for segment in self._segments:
                self._seal(segment)
                if segment.committed >= segment.appended:
                    segment.path.unlink(missing_ok=True)
            self._segments.clear()

    def _open(self) -> _Segment:
        self._serial += 1
        path = self.directory / f"segment-{self._serial:012d}.jsonl"
        segment = _Segment(path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        self._segments.append(segment)
        return segment

    @staticmethod
    def _seal(segment: _Segment) -> None:
        if segment.fd >= 0:
            os.close(segment.fd)
            segment.fd = -1

    def _drop_committed(self) -> None:
        """Delete full, sealed-or-sealable segments whose exchanges are all in the database."""
        while len(self._segments) > 1 and self._segments[0].committed >= self._segments[0].appended:
            segment = self._segments.popleft()
            self._seal(segment)
            segment.path.unlink(missing_ok=True)
