"""How much faster a request in a preloaded domain gets its context (dream agent `preload`).

    python -m tests.benchmarks.bench_preload                  # MiniLM, 600 memories
    python -m tests.benchmarks.bench_preload --memories 3000 --queries 100

A store of one user's memories (sentences from templates over several domains) is embedded with
all-MiniLM-L6-v2. Domain activations are recorded as if retrieval had served mostly food and
programming memories; `preload` caches the best memories of the top domains. Then, for queries
in those domains, it times the cold path a request takes today (embed the query with MiniLM,
hybrid search, top 5) against `PreloadCache.lookup` (infer the domain, check the user's
memories did not change, return the cached lines). Medians and p90 in milliseconds.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

TEMPLATES = {
    "food": ["The user loves {x} food.", "The user can't eat {x}.", "The user cooks {x} on weekends."],
    "programming": ["The user writes {x} at work.", "The user prefers {x} for side projects.",
                    "The user debugs {x} code daily."],
    "music": ["The user plays the {x}.", "The user listens to {x} music."],
    "travel": ["The user took a trip to {x}.", "The user wants a visa for {x}."],
}
FILLERS = {
    "food": ["thai", "gluten", "korean", "spicy", "italian", "vegan", "pork", "mushrooms"],
    "programming": ["python", "rust", "typescript", "golang", "java", "kotlin", "react", "django"],
    "music": ["cello", "jazz", "piano", "guitar", "opera", "bass"],
    "travel": ["Peru", "Japan", "Kenya", "Norway", "Chile", "Vietnam"],
}
QUERIES = {
    "food": ["What should I cook for dinner tonight?", "Suggest a recipe for lunch.", "Any food ideas for a party?"],
    "programming": ["Help me debug this code.", "Which programming language fits a CLI tool?",
                    "Review my python function."],
}


def timed(calls) -> list[float]:
    out = []
    for work in calls:
        started = time.perf_counter()
        work()
        out.append((time.perf_counter() - started) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memories", type=int, default=600)
    parser.add_argument("--queries", type=int, default=60)
    args = parser.parse_args()

    from learner.dream import PreloadCache, preload
    from memory import MemoryStore, MiniLMEmbedder

    rng = random.Random(7)
    sentences = sorted({
        f"{rng.choice(TEMPLATES[d]).format(x=rng.choice(FILLERS[d]))[:-1]} ({i})."
        for i in range(args.memories) for d in (rng.choice(list(TEMPLATES)),)
    })
    embedder = MiniLMEmbedder()
    with tempfile.TemporaryDirectory() as tmp:
        store = MemoryStore.open(Path(tmp) / "bench.duckdb", embedder=embedder)
        vectors = embedder.embed(sentences)
        store.bulk_add("ada", sentences, vectors)
        store.refresh_text_index()
        store.record_domains("ada", ["food"] * 50 + ["programming"] * 30 + ["music"] * 5, "retrieval")
        cache = PreloadCache()
        report = preload(store, "ada", cache=cache, domains=2)
        print(f"{len(sentences)} memories; preloaded domains {report.domains}, {report.memories_cached} memories cached")
        print(f"{'domain':<13}{'cold p50':>9}{'cold p90':>9}{'warm p50':>9}{'warm p90':>9}{'speed-up':>9}")
        for domain, queries in QUERIES.items():
            picks = [queries[i % len(queries)] for i in range(args.queries)]
            cold_ms = timed([lambda q=q: store.search_text("ada", q, k=5, touch=False, relations=False)
                             for q in picks])
            warm_ms = timed([lambda q=q: cache.lookup(store, "ada", q) for q in picks])
            hits = [cache.lookup(store, "ada", q) for q in picks]
            assert all(h is not None and h.domain == domain for h in hits), "a query missed its domain's cache"
            c50, w50 = statistics.median(cold_ms), statistics.median(warm_ms)
            c90, w90 = (statistics.quantiles(x, n=10)[8] for x in (cold_ms, warm_ms))
            print(f"{domain:<13}{c50:>9.2f}{c90:>9.2f}{w50:>9.2f}{w90:>9.2f}{c50 / w50:>8.1f}x")
        store.close()


if __name__ == "__main__":
    main()
