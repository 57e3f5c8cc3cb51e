"""The memory step of a chat request: embed the latest user turn, retrieve, inject.

A broken or slow memory store never breaks chat: any failure (or a retrieval slower than the
budget, or a store that could not be opened) sends the request on without memory, and the
response says so: ``x-memlane-memory: degraded``. Unless the learner has preloaded the
context of the query's domain for this user (``learner.dream.PreloadCache``, shared with the
learner) and the user's memories have not changed since: then that context is injected and
the response says ``x-memlane-memory: preloaded`` (``memory_preload``, default "fallback"; with
"serve" a query in a preloaded domain is answered from the cache before any search).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from memory import BatchingEmbedder, MemoryStore, candidate_count
from proxy.egress import AdapterTraining, EgressPolicy, adapter_may_reach
from proxy.enrich import inject, latest_user_text
from proxy.metrics import Metrics

if TYPE_CHECKING:
    from adapters.plm.context import PLMContext
    from learner.dream import PreloadCache

log = structlog.get_logger("memlane.recall")

MAX_QUERY_CHARS = 2000  # the embedder reads ~256 word pieces; the tail of a long turn is what matters
# Time the preloaded context's freshness check may take (in RAM for a user the store keeps a
# view of, one small query otherwise); longer, and the request goes on without memory.
PRELOAD_CHECK_S = 0.25
# The tail of the turn whose domain picks a preloaded context: the question is at the end, and
# `infer_domains` costs ~0.13 ms for a sentence, more for a long turn (and caches what it saw).
PRELOAD_QUERY_CHARS = 500


@dataclass(frozen=True, slots=True)
class Recall:
    body: dict  # the request to send
    used: int  # memories injected
    state: str  # "on" | "off" | "degraded" (no store, or retrieval failed or timed out) | "preloaded"
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
        preloaded: PreloadCache | None = None,  # the learner's preloaded contexts (one per process)
        preload: str = "fallback",  # memory_preload: "off" | "fallback" | "serve"
        # user id -> what their live adapter was trained on (None: no adapter)
        trained_on: Callable[[str], AdapterTraining | None] | None = None,
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
        self.trained_on = trained_on
        self.preloaded = preloaded if preload != "off" else None
        self.serve_preloaded = preload == "serve"

    async def enrich(self, user_id: str, body: dict, provider: str) -> Recall:
        if not self.enabled:
            return Recall(body, 0, "off")
        if self.store is None or self.embedder is None:
            self.metrics.memory_failures.inc()
            return Recall(body, 0, "degraded")
        text = latest_user_text(body["messages"])
        if not text or not text.strip():
            return Recall(body, 0, "on")
        if self.serve_preloaded:
            served = await self._from_preload(user_id, body, provider, text, reason="served")
            if served is not None:
                return served
        try:
            memories = await asyncio.wait_for(self._retrieve(user_id, text), self.budget_s)
        except Exception as exc:  # TimeoutError included: answer without memory, say so
            self.metrics.memory_failures.inc()
            log.warning("memory_degraded", error=type(exc).__name__)
            self.store.recover_soon(exc)  # DuckDB invalidated the database: reopen it for the next requests
            fallback = await self._from_preload(user_id, body, provider, text, reason="fallback")
            return fallback or Recall(body, 0, "degraded")
        if self.egress is not None:  # before anything reads them: a label a provider may not see stays here
            memories = self.egress.filter(memories, provider)
        # The personal model's context, within its own budget; late or failed: plain retrieval.
        # Written by an adapter that learned a memory the provider may not see: withheld, and the
        # adapter is checked again afterwards in case another version went live meanwhile.
        withheld = self.plm is not None and not await self._adapter_may_reach(user_id, provider)
        context = await self.plm.build(user_id, text[-MAX_QUERY_CHARS:], memories) \
            if self.plm is not None and not withheld else None
        withheld = withheld or (context is not None and not await self._adapter_may_reach(user_id, provider))
        sent, used = inject(body, [m.content for m in memories], provider, token_cap=self.token_cap,
                            context=context.lines if context and not withheld else ())
        self.metrics.memories_injected.observe(used)
        return Recall(sent, used, "on", plm="fallback" if withheld else context.path if context else "off")

    async def _adapter_may_reach(self, user_id: str, provider: str) -> bool:
        """Whether the user's live adapter learned only memories (stored, or said in the
        conversations it distilled) that may reach `provider`."""
        store, trained_on = self.store, self.trained_on
        if self.egress is None or trained_on is None or store is None:
            return True

        def lookup() -> tuple[Sequence[str], list, set[str]]:  # the registry file and the store, off the loop
            trained = trained_on(user_id) or AdapterTraining()
            ids = trained.memory_ids
            held = store.get_many(user_id, ids, relations=False) if ids else []
            return ids, held, store.conversation_labels(user_id, trained.teacher_requests)

        try:
            ids, held, said = await asyncio.to_thread(lookup)
        except Exception as exc:  # labels unknown: keep the context here
            log.warning("plm_context_labels_failed", error=type(exc).__name__)
            return False
        # No adapter: the base model writes from the permitted memories it is given.
        if adapter_may_reach(self.egress, provider, ids, held, said):
            return True
        log.info("plm_context_withheld", provider=provider, reason="egress_policy")
        return False

    async def _from_preload(self, user_id: str, body: dict, provider: str, text: str, *, reason: str) -> Recall | None:
        """The request with the user's preloaded context of the query's domain, if one is fresh.
        No entry costs a domain guess and a dict lookup in RAM: the store is asked (whether the
        user's memories changed since the entry was built) only when there is one."""
        if self.preloaded is None or self.store is None:
            return None
        context = self.preloaded.candidate(user_id, text[-PRELOAD_QUERY_CHARS:], self.store.clock.now())
        if context is None:
            return None
        try:
            fresh = await asyncio.wait_for(asyncio.to_thread(self.preloaded.is_fresh, self.store, context),
                                           PRELOAD_CHECK_S)
        except Exception as exc:  # the store cannot say: nothing stale is sent
            log.warning("memory_preload_unchecked", error=type(exc).__name__)
            return None
        if not fresh:
            return None
        memories = context.memories
        if self.egress is not None:
            memories = self.egress.filter(memories, provider)
        sent, used = inject(body, [m.content for m in memories], provider, token_cap=self.token_cap)
        self.metrics.memory_preloaded.labels(reason=reason).inc()
        self.metrics.memories_injected.observe(used)
        log.info("memory_preloaded", reason=reason, domain=context.domain, memories=used)
        return Recall(sent, used, "preloaded")

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
