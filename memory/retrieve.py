"""Hybrid retrieval: vector and BM25 candidates, fused with the memory's own signals.

For one query:
1. candidates: the user's nearest memories by cosine (HNSW, `store.vector_neighbours`) and
   their best BM25 matches (`store.text_matches`), `candidates` from each;
2. only current memories survive (not superseded, not expired), filtered by tier and domain
   when asked; every survivor gets its cosine similarity, whichever leg found it;
3. link expansion: the best few seeds pull in memories linked to them (supports, related,
   derived from) and memories learned in the same conversation, scored through the link in
   proportion to the seed's relevance; a conversation's share is divided among its memories;
4. each memory's score is match x prior (`ScoreParts` holds every part):
   match = weighted sum of how well it answers the query (vector, text, link);
   prior = 1 - sum of weight x (1 - signal) over the memory's own signals (recency,
   importance, confidence, access frequency, tier): a memory perfect on every signal keeps
   its match, one poor on all loses at most the sum of their weights;
5. the top k are returned, and their access statistics updated in the background.

A memory is relevant when its vector or text part (or its link part) reaches `min_score`;
the signals of the memory itself only order relevant memories, they never make one relevant:
being a factor, the prior scales a weak match down as much as a strong one, it cannot lift an
unrelated memory over a related one by much.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np

from memory.entry import MemoryEntry, ScoreParts, Tier
from memory.tiers import recency as recency_of

if TYPE_CHECKING:
    from memory.store import MemoryStore

__all__ = ["RetrievalWeights", "retrieve", "total"]

TIER_VALUE = {Tier.SHORT_TERM: 0.4, Tier.LONG_TERM: 0.7, Tier.PERSISTENT: 1.0}
LINK_KINDS = {"supports": 1.0, "related": 0.8, "derived_from": 0.8}
CONVERSATION_LINK = 0.6  # shared among the memories learned in the seed's conversation
TEXT_HALF = 2.0  # the BM25 score whose text part is 0.5: text = bm25 / (bm25 + this)
MATCH_PARTS = ("vector", "text", "link")
PRIOR_PARTS = ("recency", "importance", "confidence", "frequency", "tier")


@dataclass(frozen=True, slots=True)
class RetrievalWeights:
    """vector, text, link: the match's weighted sum; the rest: how much a memory at 0 on that
    signal loses of its match (the prior's weights; their sum is the most it can lose).
    Tuned on the development seed of bench_retrieval_quality (see docs/benchmarks.md)."""

    vector: float = 0.55
    text: float = 0.25
    link: float = 0.1
    recency: float = 0.2
    importance: float = 0.05
    confidence: float = 0.05
    frequency: float = 0.05
    tier: float = 0.1
    candidates: int = 30  # from each leg
    link_seeds: int = 3  # best memories whose links are followed
    link_decay: float = 0.5  # a linked memory's link part: seed relevance x this x link weight


def candidate_count(weights: RetrievalWeights, k: int) -> int:
    """How many candidates each leg contributes for a top-k query."""
    return max(3 * k, weights.candidates)


def retrieve(
    store: MemoryStore,
    user_id: str,
    embedding: np.ndarray,
    *,
    query: str | None = None,
    k: int = 5,
    min_score: float = 0.0,
    tiers: Collection[Tier] | None = None,
    domains: Collection[str] | None = None,
    expand_links: bool = True,
    touch: bool = True,
    relations: bool = True,
    text_hits: list[tuple[str, float]] | None = None,
) -> list[MemoryEntry]:
    """The user's k best current memories for a query, best first, each with `score` parts
    (and with links and sources unless `relations` is false: the request path needs neither).

    `text_hits`: the BM25 leg's result when the caller already ran it (the proxy runs it while
    the query is being embedded)."""
    if k <= 0:
        return []
    weights, now = store.weights, store.clock.now()
    n = candidate_count(weights, k)
    vector = dict(store.vector_neighbours(user_id, embedding, n))
    if text_hits is None:
        text_hits = store.text_matches(user_id, query, n) if query else []
    text = dict(text_hits)
    entries = _eligible(store.get_many(user_id, [*vector, *text], relations=False), now, tiers, domains)
    _fill_similarities(store, user_id, embedding, entries, vector)
    relevance = {i: max(vector.get(i, 0.0), text_part(text.get(i, 0.0))) for i in entries}
    link: dict[str, tuple[float, str]] = {}
    if expand_links and entries:
        seeds = sorted(entries, key=lambda i: relevance[i], reverse=True)[: weights.link_seeds]
        link = _expand(store, user_id, seeds, relevance, weights.link_decay)
        new = [i for i in link if i not in entries]
        added = _eligible(store.get_many(user_id, new, relations=False), now, tiers, domains)
        _fill_similarities(store, user_id, embedding, added, vector)
        entries.update(added)
    results = []
    for memory_id, entry in entries.items():
        link_score, via = link.get(memory_id, (0.0, None))
        if max(relevance.get(memory_id, vector.get(memory_id, 0.0)), link_score) < min_score:
            continue
        parts = _parts(entry, vector.get(memory_id, 0.0), text_part(text.get(memory_id, 0.0)),
                       link_score, via, now, weights, store)
        results.append(replace(entry, score=parts))
    results.sort(key=lambda e: (-e.score.total, e.id))  # type: ignore[union-attr]
    results = results[:k]
    if touch:
        store.record_access(user_id, [e.id for e in results])
    return store.with_relations(user_id, results) if relations else results


def text_part(bm25: float) -> float:
    """BM25 saturated into [0, 1): not scaled by the query's best match, so a memory sharing
    one common word with the query gets a small part even when nothing matches better."""
    return bm25 / (bm25 + TEXT_HALF) if bm25 > 0 else 0.0


def _eligible(
    found: list[MemoryEntry], now: datetime,
    tiers: Collection[Tier] | None, domains: Collection[str] | None,
) -> dict[str, MemoryEntry]:
    wanted_domains = set(domains or ())
    return {
        e.id: e
        for e in found
        if e.is_current
        and (e.expires_at is None or e.expires_at > now)
        and (tiers is None or e.tier in tiers)
        and (not wanted_domains or wanted_domains.intersection(e.domains))
    }


def _fill_similarities(
    store: MemoryStore, user_id: str, embedding: np.ndarray,
    entries: dict[str, MemoryEntry], vector: dict[str, float],
) -> None:
    missing = [i for i in entries if i not in vector]
    vector.update(store.similarities(user_id, embedding, missing))


def _expand(
    store: MemoryStore, user_id: str, seeds: list[str], relevance: dict[str, float], decay: float
) -> dict[str, tuple[float, str]]:
    """Memories reached from the seeds: id -> (link part, seed id), strongest path kept.

    A link part is the seed's relevance x `decay` x the link's weight. An explicit link is a
    claim about these two memories; a shared conversation is not (a chat session holds dozens
    of unrelated facts), so its weight is divided by the seed's number of conversation mates."""
    reached: dict[str, tuple[float, str]] = {}

    def offer(seed: str, other: str, weight: float) -> None:
        score = relevance[seed] * decay * weight
        if other != seed and score > reached.get(other, (0.0, ""))[0]:
            reached[other] = (score, seed)

    wanted = set(seeds)
    for link in store.links_from(user_id, seeds):
        if link.kind not in LINK_KINDS:
            continue
        for seed, other in ((link.src_id, link.dst_id), (link.dst_id, link.src_id)):
            if seed in wanted:
                offer(seed, other, LINK_KINDS[link.kind] * link.weight)
    mates = store.conversation_neighbours(user_id, seeds, limit=20 * len(seeds))
    for seed, other, siblings in mates:
        offer(seed, other, CONVERSATION_LINK / siblings)
    return reached


def _parts(
    entry: MemoryEntry, vector: float, text: float, link: float, via: str | None,
    now: datetime, weights: RetrievalWeights, store: MemoryStore,
) -> ScoreParts:
    recency = recency_of(entry, now, store.tier_policy)
    frequency = math.log1p(entry.access_count) / math.log1p(100)
    parts = {
        "vector": max(vector, 0.0),
        "text": text,
        "recency": recency,
        "importance": entry.importance,
        "confidence": entry.confidence.overall,
        "frequency": min(frequency, 1.0),
        "tier": TIER_VALUE[entry.tier],
        "link": link,
    }
    return ScoreParts(total=round(total(parts, weights), 6), via=via,
                      **{n: round(v, 6) for n, v in parts.items()})


def total(parts: dict[str, float], weights: RetrievalWeights) -> float:
    """match x prior (see the module docstring)."""
    match = sum(getattr(weights, name) * parts[name] for name in MATCH_PARTS)
    prior = 1.0 - sum(getattr(weights, name) * (1.0 - parts[name]) for name in PRIOR_PARTS)
    return match * prior
