"""What the durable queue costs: teacher-log batches with and without their job rows, and jobs
run per second by the in-process runner (rules extractor).

    python -m tests.benchmarks.bench_learner_queue [--batches 60] [--jobs 400]

Prints one line per figure. Uses a real DuckDB file in a temporary folder and the lexical
embedder, so the figures are the queue's and DuckDB's, not the embedding model's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

from learner import RulesExtractor, run_job
from memory import HashEmbedder, InteractionRecord, MemoryStore, NewJob, RetryPolicy


def records(prefix: str, n: int) -> list[InteractionRecord]:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "I keep bees and goats."}]}
    answer = {"role": "assistant", "content": "Nice! Bees and goats are a good pair." * 4}
    return [InteractionRecord(f"{prefix}_{i}", f"user{i % 20}", datetime(2026, 1, 1), "gpt-4o-mini", "openai",
                              False, 200, None, body, body, answer, {"total_tokens": 40}, 12.0, None)
            for i in range(n)]


def time_batches(store: MemoryStore, size: int, batches: int, *, with_jobs: bool, tag: str) -> list[float]:
    out = []
    for b in range(batches):
        rows = records(f"{tag}{size}_{b}", size)
        jobs = [NewJob(r.request_id, r.user_id, f"I keep bees number {b}.") for r in rows] if with_jobs else []
        started = time.perf_counter()
        if with_jobs:
            store.log_interactions_and_jobs(rows, jobs)
        else:
            store.log_interactions(rows)
        out.append((time.perf_counter() - started) * 1000)
    return out


def main() -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--jobs", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = MemoryStore.open(Path(tmp) / "bench.duckdb", embedder=HashEmbedder())
        for size in (1, 64):
            plain = time_batches(store, size, args.batches, with_jobs=False, tag="p")
            jobs = time_batches(store, size, args.batches, with_jobs=True, tag="j")
            print(f"batch of {size:>2}: interactions only p50 {statistics.median(plain):.2f} ms, "
                  f"with job rows p50 {statistics.median(jobs):.2f} ms")
        store.close()
    with tempfile.TemporaryDirectory() as tmp:
        store = MemoryStore.open(Path(tmp) / "run.duckdb", embedder=HashEmbedder())
        rows = records("run", args.jobs)
        words = [f"w{i}x{i * 7 % 13}" for i in range(args.jobs)]
        store.log_interactions_and_jobs(rows, [NewJob(r.request_id, r.user_id, f"I collect {w} shells.")
                                               for r, w in zip(rows, words, strict=True)])
        extractor, embedder, policy = RulesExtractor(), HashEmbedder(), RetryPolicy()
        started = time.perf_counter()
        done = 0
        while jobs := store.lease_jobs("bench", limit=16, lease_for=timedelta(minutes=5)):
            for job in jobs:
                done += run_job(store, embedder, extractor, job, "bench", policy).state == "done"
        elapsed = time.perf_counter() - started
        print(f"runner: {done} jobs (one new memory each) in {elapsed:.2f} s = {done / elapsed:.0f} jobs/s")
        started = time.perf_counter()
        for i, word in enumerate(words[: args.jobs // 4]):
            store.add(f"plain{i % 20}", f"The user collects {word} pebbles.", source="extractor:rules")
        per_add = (time.perf_counter() - started) / (args.jobs // 4)
        print(f"baseline: store.add alone (no job, its own commit) {per_add * 1000:.1f} ms = {1 / per_add:.0f} memories/s")
        store.close()


if __name__ == "__main__":
    main()
