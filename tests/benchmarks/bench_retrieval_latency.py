"""Retrieval latency at 10k, 100k and 1M memories (embed, search, format), and insert throughput.

Not a test: run it from the repository root and read the figures it prints.

    python -m tests.benchmarks.bench_retrieval_latency --out latency.json
    python -m tests.benchmarks.bench_retrieval_latency --sizes 10000 --quick   # smoke run

Memories: a pool of `--pool` (8,192) distinct third-person sentences, made by running
`learner.extract.extract_facts` over the statements of `tests.benchmarks.dialogue_gen` (slot
facts, hard negatives, distractors: ~3,000 distinct) with a short tail ("... on Monday",
"... in 2019"). Embedding a million sentences with MiniLM would take ~45 minutes on this machine,
so the pool is embedded once with MiniLM (cached in `--cache-dir`) and memory i gets pool
sentence i mod P as its text and pool vector i mod P plus Gaussian noise (sd 0.02 per dimension,
cosine ~0.93 to the pool vector), L2-normalised: clusters of near-duplicate meanings, no two
vectors equal. Texts repeat every P memories (at 1M each text is held ~122 times).

User shapes:
- `single` (10k, 100k and, with `--single-1m`, 1M): one user holds all N memories, the worst
  case for one user's search (the HNSW path: more than 4,096 vectors for the user).
- `shared` (1M): one heavy user holds half of them (the HNSW path over a store shared with
  others) and 500 light users hold 1,000 each (their search is the exact per-user scan); the
  queries alternate between the heavy user and light users. Each light user is asked once,
  so without `--preload` every light query is that user's first since the store opened (read
  from DuckDB while their view builds); `--preload` builds every view that fits in
  `--view-rows` first, as `memlane serve` does at start (`MemoryStore.preload_views`).

Build: `store.insert_many` in batches of 10,000 (the HNSW index exists from `MemoryStore.open`
on, so it is maintained during the inserts: the insert rate includes it), then
`store.refresh_text_index()` (the BM25 index). Stores are cached in `--cache-dir` and reopened
on later runs. Single-insert throughput goes through `store.add` (dedup, supersession, tier rules)
with precomputed MiniLM vectors, on a fresh 10k store.

Queries: questions a user would ask (dialogue_gen's questions and chit-chat), each timed as
- embed: real MiniLM, one text, torch on 1 thread (the request path embeds one query at a time);
- search: `store.search(user, vector, k=5, query=text, touch=False, relations=False)`, as the
  request path calls it: vector leg (HNSW or exact scan), BM25 leg, current/tier filter, links,
  ranking. touch=False keeps the background access-count update out of the timing (its cost is
  reported on its own with `--access-cost`);
- format: `proxy.enrich.inject` of the 5 contents into an OpenAI request (token cap 400);
- total_overlapped: the same query again as `proxy.recall` runs it, the BM25 leg on a thread
  while the query is embedded, its hits passed to `search(text_hits=...)`;
and, inside search, the time of each store call it makes (`vector_neighbours`, `text_matches`,
`get_many`, `similarities`, `links_from`, `conversation_neighbours`), per query. p50 and p99
over `--queries` queries after 10 warm-up queries.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import logging
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import OrderedDict
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import structlog

from learner.extract import extract_facts
from memory import (
    Confidence,
    HashEmbedder,
    MemoryEntry,
    MemorySource,
    MemoryStore,
    MemoryType,
    MiniLMEmbedder,
    Tier,
    TruthCategory,
    candidate_count,
    content_hash,
)
from memory.indexes import CREATE_HNSW, HNSW_INDEX
from memory.views import VIEW_CACHE_MAX_ROWS
from proxy.enrich import inject
from tests.benchmarks.dialogue_gen import _CHITCHAT, _DISTRACTORS, SLOTS, _fill
from tests.benchmarks.progress import counting, track

TARGET_P99_MS = {100_000: 20.0, 1_000_000: 30.0}
BATCH = 10_000
NOISE_SD = 0.02
TOP_K = 5
TOKEN_CAP = 400
LIGHT_USER_MEMORIES = 1_000
NOW = datetime(2026, 1, 1, 12, 0, 0)
_TAILS = ("", " on Monday", " on Saturday", " in 2019", " in 2021", " with friends",
          " last spring", " at the weekend", " after work", " with the family")


class FixedClock:
    def now(self) -> datetime:
        return NOW


# -- data ---------------------------------------------------------------------------------

def pool_sentences(size: int, seed: int = 11) -> list[str]:
    """`size` distinct third-person memory sentences: the generator's ~3,000 statements, each
    with a short tail ("... on Monday", "... in 2019") so there are up to ten times as many."""
    rng = random.Random(seed)
    found: dict[str, None] = {}
    for _ in range(60_000):  # draws; the generator's space is ~3,000 distinct facts
        if rng.random() < 0.5:
            slot = rng.choice(SLOTS)
            template = rng.choice(slot.state + slot.correct + slot.hard_negatives)
            text = template.replace("{v}", rng.choice(slot.values)).replace("{x}", rng.choice(slot.values))
        else:
            text = _fill(rng, rng.choice(_DISTRACTORS))
        for fact in extract_facts(text):
            found.setdefault(fact.content)
    sentences = [base.rstrip(".") + tail + "." for tail in _TAILS for base in found]
    if size > len(sentences):
        raise ValueError(f"at most {len(sentences)} distinct sentences")
    return random.Random(seed).sample(sentences, size)


def queries(count: int, seed: int = 12) -> list[str]:
    rng = random.Random(seed)
    asked = [q for s in SLOTS for q in s.questions] + [c for c in _CHITCHAT if "?" in c]
    return [_fill(rng, rng.choice(asked)) for _ in range(count)]


def make_embedder(backend: str = "auto", model_cache: Path | None = None):
    """MiniLM as the server runs it: ONNX Runtime from the model cache (``--embedder-backend``)."""
    import torch

    torch.set_num_threads(1)
    cache = model_cache or Path.home() / ".cache" / "memlane" / "models"
    embedder = MiniLMEmbedder(cache_dir=cache, backend=backend)
    embedder.load()
    log(f"embedder: MiniLM on {embedder.runtime} {embedder.backend_note}".rstrip())
    return embedder


def pool_vectors(sentences: list[str], cache_dir: Path, embedder) -> np.ndarray:
    cache = cache_dir / f"latency-pool-{len(sentences)}.npy"
    if cache.exists():
        return np.load(cache)
    started = time.perf_counter()
    vectors = embedder.embed(sentences)
    log(f"embedded the pool of {len(sentences)} sentences in {time.perf_counter() - started:.1f} s")
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(cache, vectors)
    return vectors


def entries_for(user_ids: list[str], start: int, pool: list[str], vectors: np.ndarray,
                rng: np.random.Generator) -> tuple[list[MemoryEntry], np.ndarray]:
    """Memories number start.. start+len(user_ids) (user_ids[j] owns memory start+j)."""
    index = np.arange(start, start + len(user_ids))
    base = vectors[index % len(pool)]
    noisy = base + rng.normal(0.0, NOISE_SD, base.shape).astype(np.float32)  # (B, 384)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    entries = []
    for i, user_id in zip(index.tolist(), user_ids):
        content = pool[i % len(pool)]
        at = NOW - timedelta(minutes=i % 525_600)
        entries.append(MemoryEntry(
            id=uuid.uuid4().hex, user_id=user_id, content=content,
            content_hash=content_hash(f"{content} #{i}"), tier=Tier.LONG_TERM,
            truth_category=TruthCategory.CONTEXTUAL, memory_type=MemoryType.FACT,
            confidence=Confidence(0.6, 0.6, 1.0, 0, 0), created_at=at, updated_at=at,
            valid_from=at, recorded_at=at,
        ))
    return entries, noisy


def owners(size: int, shape: str) -> list[str]:
    if shape == "single":
        return ["u-single"] * size
    heavy = size // 2
    light = [f"u-light-{n:04d}" for n in range((size - heavy) // LIGHT_USER_MEMORIES)
             for _ in range(LIGHT_USER_MEMORIES)]
    return ["u-heavy"] * heavy + light


# -- build --------------------------------------------------------------------------------

def build(path: Path, size: int, shape: str, pool: list[str], vectors: np.ndarray,
          bulk_index: bool) -> dict:
    """A store of `size` memories at `path`; returns the build figures.

    `bulk_index`: drop the HNSW index before the inserts and create it once after them (a
    benchmark-only shortcut through the store's private cursor; the store itself keeps the
    index from `open` on and maintains it row by row)."""
    users = owners(size, shape)
    rng = np.random.default_rng(size)
    order = np.random.default_rng(0).permutation(len(users))  # users' rows interleaved
    users = [users[i] for i in order]
    inserted, insert_s = 0, 0.0
    figures: dict = {}
    with MemoryStore.open(path, embedder=HashEmbedder(), clock=FixedClock()) as store:
        if bulk_index:
            store._writable_cursor().execute(f"DROP INDEX {HNSW_INDEX}")
        with counting(f"  inserting {size} memories", size) as advance:
            while inserted < size:
                batch_users = users[inserted: inserted + BATCH]
                entries, batch_vectors = entries_for(batch_users, inserted, pool, vectors, rng)
                started = time.perf_counter()
                store.insert_many(entries, batch_vectors)
                insert_s += time.perf_counter() - started
                inserted += len(entries)
                advance(len(entries))
                if inserted % 100_000 == 0 or inserted == size:
                    log(f"  {inserted} inserted, {inserted / insert_s:.0f}/s so far")
        if bulk_index:
            started = time.perf_counter()
            store._writable_cursor().execute(CREATE_HNSW)
            figures["hnsw_build_s"] = round(time.perf_counter() - started, 1)
            log(f"  HNSW index built in {figures['hnsw_build_s']} s")
        started = time.perf_counter()
        store.refresh_text_index()
        figures["fts_build_s"] = round(time.perf_counter() - started, 2)
    figures |= {"insert_many_per_s": round(size / insert_s), "insert_s": round(insert_s, 1),
                "hnsw_during_inserts": not bulk_index, "db_mb": round(path.stat().st_size / 2**20)}
    return figures


def single_adds(cache_dir: Path, pool: list[str], vectors: np.ndarray, sample: int) -> dict:
    """`store.add` (all the rules) per second, on a store already holding 10k memories."""
    path = cache_dir / "latency-adds.duckdb"
    for leftover in (path, Path(f"{path}.wal")):
        leftover.unlink(missing_ok=True)
    rng = np.random.default_rng(1)
    with MemoryStore.open(path, embedder=HashEmbedder(), clock=FixedClock()) as store:
        entries, base = entries_for(["u-adds"] * 10_000, 0, pool, vectors, rng)
        store.insert_many(entries, base)
        texts = [f"The user noted item {n} about {pool[n % len(pool)].rstrip('.')}." for n in range(sample)]
        noisy = vectors[np.arange(sample) % len(pool)] + rng.normal(0, 0.1, (sample, 384)).astype(np.float32)
        noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
        started = time.perf_counter()
        for text, vector in track(zip(texts, noisy), f"  {sample} store.add calls", total=sample):
            store.add("u-adds", text, source=MemorySource("interaction", ref="bench",
                                                           extractor="rules"), embedding=vector)
        seconds = time.perf_counter() - started
    path.unlink(missing_ok=True)
    return {"add_per_s": round(sample / seconds, 1), "add_ms_mean": round(1000 * seconds / sample, 2),
            "sample": sample}


# -- queries ------------------------------------------------------------------------------

def explain_uses_hnsw(store: MemoryStore, user_id: str, vector: np.ndarray) -> bool:
    from memory.indexes import (
        HNSW_SQL,  # the benchmark checks the store's own query plan
    )

    plan = store._cursor().execute("EXPLAIN " + HNSW_SQL, [vector.tolist(), user_id, 600]).fetchall()
    return "HNSW_INDEX_SCAN" in "".join(str(row) for row in plan)


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.array(samples) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 2), "p99": round(float(np.percentile(ms, 99)), 2),
            "mean": round(float(ms.mean()), 2)}


INNER = ("vector_neighbours", "text_matches", "get_many", "similarities", "links_from",
         "conversation_neighbours")


def instrument(store: MemoryStore) -> dict[str, float]:
    """Time the store calls `store.search` makes (instance attributes shadow the methods)."""
    spent = dict.fromkeys(INNER, 0.0)
    for name in INNER:
        method = getattr(store, name)

        def timed(*args, _method=method, _name=name, **kwargs):
            started = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                spent[_name] += time.perf_counter() - started

        setattr(store, name, timed)
    return spent


@contextlib.contextmanager
def without_views(store: MemoryStore):
    """The store as it reads without RAM views (the baseline): none found, none built."""
    views, saved = store._views, store._views._views
    views._views, views.claim = OrderedDict(), lambda user_id: False
    try:
        yield
    finally:
        views._views = saved
        del views.claim


def warm_views(store: MemoryStore, users: list[str]) -> dict[str, float]:
    """Build the RAM views of these users as the first request of each would (in the
    background), wait for them, and return the seconds each took; users without one (over
    the store's `view_rows`, or evicted) are left to DuckDB."""
    seconds = {}
    for user_id in dict.fromkeys(users):
        started = time.perf_counter()
        store.get_many(user_id, ["-"], relations=False)  # the first read starts the build
        store.flush()
        if store._views.get(user_id) is not None:
            seconds[user_id] = round(time.perf_counter() - started, 2)
    return seconds


def time_queries(store: MemoryStore, embedder, texts: list[str], users: list[str]) -> dict:
    """Each query twice per mode: one stage after the other (with each store call timed), then
    as the proxy runs it (`proxy.recall`: the BM25 leg on a thread while the query is embedded).
    Modes, interleaved query by query (the order alternating): "views", the store as it serves
    (RAM views where built), and "duckdb", every read from DuckDB (the baseline)."""
    modes = ("views", "duckdb")
    stages: dict[str, dict[str, list[float]]] = {m: {k: [] for k in (
        "embed", "search", "format", "total", "total_overlapped", *INNER)} for m in modes}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": ""}]}
    spent = instrument(store)
    n_text = candidate_count(store.weights, TOP_K)
    warm = 10
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        for n, (text, user_id) in track(enumerate(zip(texts, users, strict=True)), f"  {len(texts)} queries",
                                        total=len(texts)):
            for mode in (modes if n % 2 == 0 else modes[::-1]):
                with without_views(store) if mode == "duckdb" else contextlib.nullcontext():
                    for name in INNER:
                        spent[name] = 0.0
                    t0 = time.perf_counter()
                    vector = embedder.embed([text])[0]
                    t1 = time.perf_counter()
                    found = store.search(user_id, vector, k=TOP_K, query=text, touch=False, relations=False)
                    t2 = time.perf_counter()
                    _format(body, text, found)
                    t3 = time.perf_counter()
                    inner = dict(spent)
                    text_leg = pool.submit(store.text_matches, user_id, text, n_text)
                    vector = embedder.embed([text])[0]
                    found = store.search(user_id, vector, k=TOP_K, query=text, touch=False,
                                         relations=False, text_hits=text_leg.result())
                    _format(body, text, found)
                    t4 = time.perf_counter()
                if n < warm:
                    continue
                for name, seconds in (("embed", t1 - t0), ("search", t2 - t1), ("format", t3 - t2),
                                      ("total", t3 - t0), ("total_overlapped", t4 - t3),
                                      *inner.items()):
                    stages[mode][name].append(seconds)
    for name in INNER:
        delattr(store, name)
    out = {name: percentiles(samples) for name, samples in stages["views"].items()}
    out["duckdb"] = {name: percentiles(samples) for name, samples in stages["duckdb"].items()}
    return out


def _format(body: dict, text: str, found: list[MemoryEntry]) -> None:
    inject({**body, "messages": [{"role": "user", "content": text}]},
           [m.content for m in found], "openai", token_cap=TOKEN_CAP)


def record_access_cost(store: MemoryStore, user_id: str, embedder, text: str) -> float:
    vector = embedder.embed([text])[0]
    found = store.search(user_id, vector, k=TOP_K, query=text, touch=False)
    started = time.perf_counter()
    store.record_access(user_id, [m.id for m in found])
    store.flush()
    return round(1000 * (time.perf_counter() - started), 2)


def measure(size: int, shape: str, args, embedder, pool, vectors) -> dict:
    path = args.cache_dir / f"latency-{shape}-{size}-p{len(pool)}.duckdb"
    figures: dict = {"size": size, "shape": shape}
    if not path.exists():
        log(f"building {path.name}")
        figures["build"] = build(path, size, shape, pool, vectors, size >= args.bulk_index_from)
        log(f"  built: {figures['build']}")
    if args.build_only:
        return figures
    # A read-write open brings the derived indexes (HNSW, BM25 postings) up to this memlane's
    # version of the store; the timed runs then open the file read-only.
    started = time.perf_counter()
    MemoryStore.open(path, embedder=HashEmbedder(), clock=FixedClock()).close()
    figures["index_check_s"] = round(time.perf_counter() - started, 2)
    figures["load_avg_before"] = round(os.getloadavg()[0], 2)
    started = time.perf_counter()
    with MemoryStore.open(path, embedder=HashEmbedder(), clock=FixedClock(), read_only=True,
                          view_rows=args.view_rows) as store:
        figures["open_s"] = round(time.perf_counter() - started, 2)
        texts = queries(args.queries + 10)
        if shape == "single":
            users = ["u-single"] * len(texts)
        else:
            light = [f"u-light-{n:04d}" for n in range((size - size // 2) // LIGHT_USER_MEMORIES)]
            users = [("u-heavy" if n % 2 == 0 else light[n % len(light)]) for n in range(len(texts))]
        heavy = users[0]
        figures["hnsw_in_plan"] = explain_uses_hnsw(store, heavy, vectors[0])
        if args.preload:  # as `memlane serve` starts: every user that fits, most recent first
            started = time.perf_counter()
            queued = store.preload_views()
            store.flush()
            figures["preload"] = {"users": queued, "seconds": round(time.perf_counter() - started, 1)}
            log(f"  views preloaded: {figures['preload']}")
        built = warm_views(store, users[:1] if shape == "single" else users[:2])
        figures["view_build_s"] = built
        log(f"  RAM views built before timing: {built}")
        figures["latency_ms"] = time_queries(store, embedder, texts, users)
        if shape == "shared":
            for who, pick in (("heavy", 0), ("light", 1)):
                subset = [(t, u) for n, (t, u) in enumerate(zip(texts, users)) if n % 2 == pick]
                figures[f"latency_ms_{who}"] = time_queries(
                    store, embedder, [t for t, _ in subset], [u for _, u in subset])
    if args.view_refresh:
        figures["view_refresh"] = view_refresh_cost(path, heavy, args, embedder)
        log(f"  view refresh: {figures['view_refresh']}")
    if args.access_cost:
        with MemoryStore.open(path, embedder=HashEmbedder(), clock=FixedClock()) as store:
            figures["record_access_ms"] = record_access_cost(store, heavy, embedder, texts[0])
    figures["load_avg_after"] = round(os.getloadavg()[0], 2)
    target = TARGET_P99_MS.get(size)
    if target is not None:
        figures["target_p99_ms"] = target
        figures["target_met"] = figures["latency_ms"]["total"]["p99"] <= target
    return figures


def view_refresh_cost(path: Path, user_id: str, args, embedder) -> dict:
    """On a copy of the store: seconds to build the user's view from nothing, then to bring it
    up to date after one new memory (the graph patched), after an edit (a memory re-embedded),
    and after a delete (the graph built anew), each from the write's return until the view
    serves again (`VIEW_SETTLE_S` set to 0); and the write itself. Reads in between go to
    DuckDB, so these are the seconds a user's searches run at the DuckDB figures."""
    from memory.ownership import edit_memory

    figures: dict = {}
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=path.parent)))
        copy = scratch / path.name
        shutil.copyfile(path, copy)
        store = stack.enter_context(MemoryStore.open(copy, embedder=HashEmbedder(), clock=FixedClock(),
                                                     view_rows=args.view_rows))
        store._views.settle_s = 0.0
        figures["build_s"] = warm_views(store, [user_id]).get(user_id)
        text = "The user keeps bees on the roof of the old bakery."
        vector = embedder.embed([text])[0]
        added: list[str] = []
        steps = (
            ("add", lambda: added.append(store.add(user_id, text, embedding=vector, source=MemorySource(
                "interaction", ref="bench", extractor="rules"))[0].id)),
            ("edit", lambda: edit_memory(store, user_id, added[0],
                                         content="The user keeps wasps on the roof of the new bakery.")),
            ("delete", lambda: store.forget(user_id, added[0])),
        )
        for name, write in steps:
            started = time.perf_counter()
            write()
            store._access.drain()
            figures[f"{name}_write_s"] = round(time.perf_counter() - started, 2)
            figures[f"{name}_view_s"] = warm_views(store, [user_id]).get(user_id)
    return figures


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_figures(figures: dict) -> None:
    name = f"{figures['size']:,} memories, {figures['shape']}"
    print(f"\n{name}: HNSW in plan: {figures['hnsw_in_plan']}, open {figures['open_s']} s")
    if "build" in figures:
        print(f"  build: {figures['build']}")
    keys = ["latency_ms"] + [k for k in ("latency_ms_heavy", "latency_ms_light") if k in figures]
    if figures.get("view_build_s"):
        print(f"  RAM views built before timing (s): {figures['view_build_s']}")
    for key in keys:
        print(f"  {key.removeprefix('latency_ms').lstrip('_') or 'all queries'}: "
              "as served (RAM views where built) | every read from DuckDB, interleaved")
        baseline = figures[key]["duckdb"]
        for stage, p in figures[key].items():
            if stage == "duckdb":
                continue
            b = baseline[stage]
            print(f"    {stage:<23} p50 {p['p50']:>8.2f} ms   p99 {p['p99']:>8.2f} ms"
                  f"   |   p50 {b['p50']:>8.2f} ms   p99 {b['p99']:>8.2f} ms")
    if "target_met" in figures:
        print(f"  target p99 <= {figures['target_p99_ms']} ms: {'met' if figures['target_met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--single-1m", action="store_true", help="also one user holding 1M")
    parser.add_argument("--cache-dir", type=Path, default=Path(".bench-cache"))
    parser.add_argument("--pool", type=int, default=8192, help="distinct sentences embedded")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--adds", type=int, default=1000, help="store.add sample (0: skip)")
    parser.add_argument("--access-cost", action="store_true", help="time one record_access")
    parser.add_argument("--preload", action="store_true",
                        help="build every view that fits before timing (MEMLANE_MEMORY_VIEW_PRELOAD at start)")
    parser.add_argument("--view-refresh", action="store_true",
                        help="on a copy of each store: a view's build, and its refresh after a write")
    parser.add_argument("--bulk-index-from", type=int, default=1_000_000,
                        help="build the HNSW index after the inserts from this size on")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--view-rows", type=int, default=VIEW_CACHE_MAX_ROWS,
                        help="memories held in RAM views (MEMLANE_MEMORY_VIEW_ROWS)")
    parser.add_argument("--quick", action="store_true", help="50 queries, 200 adds")
    parser.add_argument("--embedder-backend", choices=("auto", "onnx", "torch"), default="auto",
                        help="MiniLM runtime, as MEMLANE_EMBEDDER_BACKEND (default: ONNX Runtime)")
    parser.add_argument("--model-cache", type=Path, default=None,
                        help="where the ONNX export lives (default ~/.cache/memlane/models)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.queries, args.adds = 50, min(args.adds, 200)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    embedder = make_embedder(args.embedder_backend, args.model_cache)
    pool = pool_sentences(args.pool)
    vectors = pool_vectors(pool, args.cache_dir, embedder)
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cpus, Python "
                                f"{platform.python_version()}",
                     "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                              capture_output=True, text=True, check=False).stdout.strip(),
                     "runs": []}
    if args.adds:
        results["add"] = single_adds(args.cache_dir, pool, vectors, args.adds)
        print(f"store.add through the rules: {results['add']}")
    for size in (int(s) for s in args.sizes.split(",") if s):
        shapes = ["single"] if size < 1_000_000 else (["shared"] + (["single"] if args.single_1m else []))
        for shape in shapes:
            figures = measure(size, shape, args, embedder, pool, vectors)
            if not args.build_only:
                print_figures(figures)
            results["runs"].append(figures)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
