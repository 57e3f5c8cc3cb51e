"""How much latency memlane adds in front of an OpenAI-compatible upstream.

Not a test: run it from the repository root and read the figures it prints.

    python -m tests.benchmarks.bench_latency --out bench-latency.json
    python -m tests.benchmarks.bench_latency --quick

Three processes share the machine: the fake upstream (``tests/e2e/fake_upstream.py``, answering
instantly), memlane (``python -m proxy.cli serve``) in front of it, and this load generator (one
asyncio loop, ``httpx.AsyncClient``, closed loop with ``c`` workers). At each concurrency it runs
interleaved rounds: ``n`` requests straight to the upstream, then ``n`` through memlane, and so on,
after warm-up rounds that are discarded. Interleaving keeps slow drift of the machine (other
processes, CPU frequency, the learner writing its log) out of the difference.

Two settings: memory off (``MEMLANE_MEMORY=false``) and memory on with 10,000 memories for the
one user every request belongs to (open mode: user "default"), the worst case for per-user search.
Every user message is a different question, so nothing is cached and the extractor adds nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from tests.benchmarks import plots
from tests.benchmarks.ablate.sitecustomize import PARTS as ABLATABLE
from tests.benchmarks.progress import counting, track
from tests.e2e.fake_upstream import free_port

ROOT = Path(__file__).resolve().parents[2]
ABLATE_DIR = Path(__file__).resolve().parent / "ablate"  # put on memlane's PYTHONPATH by --without
MODEL = "gpt-4o-mini"
CONCURRENCY = (1, 16, 64)

# Targets from the issue, in seconds.
OFF_C1_ADDED_P50 = 0.0015
OFF_C1_ADDED_P99 = 0.004
OFF_C64_ADDED_P99 = 0.050
MEMORY_COST_P99 = 0.020


# -- what the requests and memories say ---------------------------------------------------

QUESTIONS = (
    "What is a good recipe for a quick weeknight dinner?",
    "How do tides work?",
    "Can you explain the difference between TCP and UDP?",
    "Which book would you recommend for learning statistics?",
    "How should I structure a cover letter?",
    "What are the main causes of inflation?",
    "How do I sort a list of dictionaries by a key in Python?",
    "Why is the sky blue?",
    "What should I pack for a three-day hiking trip?",
    "How does a heat pump work in winter?",
    "What is the capital of Australia, and why was it chosen?",
    "Could you summarise the plot of Hamlet in two sentences?",
    "How long should I boil an egg for a soft yolk?",
    "What are good stretches after a long run?",
    "How do I center a div with CSS grid?",
    "Which houseplants survive in low light?",
)

_FOODS = ("peanuts", "shellfish", "gluten", "lactose", "sesame", "kiwi", "eggs", "soy", "mustard", "celery",
          "strawberries", "walnuts", "sushi", "spicy curry", "dark chocolate", "olives", "mushrooms",
          "blue cheese", "avocado", "pineapple pizza", "oat porridge", "ramen", "falafel", "tacos")
_CITIES = ("Lisbon", "Berlin", "Osaka", "Toronto", "Nairobi", "Lima", "Oslo", "Melbourne", "Austin", "Seoul",
           "Krakow", "Montreal", "Cape Town", "Porto", "Edinburgh", "Hanoi", "Bogota", "Reykjavik", "Tbilisi",
           "Valencia", "Denver", "Manila", "Zurich", "Accra")
_JOBS = ("a nurse", "a data engineer", "a primary school teacher", "a carpenter", "an architect", "a pilot",
         "a pharmacist", "a journalist", "a civil engineer", "a barista", "a veterinarian", "a translator",
         "a paramedic", "a game designer", "a tax accountant", "a marine biologist", "a sound engineer")
_PETS = ("dog", "cat", "parrot", "rabbit", "tortoise", "hamster", "goldfish", "ferret", "horse", "iguana")
_NAMES = ("Biscuit", "Luna", "Pepper", "Milo", "Nala", "Oscar", "Ziggy", "Juniper", "Maple", "Rocket", "Olive",
          "Clementine", "Dotty", "Pickle", "Sage", "Waffles", "Ada", "Tomas", "Ingrid", "Kofi", "Priya", "Mateo")
_INSTRUMENTS = ("piano", "cello", "violin", "drums", "bass guitar", "ukulele", "saxophone", "trumpet", "harp",
                "flute", "accordion", "banjo")
_OFTEN = ("every morning", "on weekends", "twice a week", "in a community band", "badly but happily",
          "since childhood", "at a jazz club on Fridays")
_LANGUAGES = ("Spanish", "Japanese", "Portuguese", "German", "Swahili", "Korean", "Italian", "Polish", "Arabic",
              "Dutch", "Turkish", "Vietnamese", "Greek", "Hindi")
_LEVELS = ("fluently", "at a beginner level", "at home with family", "for work", "a little")
_YEARS = tuple(str(y) for y in range(1995, 2025))
_DRINKS = ("green tea", "espresso", "oat milk lattes", "sparkling water", "black coffee", "chai", "kombucha",
           "hot chocolate", "rooibos tea", "orange juice")
_COLORS = ("red", "silver", "dark green", "white", "navy blue", "yellow", "black", "orange")
_CARS = ("hatchback", "pickup truck", "electric scooter", "station wagon", "vintage Beetle", "minivan", "motorbike")
_TOOLS = ("Neovim", "VS Code", "Emacs", "PyCharm", "Sublime Text", "Helix", "IntelliJ")
_CODE = ("Python", "Rust", "Go", "TypeScript", "Haskell", "C++", "Kotlin", "Elixir", "SQL")
_THINGS = ("colour", "film", "season", "board game", "band", "podcast", "hiking trail", "museum", "cuisine",
           "novel", "sport", "flower")
_VALUES = ("teal", "Spirited Away", "autumn", "Catan", "Radiohead", "a history podcast", "the West Highland Way",
           "the Prado", "Ethiopian food", "Middlemarch", "rock climbing", "sunflowers", "Dune", "winter",
           "chess", "Fleetwood Mac", "Thai food", "the Louvre", "tulips", "badminton")
_RELATIVES = ("sister", "brother", "mother", "father", "partner", "best friend", "daughter", "son", "grandmother")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_EVENTS = ("marathon", "half marathon", "triathlon", "10k race", "cycling sportive", "swim across the lake")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

_TEMPLATES = (
    ("The user is allergic to {}.", (_FOODS,)),
    ("The user loves {} and orders it whenever possible.", (_FOODS,)),
    ("The user dislikes {}.", (_FOODS,)),
    ("The user lives in {} with a {} named {}.", (_CITIES, _PETS, _NAMES)),
    ("The user grew up in {} and moved to {} in {}.", (_CITIES, _CITIES, _YEARS)),
    ("The user works as {} in {}.", (_JOBS, _CITIES)),
    ("The user plays the {} {}.", (_INSTRUMENTS, _OFTEN)),
    ("The user speaks {} {} and is learning {}.", (_LANGUAGES, _LEVELS, _LANGUAGES)),
    ("The user visited {} in {} and wants to go back.", (_CITIES, _YEARS)),
    ("The user prefers {} over {}.", (_DRINKS, _DRINKS)),
    ("The user drives a {} {}.", (_COLORS, _CARS)),
    ("The user writes {} in {} at work.", (_CODE, _TOOLS)),
    ("The user's favourite {} is {}.", (_THINGS, _VALUES)),
    ("The user's {} is called {} and lives in {}.", (_RELATIVES, _NAMES, _CITIES)),
    ("The user's birthday is in {}, and their {}'s is in {}.", (_MONTHS, _RELATIVES, _MONTHS)),
    ("The user is training for a {} in {}.", (_EVENTS, _MONTHS)),
    ("The user goes running every {} before work.", (_DAYS,)),
    ("The user started learning the {} in {}.", (_INSTRUMENTS, _YEARS)),
)


def make_memories(n: int, seed: int) -> list[str]:
    """``n`` distinct first-person facts, the same for the same seed."""
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    while len(seen) < n:
        template, slots = rng.choice(_TEMPLATES)
        seen.setdefault(template.format(*(rng.choice(s) for s in slots)), None)
    return list(seen)


def build_memory_db(path: str, n: int, seed: int, batch: int = 512) -> None:
    """Create the store at ``path`` holding ``n`` memories of user "default" (run in a child process)."""
    from memory import MemoryStore, MiniLMEmbedder

    contents = make_memories(n, seed)
    emb = MiniLMEmbedder()
    started = time.perf_counter()
    starts = track(range(0, n, batch), f"  embedding {n} memories", total=-(-n // batch))
    vectors = np.concatenate([emb.embed(contents[i:i + batch]) for i in starts])  # (n, 384)
    embedded = time.perf_counter()
    store = MemoryStore.open(path, embedder=emb)
    try:
        added = store.bulk_add("default", contents, vectors, source="bench")
    finally:
        store.close()
    print(f"  memories: embedded {n} in {embedded - started:.1f} s, stored {added} "
          f"(HNSW index included) in {time.perf_counter() - embedded:.1f} s", flush=True)


# -- the processes -------------------------------------------------------------------------

def _wait_until(check, what: str, process: subprocess.Popen, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log else ""
            raise RuntimeError(f"{what} exited with {process.returncode}\n{tail}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s")


def _stop(process: subprocess.Popen, timeout: float = 60) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def upstream_process(tmp: Path) -> Iterator[str]:
    """The fake upstream in its own process; yields its base URL."""
    port = free_port()
    log = tmp / "upstream.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.fake_upstream", "--port", str(port)],
        cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_until(lambda: httpx.post(f"{base}/chat/completions", json=_body("ping"), timeout=2).status_code == 200,
                    "fake upstream", process, 30, log)
        yield base
    finally:
        _stop(process)


@dataclass
class Memlane:
    url: str
    process: subprocess.Popen
    log: Path

    def crash(self) -> dict | None:
        """None while it runs; else its exit code and the start of the fault handler's report."""
        if self.process.poll() is None:
            return None
        text = self.log.read_text(errors="replace")
        at = text.find("Fatal Python error")
        report = text[at:] if at >= 0 else text[-3000:]
        report = report.split("\nExtension modules:")[0]
        return {"returncode": self.process.returncode, "report": report[:4000]}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, all its threads; None where /proc is not there."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


@contextlib.contextmanager
def memlane_process(tmp: Path, upstream: str, *, memory: bool, ready_timeout: float,
                    extra_env: dict[str, str]) -> Iterator[Memlane]:
    """memlane in front of ``upstream``. Stopped with SIGTERM.

    PYTHONFAULTHANDLER is on so that a crash leaves the Python stack of every thread in its log.
    """
    port = free_port()
    config = tmp / "memlane.toml"
    config.write_text(
        "memory_min_score = 0.0\n"
        "[[routes]]\n"
        'match = "gpt-*"\nprovider = "openai"\n'
        f'api_base = "{upstream}"\napi_key_env = "OPENAI_API_KEY"\nmodels = ["{MODEL}"]\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMLANE_", "OPENAI_", "ANTHROPIC_", "OLLAMA_"))}
    env.update({"OPENAI_API_KEY": "sk-bench", "HF_HUB_OFFLINE": "1", "MEMLANE_PRELOAD_LOCAL_MODEL": "false",
                "MEMLANE_LOG_LEVEL": "warning", "MEMLANE_MEMORY": "true" if memory else "false",
                "PYTHONFAULTHANDLER": "1", **extra_env})
    log = tmp / "memlane.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port),
         "--db", str(tmp / "memlane.duckdb"), "--config", str(config)],
        cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.perf_counter()
        _wait_until(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200,
                    "memlane", process, ready_timeout, log)
        print(f"  memlane ready in {time.perf_counter() - started:.1f} s", flush=True)
        yield Memlane(url, process, log)
    finally:
        _stop(process)


# -- load ------------------------------------------------------------------------------------

def _body(content: str) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}]}


@dataclass
class Round:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests only
    errors: Counter = field(default_factory=Counter)
    memory: Counter = field(default_factory=Counter)  # x-memlane-memory values
    injected: int = 0  # sum of x-memlane-memories
    wall_s: float = 0.0


class Load:
    """Closed-loop load: each worker sends its next request as soon as its last one returns.

    Every worker has its own ``httpx.AsyncClient`` (one keep-alive connection per target). One
    client shared by 64 workers spends more CPU in its connection pool than the requests cost:
    measured here, the fake upstream alone went from ~650 requests/s at c=1 to ~340 at c=64 with
    a p99 over 2 s; with a client per worker it holds ~750 requests/s and a p99 near 100 ms.
    """

    def __init__(self) -> None:
        self.counter = itertools.count()
        self.clients: list[httpx.AsyncClient] = []

    def _client(self, worker: int) -> httpx.AsyncClient:
        while len(self.clients) <= worker:
            limits = httpx.Limits(max_connections=4, max_keepalive_connections=4, keepalive_expiry=120)
            self.clients.append(httpx.AsyncClient(limits=limits, timeout=120, trust_env=False,
                                                  headers={"authorization": "Bearer sk-bench"}))
        return self.clients[worker]

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()

    async def round(self, url: str, n: int, concurrency: int) -> Round:
        """``n`` requests to ``url`` from ``concurrency`` workers."""
        result = Round()
        left = iter(range(n))

        async def worker(client: httpx.AsyncClient) -> None:
            for _ in left:
                i = next(self.counter)
                body = _body(f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})")
                t = time.perf_counter()
                try:
                    response = await client.post(url, json=body)
                except httpx.HTTPError as exc:
                    result.errors[type(exc).__name__] += 1
                    continue
                elapsed = time.perf_counter() - t
                if response.status_code != 200:
                    result.errors[str(response.status_code)] += 1
                    continue
                result.latencies.append(elapsed)
                if "x-memlane-memory" in response.headers:
                    result.memory[response.headers["x-memlane-memory"]] += 1
                    result.injected += int(response.headers.get("x-memlane-memories", "0"))

        started = time.perf_counter()
        await asyncio.gather(*(worker(self._client(w)) for w in range(concurrency)))
        result.wall_s = time.perf_counter() - started
        return result


def stats(latencies: list[float]) -> dict:
    a = np.asarray(latencies)
    if a.size == 0:
        return {"n": 0}
    p50, p90, p99, p999 = np.percentile(a, [50, 90, 99, 99.9])
    return {"n": int(a.size), "mean": float(a.mean()), "p50": float(p50), "p90": float(p90),
            "p99": float(p99), "p99.9": float(p999), "max": float(a.max())}


# -- the proxy's own view: memlane_overhead_seconds -------------------------------------------

async def overhead_histogram(client: httpx.AsyncClient, url: str) -> dict[float, float]:
    """Cumulative bucket counts of ``memlane_overhead_seconds``, summed over labels; -1 holds the sum."""
    text = (await client.get(f"{url}/metrics")).text
    buckets: Counter = Counter()
    for family in text_string_to_metric_families(text):
        if family.name != "memlane_overhead_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                buckets[float(sample.labels["le"])] += sample.value
            elif sample.name.endswith("_sum"):
                buckets[-1.0] += sample.value
    return dict(buckets)


def overhead_summary(before: dict[float, float], after: dict[float, float]) -> dict:
    """Count, mean and bucket-interpolated quantiles of the observations between two scrapes."""
    delta = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in after}
    total = delta.pop(-1.0, 0.0)
    bounds = sorted(delta)
    count = delta[bounds[-1]] if bounds else 0.0
    if count <= 0:
        return {"count": 0}

    def quantile(q: float) -> float:
        rank, lower, below = q * count, 0.0, 0.0
        for le in bounds:
            if delta[le] >= rank:
                if le == float("inf"):
                    return lower
                return lower + (le - lower) * (rank - below) / max(delta[le] - below, 1e-12)
            lower, below = le, delta[le]
        return lower

    return {"count": int(count), "mean": total / count, "p50": quantile(0.5), "p99": quantile(0.99)}


# -- one setting: interleaved rounds at each concurrency --------------------------------------

@dataclass(frozen=True)
class Plan:
    concurrency: tuple[int, ...]
    round_size: dict[int, int]
    rounds: int  # measured rounds per side, at most
    warmup_rounds: int
    min_rounds: int  # measured rounds per side, at least, whatever the budget
    budget_s: float  # no new round starts once a concurrency level has run this long


class MemlaneCrashed(Exception):
    def __init__(self, crash: dict) -> None:
        super().__init__(f"memlane exited with {crash['returncode']}")
        self.crash = crash


async def measure_setting(plan: Plan, upstream: str, memlane: Memlane) -> dict:
    """Interleaved rounds at each concurrency. If memlane dies, the setting ends there and says so."""
    out: dict = {}
    async with contextlib.AsyncExitStack() as stack:
        load = Load()
        stack.push_async_callback(load.aclose)
        client = await stack.enter_async_context(httpx.AsyncClient(timeout=30, trust_env=False))  # /metrics
        targets = {"direct": f"{upstream}/chat/completions", "proxied": f"{memlane.url}/v1/chat/completions"}

        async def one(name: str, n: int, c: int) -> Round:
            result = await load.round(targets[name], n, c)
            crash = memlane.crash()
            if crash is not None:
                raise MemlaneCrashed(crash)
            return result

        for c in plan.concurrency:
            n = plan.round_size[c]
            started, load_before = time.perf_counter(), os.getloadavg()[0]
            try:
                with counting(f"  c={c} rounds", plan.warmup_rounds + plan.rounds) as advance:
                    for _ in range(plan.warmup_rounds):
                        for name in targets:
                            await one(name, n, c)
                        advance()
                    before = await overhead_histogram(client, memlane.url)
                    cpu_before = cpu_seconds(memlane.process.pid)
                    rounds: dict[str, list[Round]] = {"direct": [], "proxied": []}
                    for i in range(plan.rounds):
                        if i >= plan.min_rounds and time.perf_counter() - started > plan.budget_s:
                            break
                        for name in targets:
                            rounds[name].append(await one(name, n, c))
                        advance()
                after = await overhead_histogram(client, memlane.url)
                cpu_after = cpu_seconds(memlane.process.pid)
            except MemlaneCrashed as exc:
                for level in plan.concurrency[plan.concurrency.index(c):]:  # this level and those not run
                    out[level] = {"crashed": {**exc.crash, "at": c}}
                print(f"  c={c:<3} memlane CRASHED (exit code {exc.crash['returncode']}); "
                      f"skipping the rest of this setting", flush=True)
                break
            out[c] = summarise(rounds, overhead_summary(before, after))
            if cpu_before is not None and cpu_after is not None:
                # All memlane's CPU during the measured rounds (its learner included) per proxied request.
                out[c]["memlane_cpu_per_request"] = (cpu_after - cpu_before) / max(out[c]["proxied"]["n"], 1)
            out[c]["loadavg_1m"] = [load_before, os.getloadavg()[0]]
            out[c]["elapsed_s"] = time.perf_counter() - started
            r = out[c]
            print(f"  c={c:<3} {len(rounds['proxied'])} x {n} each: direct p50 {ms(r['direct']['p50'])} "
                  f"p99 {ms(r['direct']['p99'])} | proxied p50 {ms(r['proxied']['p50'])} "
                  f"p99 {ms(r['proxied']['p99'])} ms ({r['elapsed_s']:.0f} s, "
                  f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f})", flush=True)
    return out


def summarise(rounds: dict[str, list[Round]], overhead: dict) -> dict:
    result: dict = {}
    for name, rs in rounds.items():
        latencies = [x for r in rs for x in r.latencies]
        errors = dict(sum((r.errors for r in rs), Counter()))
        if not latencies:
            raise RuntimeError(f"no {name} request succeeded: {errors}")
        s = stats(latencies)
        s["errors"] = errors
        s["rps"] = sum(len(r.latencies) for r in rs) / sum(r.wall_s for r in rs)
        result[name] = s
    result["added_p50"] = result["proxied"]["p50"] - result["direct"]["p50"]
    result["added_p99"] = result["proxied"]["p99"] - result["direct"]["p99"]
    per_round = [float(np.median(p.latencies) - np.median(d.latencies))
                 for d, p in zip(rounds["direct"], rounds["proxied"]) if d.latencies and p.latencies]
    result["added_p50_per_round"] = {"median": float(np.median(per_round)), "min": min(per_round),
                                     "max": max(per_round)}
    result["p50_ratio"] = result["proxied"]["p50"] / result["direct"]["p50"]
    result["p99_ratio"] = result["proxied"]["p99"] / result["direct"]["p99"]
    proxied = rounds["proxied"]
    result["memory_header"] = dict(sum((r.memory for r in proxied), Counter()))
    answered = sum(len(r.latencies) for r in proxied)
    result["memories_injected_mean"] = sum(r.injected for r in proxied) / answered if answered else 0.0
    result["overhead_metric"] = overhead
    return result


# -- report -----------------------------------------------------------------------------------

def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def markdown(results: dict) -> str:
    lines = [
        "| memory | c | requests (each side) | direct p50 | direct p99 | proxied p50 | proxied p99 "
        "| added p50 | added p99 | p50 ratio | memlane CPU / request | memlane_overhead_seconds mean / p50~ / p99~ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for setting, by_c in results["settings"].items():
        for c, r in by_c.items():
            if "crashed" in r:
                crash = r["crashed"]
                lines.append(f"| {setting} | {c} | memlane crashed at c={crash['at']} (exit code "
                             f"{crash['returncode']}) | - | - | - | - | - | - | - | - | - |")
                continue
            o = r["overhead_metric"]
            metric = f"{ms(o['mean'])} / {ms(o['p50'])} / {ms(o['p99'])}" if o.get("count") else "-"
            lines.append(
                f"| {setting} | {c} | {r['proxied']['n']} | {ms(r['direct']['p50'])} | {ms(r['direct']['p99'])} "
                f"| {ms(r['proxied']['p50'])} | {ms(r['proxied']['p99'])} | **{ms(r['added_p50'])}** "
                f"| **{ms(r['added_p99'])}** | {r['p50_ratio']:.2f}x "
                f"| {ms(r['memlane_cpu_per_request']) if 'memlane_cpu_per_request' in r else '-'} | {metric} |"
            )
    lines.append("")
    lines.append("All times in ms. `~`: interpolated within Prometheus buckets.")
    if results.get("memory_cost"):
        lines += ["", "| c | proxied p99, memory off | proxied p99, memory on | memory cost at p99 "
                  "| cost of added p99 | memories injected / request |", "|---:|---:|---:|---:|---:|---:|"]
        for c, m in results["memory_cost"].items():
            lines.append(f"| {c} | {ms(m['off_p99'])} | {ms(m['on_p99'])} | **{ms(m['cost_p99'])}** "
                         f"| {ms(m['cost_added_p99'])} | {m['injected_mean']:.2f} |")
    lines += ["", "Targets:" + (" (a --quick run: too few requests to judge them)" if results["plan"]["quick"] else "")]
    for t in results["targets"]:
        value = "memlane crashed" if t["value"] is None else f"{ms(t['value'])} ms"
        lines.append(f"- {t['target']}: {value}, {verdict(t['met'])}")
    return "\n".join(lines)


def _target(results: dict, text: str, setting: str, c: int, value) -> None:  # type: ignore[no-untyped-def]
    """One line of the targets list; ``value(entry)`` gives seconds, a crash fails it."""
    entry = results["settings"].get(setting, {}).get(c)
    if entry is None:
        return
    if "crashed" in entry:
        results["targets"].append({"target": text, "value": None, "met": False})
        return
    v = value(entry)
    if v is not None:
        results["targets"].append({"target": text, "value": v[0], "met": v[0] <= v[1]})


def compare(results: dict) -> None:
    """Memory cost per concurrency, and the targets of the issue."""
    settings = results["settings"]
    off, on = settings.get("memory off", {}), settings.get("memory on", {})
    results["targets"] = []
    _target(results, "memory off, c=1, added p50 <= 1.5 ms", "memory off", 1,
            lambda r: (r["added_p50"], OFF_C1_ADDED_P50))
    _target(results, "memory off, c=1, added p99 <= 4 ms", "memory off", 1,
            lambda r: (r["added_p99"], OFF_C1_ADDED_P99))
    _target(results, "memory off, c=64, added p99 <= 50 ms", "memory off", 64,
            lambda r: (r["added_p99"], OFF_C64_ADDED_P99))
    results["memory_cost"] = {}
    for c in on:
        base = off.get(c)
        if base is None or "crashed" in base:
            continue
        if "crashed" not in on[c]:
            results["memory_cost"][c] = {
                "off_p99": base["proxied"]["p99"], "on_p99": on[c]["proxied"]["p99"],
                "cost_p99": on[c]["proxied"]["p99"] - base["proxied"]["p99"],
                "cost_added_p99": on[c]["added_p99"] - base["added_p99"],
                "injected_mean": on[c]["memories_injected_mean"],
            }
        cost = results["memory_cost"].get(c)
        _target(results, f"memory on, c={c}, p99 cost over memory off <= 20 ms", "memory on", c,
                lambda r, cost=cost: (cost["cost_p99"], MEMORY_COST_P99) if cost else None)


# -- main -------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_latency", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 1,000 memories, 3 small rounds (1-3 minutes); too few requests for the targets")
    p.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    p.add_argument("--round-size", type=int, nargs="+", default=None,
                   help="requests per round at each concurrency, in order (default 100 400 640)")
    p.add_argument("--rounds", type=int, default=None, help="measured rounds per side and concurrency (default 20; 3 with --quick)")
    p.add_argument("--min-rounds", type=int, default=3)
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per setting and concurrency after which no new round starts, once "
                        "--min-rounds are done (default 75; 20 with --quick)")
    p.add_argument("--warmup-rounds", type=int, default=1)
    p.add_argument("--memories", type=int, default=None, help="memories of the benchmark user (default 10000)")
    p.add_argument("--settings", nargs="+", choices=("off", "on"), default=["off", "on"])
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                   help="event loop of the load generator (uvloop when installed)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="keep the built memory database here and reuse it on later runs with the same "
                        "--memories and --seed (embedding 10,000 memories takes ~30 s on an idle 2-core machine)")
    p.add_argument("--memlane-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for memlane, to try a setting (e.g. MEMLANE_TORCH_THREADS=2); repeatable")
    p.add_argument("--without", choices=ABLATABLE, default=None, metavar="PART",
                   help="take one part of memlane's background work away (a no-op inside the server, "
                        f"tests/benchmarks/ablate): {', '.join(ABLATABLE)}; compare against a run without this")
    p.add_argument("--ready-timeout", type=float, default=180)
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--plot", type=Path, default=None, metavar="DIR",
                   help="also draw latency against concurrency as DIR/bench-latency.png")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    quick = args.quick
    args.round_size = args.round_size or ([50, 160, 320] if quick else [100, 400, 640])
    args.rounds = args.rounds or (3 if quick else 20)
    args.budget = args.budget if args.budget is not None else (20.0 if quick else 75.0)
    args.min_rounds = min(args.min_rounds, args.rounds)
    args.memories = args.memories if args.memories is not None else (1000 if quick else 10_000)
    try:
        args.memlane_env = dict(item.split("=", 1) for item in args.memlane_env)
    except ValueError:
        p.error("--memlane-env takes KEY=VALUE")
    if len(args.round_size) != len(args.concurrency):
        p.error("--round-size needs one value per --concurrency")
    if args.without:
        if "PYTHONPATH" in args.memlane_env:
            p.error("--without sets memlane's PYTHONPATH; drop PYTHONPATH from --memlane-env")
        args.memlane_env |= {"PYTHONPATH": str(ABLATE_DIR), "MEMLANE_BENCH_WITHOUT": args.without}
    return args


def code_version() -> dict:
    """The commit measured, and which of memlane's own files differ from it (read-only git calls)."""
    def git(*cmd: str) -> str | None:
        try:
            done = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    changed = git("status", "--porcelain", "--", "proxy", "memory", "learner", "adapters")
    return {"commit": git("rev-parse", "HEAD"), "uncommitted": changed.splitlines() if changed else []}


def run(args: argparse.Namespace) -> dict:
    plan = Plan(tuple(args.concurrency), dict(zip(args.concurrency, args.round_size)), args.rounds,
                args.warmup_rounds, args.min_rounds, args.budget)
    results: dict = {
        "command": " ".join(["python -m tests.benchmarks.bench_latency", *args.argv]),
        "code": code_version(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "loadavg_at_start": os.getloadavg()},
        "plan": {"concurrency": list(plan.concurrency), "round_size": plan.round_size, "rounds": plan.rounds,
                 "warmup_rounds": plan.warmup_rounds, "min_rounds": plan.min_rounds, "budget_s": plan.budget_s,
                 "memories": args.memories, "seed": args.seed,
                 "memlane_env": args.memlane_env, "without": args.without, "quick": args.quick,
                 "load_loop": args.loop},
        "settings": {},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="memlane-bench-") as name:
        tmp = Path(name)
        with upstream_process(tmp) as upstream:
            for setting in args.settings:
                memory = setting == "on"
                label = "memory on" if memory else "memory off"
                print(f"{label}:", flush=True)
                work = tmp / setting
                work.mkdir()
                if memory and args.memories:
                    memory_db(work / "memlane.duckdb", args.memories, args.seed, args.cache_dir)
                with memlane_process(work, upstream, memory=memory, ready_timeout=args.ready_timeout,
                                     extra_env=args.memlane_env) as memlane:
                    results["settings"][label] = _loop_run(args.loop, measure_setting(plan, upstream, memlane))
    results["elapsed_s"] = time.perf_counter() - started
    if code_version() != results["code"]:
        results["code"]["changed_during_run"] = True  # memlane was restarted per setting: say so
    compare(results)
    return results


def memory_db(path: Path, n: int, seed: int, cache_dir: Path | None) -> None:
    """Build the memory database at ``path`` in a child process (torch stays out of the load generator)."""
    cached = cache_dir / f"memories-{n}-seed{seed}.duckdb" if cache_dir else None
    if cached is not None and cached.exists():
        shutil.copyfile(cached, path)
        print(f"  memories: reusing {cached}", flush=True)
        return
    child = multiprocessing.get_context("spawn").Process(target=build_memory_db, args=(str(path), n, seed))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"building the memory database failed (exit code {child.exitcode})")
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, cached)


def _loop_run(loop: str, coro):  # type: ignore[no-untyped-def]
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            return asyncio.run(coro)
        return uvloop.run(coro)
    return asyncio.run(coro)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = run(args)
    print()
    print(markdown(results))
    for setting, by_c in results["settings"].items():
        for c, r in by_c.items():
            if "crashed" in r and r["crashed"]["at"] == c:
                print(f"\nmemlane crashed ({setting}, c={c}):\n{r['crashed']['report'][:2500]}")
    code = results["code"]
    print(f"\nCommand: {results['command']}\nCommit: {code['commit']}"
          + (f" with uncommitted changes: {', '.join(code['uncommitted'])}" if code["uncommitted"] else "")
          + (" (the code changed during the run)" if code.get("changed_during_run") else "")
          + f"\nElapsed: {results['elapsed_s']:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"Results written to {args.out}")
    if args.plot:
        print(f"Figure written to {plots.latency(results, args.plot)}")


if __name__ == "__main__":
    main()
