"""Sustained load: N minutes at concurrency 64 through memlane in front of a mock upstream.

Not a test: run it from the repository root and read the figures it prints.

    python -m tests.benchmarks.bench_load                      # 10 minutes, c=64
    python -m tests.benchmarks.bench_load --minutes 1 --out bench-load.json

Three processes, as in ``bench_latency``: the fake upstream (``tests/e2e/fake_upstream.py``,
answering at once), ``memlane serve`` with memory on, and this closed-loop load generator
(``c`` workers, each with its own keep-alive connection). Requests rotate over 50 sub-users
(``X-Memlane-User``); every 10th user turn states a fact (so the learner extracts and stores
memories all along) and every 4th request streams. Every fact is new unless ``--fact-pool N``
bounds them to N distinct ones, restated in turn: then the store stops growing once each has
been said, and what RSS still does is not data the store was asked to keep.

Figures:
- errors: any non-200 or transport error (the target is zero);
- added latency: memlane's own ``memlane_overhead_seconds`` (total minus time waiting on the
  upstream) between two scrapes after warm-up, p50/p99 interpolated in its buckets; and, from
  the client, end-to-end p50/p99 through memlane against a direct round to the upstream at the
  same concurrency (before and after the run);
- memories extracted during the measured part (``memlane_memories_extracted``), the teacher-log
  rows written (``memlane_log_rows_written``): the data the run added, which the store's
  indexes and caches hold;
- resident memory: memlane's RSS from ``/proc/<pid>/status`` every ``--sample-s`` seconds;
  drift = median of the last quarter of the samples after warm-up over the median of the first
  quarter, minus one (the target is under 10%);
- DuckDB's own count (``memlane_store_memory_bytes``, by tag) at the start and the end of the
  measured part: how much of the growth is the store's cached blocks and key indexes.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.benchmarks.bench_latency import (
    MODEL,
    QUESTIONS,
    memlane_process,
    overhead_histogram,
    overhead_summary,
    stats,
    upstream_process,
)

USERS = 50
FACTS = ("I live in {}.", "My favourite colour is {}.", "I am allergic to {}.", "I work as a {}.")
WORDS = ("Lisbon", "teal", "peanuts", "carpenter", "Oslo", "amber", "pollen", "nurse")


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    errors: Counter = field(default_factory=Counter)
    memory: Counter = field(default_factory=Counter)  # x-memlane-memory values

    @property
    def requests(self) -> int:
        return len(self.latencies) + sum(self.errors.values())


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def drift(samples: list[float]) -> float | None:
    """Median of the last quarter over the median of the first quarter, minus one."""
    if len(samples) < 8:
        return None
    q = len(samples) // 4
    return statistics.median(samples[-q:]) / statistics.median(samples[:q]) - 1


def _message(i: int, fact_pool: int = 0) -> str:
    """The i-th user turn: a question, or every 10th a fact; with `fact_pool`, fact number
    i // 10 modulo the pool (a multiple of 4: the text then repeats with its number)."""
    if i % 10 == 0:
        n = (i // 10) % fact_pool if fact_pool else i
        return FACTS[(i // 10) % len(FACTS)].format(f"{WORDS[i % len(WORDS)]} {n}")
    return f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})"


async def counters(client: httpx.AsyncClient, url: str, names: tuple[str, ...]) -> dict[str, float]:
    """Current values of memlane's counters `names` (``_total`` samples, summed over labels)."""
    values = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families((await client.get(f"{url}/metrics")).text):
        if family.name in values:
            values[family.name] += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return values


GROWTH_COUNTERS = ("memlane_memories_extracted", "memlane_log_rows_written")


async def store_memory_mib(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    """What DuckDB's buffer manager holds for the store (``memlane_store_memory_bytes``), by tag."""
    held: dict[str, float] = {}
    for family in text_string_to_metric_families((await client.get(f"{url}/metrics")).text):
        if family.name == "memlane_store_memory_bytes":
            held = {s.labels["tag"]: round(s.value / 2**20, 1) for s in family.samples if s.value}
    return held


async def closed_loop(url: str, concurrency: int, seconds: float, *, proxied: bool,
                      fact_pool: int = 0) -> Tally:
    """Each worker sends its next request as soon as its last one is answered, for `seconds`."""
    tally, counter = Tally(), itertools.count()
    deadline = time.perf_counter() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            i = next(counter)
            stream = i % 4 == 0
            body = {"model": MODEL, "stream": stream,
                    "messages": [{"role": "user", "content": _message(i, fact_pool)}]}
            headers = {"x-memlane-user": f"user{i % USERS:02d}"} if proxied else {}
            started = time.perf_counter()
            try:
                async with client.stream("POST", url, json=body, headers=headers) as r:
                    content = await r.aread()
            except httpx.HTTPError as exc:
                tally.errors[type(exc).__name__] += 1
                continue
            elapsed = time.perf_counter() - started
            if r.status_code != 200 or (stream and not content.rstrip().endswith(b"[DONE]")):
                tally.errors[str(r.status_code) if r.status_code != 200 else "incomplete_stream"] += 1
                continue
            tally.latencies.append(elapsed)
            if "x-memlane-memory" in r.headers:
                tally.memory[r.headers["x-memlane-memory"]] += 1

    clients = [httpx.AsyncClient(timeout=120, trust_env=False,
                                 limits=httpx.Limits(max_connections=2, keepalive_expiry=120))
               for _ in range(concurrency)]
    try:
        await asyncio.gather(*(worker(c) for c in clients))
    finally:
        for c in clients:
            await c.aclose()
    return tally


async def sample_rss(pid: int, every_s: float, out: list[tuple[float, float]], stop: asyncio.Event) -> None:
    started = time.perf_counter()
    while not stop.is_set():
        value = rss_mib(pid)
        if value is not None:
            out.append((time.perf_counter() - started, value))
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass


async def run(args: argparse.Namespace, upstream: str, memlane) -> dict:  # type: ignore[no-untyped-def]
    chat = f"{memlane.url}/v1/chat/completions"
    direct = f"{upstream}/chat/completions"
    baseline_s = min(30.0, max(5.0, args.minutes * 60 * 0.05))
    print(f"  direct baseline: {baseline_s:.0f} s at c={args.concurrency}", flush=True)
    direct_before = await closed_loop(direct, args.concurrency, baseline_s, proxied=False)

    samples: list[tuple[float, float]] = []
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample_rss(memlane.process.pid, args.sample_s, samples, stop))
    warmup_s = min(args.warmup_s, args.minutes * 60 / 4)
    print(f"  warm-up: {warmup_s:.0f} s", flush=True)
    warm = await closed_loop(chat, args.concurrency, warmup_s, proxied=True, fact_pool=args.fact_pool)
    async with httpx.AsyncClient(timeout=30, trust_env=False) as probe:
        before = await overhead_histogram(probe, memlane.url)
        grown_before = await counters(probe, memlane.url, GROWTH_COUNTERS)
        store_before = await store_memory_mib(probe, memlane.url)
        measured_s = args.minutes * 60 - warmup_s
        print(f"  load: {measured_s:.0f} s at c={args.concurrency}", flush=True)
        measured_from = len(samples)
        load = await closed_loop(chat, args.concurrency, measured_s, proxied=True, fact_pool=args.fact_pool)
        after = await overhead_histogram(probe, memlane.url)
        grown_after = await counters(probe, memlane.url, GROWTH_COUNTERS)
        store_after = await store_memory_mib(probe, memlane.url)
    stop.set()
    await sampler
    direct_after = await closed_loop(direct, args.concurrency, baseline_s, proxied=False)

    rss = [v for _, v in samples[measured_from:]]
    direct_lat = direct_before.latencies + direct_after.latencies
    e2e, base = stats(load.latencies), stats(direct_lat)
    return {
        "minutes": args.minutes, "concurrency": args.concurrency, "embedder": args.embedder,
        "fact_pool": args.fact_pool, "memlane_env": args.memlane_env,
        "added": {name.removeprefix("memlane_"): int(grown_after[name] - grown_before[name])
                  for name in GROWTH_COUNTERS},
        "requests": load.requests, "requests_per_s": round(load.requests / measured_s, 1),
        "errors": dict(load.errors), "warmup_errors": dict(warm.errors),
        "direct_errors": dict(direct_before.errors + direct_after.errors),
        "memory_headers": dict(load.memory),
        "overhead_s": overhead_summary(before, after),
        "overhead_top_bucket_s": max((le for le in after if 0 < le < float("inf")), default=None),
        "e2e_s": e2e, "direct_s": base,
        "added_client_p50_s": e2e["p50"] - base["p50"] if e2e.get("n") and base.get("n") else None,
        "added_client_p99_s": e2e["p99"] - base["p99"] if e2e.get("n") and base.get("n") else None,
        "rss_mib": {"samples": len(rss), "first": rss[0] if rss else None, "last": rss[-1] if rss else None,
                    "min": min(rss, default=None), "max": max(rss, default=None), "drift": drift(rss)},
        "rss_series": [(round(t, 1), round(v, 1)) for t, v in samples],
        "store_mib": {"before": store_before, "after": store_after},
        "loadavg_end": os.getloadavg(), "cpus": os.cpu_count(), "python": platform.python_version(),
    }


def report(r: dict) -> str:
    ms = lambda s: f"{s * 1000:.2f} ms" if isinstance(s, float) else "n/a"
    o, rss, top = r["overhead_s"], r["rss_mib"], r["overhead_top_bucket_s"]

    def bucketed(q: float | None) -> str:  # past the histogram's last bucket, only a bound is known
        return f">= {ms(top)} (past the last bucket)" if q is not None and top and q >= top else ms(q)

    drift_text = f"{rss['drift'] * 100:+.1f}%" if rss["drift"] is not None else "n/a"
    facts = f"restated from a pool of {r['fact_pool']}" if r["fact_pool"] else "every one new"
    lines = [
        f"load: {r['minutes']} min at c={r['concurrency']} (embedder {r['embedder']}): {r['requests']} requests, "
        f"{r['requests_per_s']} req/s; facts: {facts}; memlane environment {r['memlane_env'] or 'as shipped'}",
        f"added while measured: {r['added']['memories_extracted']} memories, "
        f"{r['added']['log_rows_written']} teacher-log rows",
        f"errors: {sum(r['errors'].values())} {r['errors'] or ''}",
        f"added latency (memlane_overhead_seconds): p50 {bucketed(o.get('p50'))}, p99 {bucketed(o.get('p99'))}, "
        f"mean {ms(o.get('mean'))} over {o.get('count', 0)} requests",
        f"end to end through memlane: p50 {ms(r['e2e_s'].get('p50'))}, p99 {ms(r['e2e_s'].get('p99'))}; "
        f"direct: p50 {ms(r['direct_s'].get('p50'))}, p99 {ms(r['direct_s'].get('p99'))}; "
        f"difference p50 {ms(r['added_client_p50_s'])}, p99 {ms(r['added_client_p99_s'])}",
        f"RSS: {rss['first']:.0f} -> {rss['last']:.0f} MiB (min {rss['min']:.0f}, max {rss['max']:.0f}, "
        f"{rss['samples']} samples), drift {drift_text} (target < 10%)" if rss["samples"] else "RSS: no samples",
        f"DuckDB's own count (memlane_store_memory_bytes): {_tags(r['store_mib']['before'])} -> "
        f"{_tags(r['store_mib']['after'])}",
        f"memory headers: {r['memory_headers']}; load average at the end {r['loadavg_end'][0]:.1f} "
        f"on {r['cpus']} CPUs",
    ]
    return "\n".join(lines)


def _tags(held: dict[str, float]) -> str:
    parts = ", ".join(f"{tag} {mib:.0f}" for tag, mib in sorted(held.items(), key=lambda kv: -kv[1]) if mib >= 1)
    return f"{sum(held.values()):.0f} MiB ({parts})" if held else "n/a"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_load", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--warmup-s", type=float, default=60.0, help="load before measuring (at most a quarter of the run)")
    p.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling period")
    p.add_argument("--embedder", choices=("minilm", "hash"), default="minilm")
    p.add_argument("--fact-pool", type=int, default=0,
                   help="restate facts from this many distinct ones (a multiple of 4); 0: every fact is new")
    p.add_argument("--memlane-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for memlane, to try a setting (e.g. MEMLANE_MEMORY_VIEW_ROWS=0); repeatable")
    p.add_argument("--ready-timeout", type=float, default=180)
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    try:
        args.memlane_env = dict(item.split("=", 1) for item in args.memlane_env)
    except ValueError:
        p.error("--memlane-env takes KEY=VALUE")
    if args.fact_pool % 4:
        p.error("--fact-pool must be a multiple of 4 (each fact's text repeats with its number)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="memlane-bench-load-") as tmp:
        with upstream_process(Path(tmp)) as upstream:
            with memlane_process(Path(tmp), upstream, memory=True, ready_timeout=args.ready_timeout,
                                 extra_env={"MEMLANE_EMBEDDER": args.embedder, **args.memlane_env}) as memlane:
                results = asyncio.run(run(args, upstream, memlane))
                crash = memlane.crash()
    results["crashed"] = crash
    print(report(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"Results written to {args.out}")


if __name__ == "__main__":
    main()
