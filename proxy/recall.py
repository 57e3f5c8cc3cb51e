"""The memory step of a chat request: embed the latest user turn, retrieve, inject.

A broken or slow memory store never breaks chat: any failure (or a retrieval slower than the
budget, or a store that could not be opened) sends the request on without memory, and the
response says so: ``x-memlane-memory: degraded``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from memory import BatchingEmbedder, MemoryStore, candidate_count
from proxy.egress import EgressPolicy
from proxy.enrich import inject, latest_user_text
from proxy.metrics import Metrics

if TYPE_CHECKING:
    from adapters.plm.context import PLMContext

log = structlog.get_logger("memlane.recall")

MAX_QUERY_CHARS = 2000  # the embedder reads ~256 word pieces; the tail of a long turn is what matters


@dataclass(frozen=True, slots=True)
class Recall:
    body: dict  # the request to send
    used: int  # memories injected
    state: str  # "on" | "off" | "degraded" (no store, or retrieval failed or timed out)
    plm: str = "off"  # the personal model's context: "context" | "fallback" (plain retrieval) | "off"


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
        plm: PLMContext | None = None,  # the personal model's context step; None: plain retrieval
        egress: EgressPolicy | None = None,  # which sensitivity labels may reach which providers
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.metrics = metrics
        self.enabled = enabled and top_k > 0 and token_cap > 0
        self.top_k = top_k
        self.min_score = min_score
        self.token_cap = token_cap
        self.budget_s = budget_s
        self.plm = plm
        self.egress = egress

    async def enrich(self, user_id: str, body: dict, provider: str) -> Recall:
        if not self.enabled:
            return Recall(body, 0, "off")
        if self.store is None or self.embedder is None:
            self.metrics.memory_failures.inc()
            return Recall(body, 0, "degraded")
        text = latest_user_text(body["messages"])
        if not text or not text.strip():
            return Recall(body, 0, "on")
        try:
            memories = await asyncio.wait_for(self._retrieve(user_id, text), self.budget_s)
        except Exception as exc:  # TimeoutError included: answer without memory, say so
            self.metrics.memory_failures.inc()
            log.warning("memory_degraded", error=type(exc).__name__)
            return Recall(body, 0, "degraded")
        if self.egress is not None:  # before anything reads them: a label a provider may not see stays here
            memories = self.egress.filter(memories, provider)
        # The personal model's context, within its own budget; late or failed: plain retrieval.
        context = await self.plm.build(user_id, text[-MAX_QUERY_CHARS:], memories) if self.plm is not None else None
        sent, used = inject(body, [m.content for m in memories], provider, token_cap=self.token_cap,
                            context=context.lines if context else ())
        self.metrics.memories_injected.observe(used)
        return Recall(sent, used, "on", plm=context.path if context else "off")

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
