"""What reading the preload cache costs a chat request (`proxy.recall`, `learner.dream.PreloadCache`).

    nice -n 10 python -m tests.benchmarks.bench_preload_lookup            # 300 memories a user
    nice -n 10 python -m tests.benchmarks.bench_preload_lookup --memories 2000 --calls 5000

The request path first asks `PreloadCache.candidate` (the query's inferred domains against the
cache, in RAM) and only when an entry exists `is_fresh`, which reads `store.user_signature`:
from the store's RAM view of the user when it has one, else one aggregate query over the user's
rows. This times each piece, and the signature both ways, on a real DuckDB file with the hash
embedder (no model). Figures are per call, in milliseconds.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from learner.dream import PreloadCache, preload
from memory import HashEmbedder, MemoryStore

FOOD_QUERY = "What should I cook for dinner tonight?"
NO_DOMAIN_QUERY = "Hello there, how are you doing?"


def timed(call: Callable[[int], object], n: int) -> tuple[float, float]:
    """(p50, p90) of one call, in ms; `call` gets the call's number, to make each query new
    (`infer_domains` caches the sentences it has seen, and real queries rarely repeat)."""
    samples = []
    for i in range(n):
        started = time.perf_counter()
        call(i)
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.9)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memories", type=int, default=300, help="Memories of each of the two users.")
    parser.add_argument("--calls", type=int, default=2000, help="Calls timed per figure.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        store = MemoryStore.open(Path(folder) / "bench.duckdb", embedder=HashEmbedder())
        try:
            for i in range(args.memories):
                store.add("ada", f"The user cooks dish number {i} with garlic and pasta for dinner.", source="bench")
                store.add("bob", f"The user maintains Python service number {i}.", source="bench")
            cache = PreloadCache()
            preload(store, "ada", cache=cache)
            store.flush()
            store.user_signature("ada")  # starts the RAM view's build (in the background)
            store.flush()
            context = cache.candidate("ada", FOOD_QUERY, store.clock.now())
            assert context is not None and cache.is_fresh(store, context)
            now = store.clock.now()
            rows = {
                "candidate, no domain in the query": timed(
                    lambda i: cache.candidate("ada", f"{NO_DOMAIN_QUERY} ({i})", now), args.calls),
                "candidate, another user (no entry)": timed(
                    lambda i: cache.candidate("bob", f"{FOOD_QUERY} ({i})", now), args.calls),
                "candidate, hit": timed(lambda i: cache.candidate("ada", f"{FOOD_QUERY} <{i}>", now), args.calls),
                "user_signature, RAM view": timed(lambda i: store.user_signature("ada"), args.calls),
                "user_signature, DuckDB (bob: no view yet)": timed(
                    lambda i: store._cursor().execute(  # the query user_signature runs without a view
                        "SELECT count(*), max(updated_at) FROM memories WHERE user_id = ? AND valid_to IS NULL",
                        ["bob"]).fetchone(), min(args.calls, 500)),
                "lookup (candidate + is_fresh), hit": timed(
                    lambda i: cache.lookup(store, "ada", f"{FOOD_QUERY} [{i}]"), args.calls),
            }
        finally:
            store.close()
    print(f"{args.memories} memories a user, {args.calls} calls a row")
    print(f"{'step':<44}{'p50 ms':>9}{'p90 ms':>9}")
    for name, (p50, p90) in rows.items():
        print(f"{name:<44}{p50:>9.4f}{p90:>9.4f}")


if __name__ == "__main__":
    main()
