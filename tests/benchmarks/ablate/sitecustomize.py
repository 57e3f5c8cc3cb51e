"""Take one part of memlane's background work away, inside a benchmarked server.

Not part of memlane. ``bench_latency --without PART`` puts this folder on the server's
PYTHONPATH and names the part in ``MEMLANE_BENCH_WITHOUT``; Python imports this module at
start-up, before memlane, and replaces the part with a no-op. Comparing a run without a part
against a run with everything, interleaved, says what that part costs the request path.

Parts:
- ``teacher-log``: exchanges are dropped at submission: nothing journaled, written or learned.
- ``learner-batches``: exchanges are journaled and taken off the queue, then dropped: no facts
  extracted, no rows built, nothing written.
- ``log-writes``: batches are built and their facts extracted as usual; the DuckDB write is skipped.
- ``extraction``: every turn's job is written done without running the rules extractor.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PARTS = ("teacher-log", "learner-batches", "log-writes", "extraction")


def _without(part: str) -> None:
    import learner.worker
    import memory.store

    worker = learner.worker.LearnerWorker
    if part == "teacher-log":
        worker.submit = lambda self, exchange: True  # type: ignore[method-assign]
    elif part == "learner-batches":
        worker._process = lambda self, batch: None  # type: ignore[method-assign]
    elif part == "log-writes":
        memory.store.MemoryStore.log_interactions_and_jobs = lambda self, *a, **k: None  # type: ignore[method-assign]
    elif part == "extraction":
        worker._settle = lambda self, jobs: ([], [(j, {"extractor": "rules", "facts": 0, "memories": []})  # type: ignore[method-assign]
                                                  for j in jobs])
    else:
        raise SystemExit(f"MEMLANE_BENCH_WITHOUT: unknown part {part!r} (one of {', '.join(PARTS)})")


_part = os.environ.get("MEMLANE_BENCH_WITHOUT")
if _part:
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root
    _without(_part)
