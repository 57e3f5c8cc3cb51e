"""Dream agents (seed 001, module 5): four maintenance steps run while the user is idle.

Each step is a plain function taking its dependencies, with one objective it logs as a
structlog event carrying before/after figures, and a report dataclass:

- `consolidate` (`dream_consolidation`): fewer near-duplicate current memories, more weight on
  the ones retrieval keeps using. Current memories at cosine >= `merge_cosine` with the same
  polarity, numbers and content words (in order) merge into the strongest one (its corroborations, accesses
  and sources add up; the others become history tagged `merged`). Memories served into
  requests `used_min` times or more gain importance on a log scale of their access count.
- `forget` (`dream_forgetting`): fewer memories nobody needs. Recency decays (the tier policy's
  half-life); merged duplicates are deleted after `merged_retention`; memories never retrieved,
  not validated, not persistent, older than `min_age` and with confidence x recency under
  `irrelevant_below` are deleted.
- `preload` (`dream_preloading`): a faster next request in the user's frequent domains. For
  each of the user's top domains (by `memory.domains` activations) the best memories are
  ranked and cached as the context to inject (`PreloadCache`); the step measures the cold path
  (embed + hybrid search) against a cache lookup for each domain. The server's learner runs
  it (`Preloader`) and its request path reads the cache (`proxy.recall`).
- `optimize` (`dream_optimization`): a compact, freshly indexed store: HNSW rebuilt without
  tombstones, the WAL checkpointed into the file, the BM25 index rebuilt; file sizes and a
  probe search's latency before and after.

`dream` runs the four in that order. `consolidate(store, user_id, *, clock)` is also the
consolidation hook of the learning runs (`learner.triggers`).
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import structlog

from memory import Clock, Link, MemoryEntry, MemoryStore, Tier, infer_domains

__all__ = [
    "ConsolidationReport",
    "DreamReport",
    "ForgettingReport",
    "OptimizationReport",
    "PreloadCache",
    "PreloadReport",
    "PreloadedContext",
    "PreloadedMemory",
    "Preloader",
    "consolidate",
    "dream",
    "forget",
    "optimize",
    "preload",
]

log = structlog.get_logger("memlane.dream")

_NEGATION_RE = re.compile(r"\b(?:not|never|no|none|nothing|nobody|neither|nor)\b|n't\b", re.IGNORECASE)
_NUMBER_RE = re.compile(
    r"\d+(?:[.,]\d+)?|\b(?:zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|"
    r"twenty|thirty|forty|fifty|hundred|thousand|first|second|third)\b", re.IGNORECASE,
)
_WORD_RE = re.compile(r"[a-z0-9]+")
# Words whose presence does not change a fact: articles, the subject, copulas, intensifiers.
_FILLER = frozenset(
    "a an the user user's users s i i'm my me is are am was were be been has have had do does did "
    "really very also still now currently usually just quite so truly definitely always actually "
    "and to of".split()
)
_TIER_RANK = {Tier.SHORT_TERM: 0, Tier.LONG_TERM: 1, Tier.PERSISTENT: 2}
_BLOCK = 1024  # rows of the similarity matrix computed at once


# -- consolidation ----------------------------------------------------------------------


@dataclass(slots=True)
class ConsolidationReport:
    memories_before: int = 0  # current memories
    memories_after: int = 0
    merged: int = 0  # memories folded into another
    groups: int = 0  # survivors that absorbed at least one
    strengthened: int = 0
    used_importance_before: float = 0.0  # mean importance of the used memories
    used_importance_after: float = 0.0


def _signature(content: str) -> tuple[bool, tuple[str, ...], tuple[str, ...]]:
    """What must agree for two sentences to be the same fact: polarity, numbers and the content
    words in order. Cosine alone merges different facts: MiniLM puts "The user's birthday is in
    February, and their sister's is in February." at 0.953 to the same sentence with November
    (1,091 pairs of 2,000 distinct template facts score 0.95 or more), and "prefers chai over
    hot chocolate" next to its reverse. Only articles, the subject and intensifiers may differ."""
    negated = len(_NEGATION_RE.findall(content)) % 2 == 1
    numbers = tuple(sorted(n.lower() for n in _NUMBER_RE.findall(content)))
    words = tuple(w for w in _WORD_RE.findall(content.lower()) if w not in _FILLER)
    return negated, numbers, words


def _strength(entry: MemoryEntry) -> tuple:
    """Who survives a merge: validated, higher tier, surer, more corroborated, used, older."""
    c = entry.confidence
    return (entry.validated, _TIER_RANK[entry.tier], c.overall, c.corroboration_count,
            entry.access_count, -entry.created_at.timestamp(), entry.id)


def _groups(
    store: MemoryStore, user_id: str, merge_cosine: float, fresh: set[str] | None = None,
) -> list[list[MemoryEntry]]:
    """Connected groups of the user's current near-duplicates (single link over the cosine
    graph); with `fresh`, only the edges that touch one of those memories. Only the memories
    at one end of an edge are read as rows: the cosines come from the vectors alone."""
    all_ids, matrix = store.user_vectors(user_id)  # history included
    current = set(store.current_ids(user_id))
    keep = [i for i, memory_id in enumerate(all_ids) if memory_id in current]
    ids, vectors = [all_ids[i] for i in keep], matrix[keep]  # (n, 384), unit rows
    rows = [i for i, memory_id in enumerate(ids) if fresh is None or memory_id in fresh]
    edges: list[tuple[int, int]] = []
    for start in range(0, len(rows), _BLOCK):  # (block, n) at a time: bounded memory
        block = rows[start:start + _BLOCK]
        similar = vectors[block] @ vectors.T  # (b, n)
        edges += [(block[int(b)], int(j)) for b, j in zip(*np.nonzero(similar >= merge_cosine), strict=True)
                  if block[int(b)] != int(j)]
    if not edges:
        return []
    involved = sorted({ids[k] for edge in edges for k in edge})
    entries = {e.id: e for e in store.get_many(user_id, involved, relations=False)}
    signatures = {memory_id: _signature(e.content) for memory_id, e in entries.items()}
    parent = {memory_id: memory_id for memory_id in entries}

    def root(memory_id: str) -> str:
        while parent[memory_id] != memory_id:
            parent[memory_id] = parent[parent[memory_id]]
            memory_id = parent[memory_id]
        return memory_id

    for i, j in edges:
        a, b = ids[i], ids[j]
        if a in entries and b in entries and signatures[a] == signatures[b]:
            parent[root(a)] = root(b)
    clusters: dict[str, list[MemoryEntry]] = {}
    for entry in sorted(entries.values(), key=lambda e: (e.created_at, e.id)):
        clusters.setdefault(root(entry.id), []).append(entry)
    return [group for group in clusters.values() if len(group) > 1]


def _merge(store: MemoryStore, user_id: str, group: list[MemoryEntry], now: datetime) -> int:
    survivor, *others = sorted(group, key=_strength, reverse=True)
    c = survivor.confidence
    doubt = 1 - c.overall
    for other in others:
        doubt *= 1 - other.confidence.overall
    store.update_entry(
        user_id, survivor.id,
        confidence=round(max(c.overall, 1 - doubt), 6),
        corroboration_count=c.corroboration_count + sum(o.confidence.corroboration_count + 1 for o in others),
        access_count=survivor.access_count + sum(o.access_count for o in others),
        importance=max(e.importance for e in group),
        validated=any(e.validated for e in group),
        updated_at=now,
    )
    for other in others:
        store.update_entry(user_id, other.id, valid_to=now, superseded_by=survivor.id, updated_at=now,
                           tags=list(dict.fromkeys([*other.tags, "merged"])))
        for source in store.get(user_id, other.id).sources:  # type: ignore[union-attr]
            store.add_source(user_id, survivor.id, replace(source, kind="consolidation"))
    store.add_links(user_id, [Link(survivor.id, o.id, "supersedes") for o in others])
    return len(others)


def _importance_for(access_count: int) -> float:
    """0.5 at first use, +0.1 per doubling of the access count, at most 0.95."""
    return min(0.95, 0.5 + 0.1 * math.log2(1 + access_count))


def consolidate(
    store: MemoryStore, user_id: str, *, clock: Clock | None = None,
    merge_cosine: float = 0.9, used_min: int = 3, since: datetime | None = None,
) -> ConsolidationReport:
    """Merge the user's near-duplicate memories and strengthen the ones in use. With `since`,
    only memories written or updated since then are compared (with every memory): a
    learning run's cost follows what it learned, not the size of the store."""
    now = (clock or store.clock).now()
    report = ConsolidationReport(memories_before=store.count(user_id, include_history=False))
    fresh = None if since is None else set(store.current_ids(user_id, updated_since=since))
    groups = [] if fresh == set() else _groups(store, user_id, merge_cosine, fresh)
    for group in groups:
        report.merged += _merge(store, user_id, group, now)
        report.groups += 1
    # Only the used memories are read as rows: a run that learned nothing new reads no others.
    used = store.entries_where("user_id = ? AND valid_to IS NULL AND access_count >= ? ORDER BY created_at, id",
                               [user_id, used_min])
    report.used_importance_before = _mean([e.importance for e in used])
    raised = {e.id: round(_importance_for(e.access_count), 6) for e in used
              if _importance_for(e.access_count) > e.importance + 1e-9}
    report.strengthened = len(store.set_importance(user_id, raised))  # one UPDATE; the view is patched
    report.used_importance_after = _mean([max(e.importance, _importance_for(e.access_count)) for e in used])
    report.memories_after = report.memories_before - report.merged
    log.info("dream_consolidation", objective="fewer near-duplicates, stronger used memories",
             memories_before=report.memories_before, memories_after=report.memories_after,
             merged=report.merged, strengthened=report.strengthened,
             used_importance_before=round(report.used_importance_before, 4),
             used_importance_after=round(report.used_importance_after, 4))
    return report


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


# -- forgetting -------------------------------------------------------------------------


@dataclass(slots=True)
class ForgettingReport:
    memories_before: int = 0  # rows, history included
    memories_after: int = 0
    decayed: int = 0
    removed_redundant: int = 0  # merged duplicates past their retention
    removed_irrelevant: int = 0
    mean_recency_before: float = 0.0  # over current memories
    mean_recency_after: float = 0.0


def _recency(entry: MemoryEntry, now: datetime, half_life: timedelta) -> float:
    seen = max(entry.last_accessed or entry.updated_at, entry.updated_at)
    idle = max((now - seen).total_seconds(), 0.0)
    return math.exp(-math.log(2) * idle / half_life.total_seconds())


def forget(
    store: MemoryStore, user_id: str, *, clock: Clock | None = None,
    irrelevant_below: float = 0.15, min_age: timedelta = timedelta(days=30),
    merged_retention: timedelta = timedelta(days=7),
) -> ForgettingReport:
    """Decay the user's memories and delete redundant and irrelevant ones."""
    now = (clock or store.clock).now()
    half_life = store.tier_policy.half_life
    everything = store.entries_where("user_id = ? ORDER BY id", [user_id])
    current = [e for e in everything if e.is_current]
    report = ForgettingReport(memories_before=len(everything),
                              mean_recency_before=_mean([e.confidence.recency for e in current]))
    redundant = [e.id for e in everything if not e.is_current and "merged" in e.tags
                 and e.valid_to is not None and now - e.valid_to >= merged_retention]
    irrelevant, recencies = [], []
    for entry in current:
        factor = _recency(entry, now, half_life)
        if (entry.tier is not Tier.PERSISTENT and not entry.validated and entry.access_count == 0
                and now - entry.recorded_at >= min_age
                and entry.confidence.overall * factor < irrelevant_below):
            irrelevant.append(entry.id)
            continue
        recencies.append(factor)
        if abs(factor - entry.confidence.recency) > 1e-3:
            store.update_entry(user_id, entry.id, recency=round(factor, 6))
            report.decayed += 1
    # A deleted memory takes what was derived from it along (`MemoryStore.delete_entries`).
    report.removed_redundant = len(store.delete_entries(user_id, redundant)) if redundant else 0
    report.removed_irrelevant = len(store.delete_entries(user_id, irrelevant)) if irrelevant else 0
    report.memories_after = store.count(user_id)
    report.mean_recency_after = _mean(recencies)
    log.info("dream_forgetting", objective="fewer memories nobody needs",
             memories_before=report.memories_before, memories_after=report.memories_after,
             decayed=report.decayed, removed_redundant=report.removed_redundant,
             removed_irrelevant=report.removed_irrelevant,
             mean_recency_before=round(report.mean_recency_before, 4),
             mean_recency_after=round(report.mean_recency_after, 4))
    return report


# -- preloading -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PreloadedMemory:
    """One line of a preloaded context, with the egress label the request path filters on."""

    id: str
    content: str
    sensitivity: str = "none"


@dataclass(frozen=True, slots=True)
class PreloadedContext:
    user_id: str
    domain: str
    memory_ids: tuple[str, ...]
    contents: tuple[str, ...]  # best first: the lines to inject
    signature: tuple[int, datetime | None]  # the user's memories when built (count, last update)
    built_at: datetime
    sensitivities: tuple[str, ...] = ()  # each memory's egress label, in the order of `contents`

    @property
    def memories(self) -> list[PreloadedMemory]:
        labels = self.sensitivities or ("none",) * len(self.contents)
        return [PreloadedMemory(*row) for row in zip(self.memory_ids, self.contents, labels, strict=True)]


class PreloadCache:
    """Context precomputed per (user, domain); thread-safe. One process holds one cache, shared
    by the learner (which fills it) and the request path (which reads it).

    A lookup is two steps so that a request with no entry never touches the store: `candidate`
    (the query's inferred domains against the cache, in RAM, and the entry's age against
    `max_age`) and `is_fresh` (the user's memories have not changed since the entry was built:
    `store.user_signature`, read from the store's RAM view of a small user, else one small query)."""

    def __init__(self, *, max_age: timedelta = timedelta(hours=24)) -> None:
        self.max_age = max_age
        self._entries: dict[tuple[str, str], PreloadedContext] = {}
        self._built: dict[str, tuple[tuple[int, datetime | None], datetime]] = {}  # user -> (signature, when)
        self._lock = threading.Lock()

    def mark_built(self, user_id: str, signature: tuple[int, datetime | None], at: datetime) -> None:
        """The user's contexts were (re)built from their memories as of `signature`, even none."""
        with self._lock:
            self._built[user_id] = (signature, at)

    def built(self, user_id: str) -> tuple[tuple[int, datetime | None], datetime] | None:
        with self._lock:
            return self._built.get(user_id)

    def put(self, context: PreloadedContext) -> None:
        with self._lock:
            self._entries[(context.user_id, context.domain)] = context

    def domains(self, user_id: str) -> list[str]:
        with self._lock:
            return sorted(d for u, d in self._entries if u == user_id)

    def contexts(self, user_id: str) -> list[PreloadedContext]:
        with self._lock:
            return [c for (u, _), c in sorted(self._entries.items()) if u == user_id]

    def candidate(self, user_id: str, query: str, now: datetime) -> PreloadedContext | None:
        """The user's entry for the query's first inferred domain that has one, if not too old."""
        for domain in infer_domains(query, cache=False):  # each query is new: not worth a cache slot
            with self._lock:
                context = self._entries.get((user_id, domain))
            if context is None:
                continue
            if now - context.built_at > self.max_age:
                self._drop(context)
                return None
            return context
        return None

    def is_fresh(self, store: MemoryStore, context: PreloadedContext) -> bool:
        """True if the user's memories are as they were when `context` was built; a stale
        entry is dropped."""
        if store.user_signature(context.user_id) == context.signature:
            return True
        self._drop(context)
        return False

    def lookup(self, store: MemoryStore, user_id: str, query: str) -> PreloadedContext | None:
        """The fresh preloaded context of the query's first inferred domain, if any."""
        context = self.candidate(user_id, query, store.clock.now())
        return context if context is not None and self.is_fresh(store, context) else None

    def _drop(self, context: PreloadedContext) -> None:
        with self._lock:
            if self._entries.get((context.user_id, context.domain)) is context:
                del self._entries[(context.user_id, context.domain)]


@dataclass(slots=True)
class PreloadReport:
    domains: list[str] = field(default_factory=list)  # the user's top domains, preloaded
    memories_cached: int = 0
    cold_ms: dict[str, float] = field(default_factory=dict)  # embed + hybrid search, per domain
    warm_ms: dict[str, float] = field(default_factory=dict)  # cache lookup, per domain
    reused: bool = False  # the cached contexts were current: nothing read or rebuilt


def _top_domains(store: MemoryStore, user_id: str, entries: list[MemoryEntry], n: int) -> list[str]:
    counted = [c.domain for c in store.domain_activations(user_id)]
    if len(counted) < n:  # too little tracked yet: the domains of the memories themselves
        tally: dict[str, int] = {}
        for entry in entries:
            for domain in entry.domains or infer_domains(entry.content):
                tally[domain] = tally.get(domain, 0) + 1
        counted += [d for d in sorted(tally, key=lambda d: (-tally[d], d)) if d not in counted]
    return counted[:n]


def _rank(entries: list[MemoryEntry]) -> list[MemoryEntry]:
    return sorted(entries, key=lambda e: (-(e.importance + e.confidence.overall * e.confidence.recency
                                             + 0.1 * math.log1p(e.access_count) + 0.1 * _TIER_RANK[e.tier]),
                                          e.id))


def preload(
    store: MemoryStore, user_id: str, *, cache: PreloadCache, clock: Clock | None = None,
    domains: int = 3, k: int = 5, measure: bool = True,
) -> PreloadReport:
    """Cache the best memories of each of the user's top domains, and (with `measure`) time
    both paths."""
    now = (clock or store.clock).now()
    signature = store.user_signature(user_id)  # before the read: a write in between makes it stale, never wrong
    entries = [e for e in store.current_entries(user_id) if e.expires_at is None or e.expires_at > now]
    report = PreloadReport(domains=_top_domains(store, user_id, entries, domains))
    for domain in report.domains:
        chosen = _rank([e for e in entries if domain in (e.domains or infer_domains(e.content))])[:k]
        if not chosen:
            continue
        cache.put(PreloadedContext(user_id, domain, tuple(e.id for e in chosen),
                                   tuple(e.content for e in chosen), signature, now,
                                   tuple(e.sensitivity.value for e in chosen)))
        report.memories_cached += len(chosen)
        if not measure:
            continue
        probe = f"{domain}"
        started = time.perf_counter()
        store.search_text(user_id, probe, k=k, touch=False, relations=False)
        report.cold_ms[domain] = round((time.perf_counter() - started) * 1000, 3)
        started = time.perf_counter()
        cache.lookup(store, user_id, probe)
        report.warm_ms[domain] = round((time.perf_counter() - started) * 1000, 3)
    cache.mark_built(user_id, signature, now)
    log.info("dream_preloading", objective="faster next request in frequent domains",
             domains=len(report.domains), memories_cached=report.memories_cached,
             cold_ms_before=round(_mean(list(report.cold_ms.values())), 3),
             warm_ms_after=round(_mean(list(report.warm_ms.values())), 3))
    return report


@dataclass(frozen=True, slots=True)
class Preloader:
    """The preloading step bound to one process's cache: what the learner runs after a
    learning run (`learner.triggers.learn`) and after a job changed a preloaded user's
    memories (`learner.runner.JobRunner`), while the request path reads the same cache."""

    cache: PreloadCache
    domains: int = 3
    k: int = 5
    # A learning run keeps the user's contexts when their memories have not changed since they
    # were built, for this long: building them reads every current memory (10,000 rows: a
    # third of a second holding the GIL), and access counts, which only move the ranking, do
    # not change the signature.
    rebuild_after: timedelta = timedelta(hours=1)

    def __call__(self, store: MemoryStore, user_id: str, *, clock: Clock | None = None) -> PreloadReport:
        now = (clock or store.clock).now()
        built = self.cache.built(user_id)
        if built is not None and now - built[1] < self.rebuild_after and built[0] == store.user_signature(user_id):
            contexts = self.cache.contexts(user_id)
            return PreloadReport(domains=[c.domain for c in contexts],
                                 memories_cached=sum(len(c.contents) for c in contexts), reused=True)
        return preload(store, user_id, cache=self.cache, clock=clock, domains=self.domains, k=self.k)

    def refresh(self, store: MemoryStore, user_id: str) -> PreloadReport | None:
        """Preload again a user whose preloaded contexts a write made stale, without the timing
        probes; None when nothing was stale, or the user has none (their first learning run
        preloads them)."""
        contexts = self.cache.contexts(user_id)
        if not contexts:
            return None
        signature = store.user_signature(user_id)
        if all(c.signature == signature for c in contexts):
            return None
        return preload(store, user_id, cache=self.cache, domains=self.domains, k=self.k, measure=False)


# -- optimization -----------------------------------------------------------------------


@dataclass(slots=True)
class OptimizationReport:
    file_bytes_before: int = 0
    file_bytes_after: int = 0
    wal_bytes_before: int = 0
    wal_bytes_after: int = 0
    index_tombstones: int = 0  # deletes the old HNSW index had absorbed
    probe_ms_before: float = 0.0  # one hybrid search
    probe_ms_after: float = 0.0
    seconds: float = 0.0


def _file_sizes(store: MemoryStore) -> tuple[int, int]:
    path = store.database_path()
    if path is None:
        return 0, 0
    main, wal = Path(path), Path(f"{path}.wal")
    return (main.stat().st_size if main.exists() else 0, wal.stat().st_size if wal.exists() else 0)


def _probe_ms(store: MemoryStore, user_id: str | None) -> float:
    if user_id is None:
        return 0.0
    started = time.perf_counter()
    store.search_text(user_id, "what does the user like", k=5, touch=False, relations=False)
    return round((time.perf_counter() - started) * 1000, 3)


def optimize(store: MemoryStore, *, clock: Clock | None = None, probe_user: str | None = None) -> OptimizationReport:
    """Rebuild the indexes and checkpoint the database file."""
    del clock  # the step reads no time of the memories; kept for the common signature
    started = time.perf_counter()
    report = OptimizationReport(probe_ms_before=_probe_ms(store, probe_user))
    report.file_bytes_before, report.wal_bytes_before = _file_sizes(store)
    report.index_tombstones = store.compact()
    report.file_bytes_after, report.wal_bytes_after = _file_sizes(store)
    report.probe_ms_after = _probe_ms(store, probe_user)
    report.seconds = round(time.perf_counter() - started, 3)
    log.info("dream_optimization", objective="compact, freshly indexed store",
             file_bytes_before=report.file_bytes_before, file_bytes_after=report.file_bytes_after,
             wal_bytes_before=report.wal_bytes_before, wal_bytes_after=report.wal_bytes_after,
             index_tombstones=report.index_tombstones, probe_ms_before=report.probe_ms_before,
             probe_ms_after=report.probe_ms_after, seconds=report.seconds)
    return report


# -- all four ---------------------------------------------------------------------------


@dataclass(slots=True)
class DreamReport:
    consolidation: ConsolidationReport
    forgetting: ForgettingReport
    preloading: PreloadReport
    optimization: OptimizationReport


def dream(store: MemoryStore, user_id: str, *, cache: PreloadCache, clock: Clock | None = None) -> DreamReport:
    """Consolidate, forget, preload and optimize, in that order."""
    return DreamReport(
        consolidation=consolidate(store, user_id, clock=clock),
        forgetting=forget(store, user_id, clock=clock),
        preloading=preload(store, user_id, cache=cache, clock=clock),
        optimization=optimize(store, clock=clock, probe_user=user_id),
    )

