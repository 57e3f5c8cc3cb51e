"""The memory step of a chat request: embed the latest user turn, retrieve, inject.

A broken or slow memory store never breaks chat: any failure (or a retrieval slower than the
budget) sends the request on without memory, and the response says so in ``x-memlane-memory``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from memory import BatchingEmbedder, MemoryStore, candidate_count
from proxy.enrich import inject, latest_user_text
from proxy.metrics import Metrics

log = structlog.get_logger("memlane.recall")

MAX_QUERY_CHARS = 2000  # the embedder reads ~256 word pieces; the tail of a long turn is what matters


@dataclass(frozen=True, slots=True)
class Recall:
    body: dict  # the request to send
    used: int  # memories injected
    state: str  # "on" | "off" | "unavailable"


class Recaller:
    def __init__(
        self,
        store: MemoryStore | None,
        embedder: BatchingEmbedder | None,
        metrics: Metrics,
        *,
        enabled: bool,
        top_k: int,
        min_score: float,
        token_cap: int,
        budget_s: float = 2.0,
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.metrics = metrics
        self.enabled = enabled and top_k > 0 and token_cap > 0
        self.top_k = top_k
        self.min_score = min_score
        self.token_cap = token_cap
        self.budget_s = budget_s

    async def enrich(self, user_id: str, body: dict, provider: str) -> Recall:
        if not self.enabled:
            return Recall(body, 0, "off")
        if self.store is None or self.embedder is None:
            self.metrics.memory_failures.inc()
            return Recall(body, 0, "unavailable")
        text = latest_user_text(body["messages"])
        if not text or not text.strip():
            return Recall(body, 0, "on")
        try:
            memories = await asyncio.wait_for(self._retrieve(user_id, text), self.budget_s)
        except Exception as exc:  # TimeoutError included: answer without memory, say so
            self.metrics.memory_failures.inc()
            log.warning("memory_unavailable", error=type(exc).__name__)
            return Recall(body, 0, "unavailable")
        sent, used = inject(body, [m.content for m in memories], provider, token_cap=self.token_cap)
        self.metrics.memories_injected.observe(used)
        return Recall(sent, used, "on")

    async def _retrieve(self, user_id: str, text: str) -> list:
        store, embedder = self.store, self.embedder
        assert store is not None and embedder is not None
        query = text[-MAX_QUERY_CHARS:]
        # The BM25 leg needs no embedding: run it on a thread while the query is embedded.
        n = candidate_count(store.weights, self.top_k)
        text_leg = asyncio.ensure_future(asyncio.to_thread(store.text_matches, user_id, query, n))
        try:
            vector = await embedder.embed_one(query)
        except BaseException:
            text_leg.cancel()
            raise
        return await asyncio.to_thread(
            store.search, user_id, vector, k=self.top_k, min_score=self.min_score, query=query,
            relations=False, text_hits=await text_leg,
        )
