"""The PLM in the request path: read the query's intent and domains, then have the local model
(with the user's personal adapter when there is one) write a short personalized context for the
target model, inside a latency budget.

1. ``QueryAnalyser.analyse``: intent and domains of the query, in well under a millisecond:
   the memory system's own domain lexicon (``memory.infer_domains``) over the query, plus the
   domain labels of the memories retrieval found (those came from the query's embedding, so they
   carry its meaning at no extra cost), so query and memories share one vocabulary.
2. ``ContextGenerator``: writes a few lines about the user from the memories that fit those
   domains. ``LocalContextGenerator`` asks the local model, which answers with the user's own
   adapter when it serves personal adapters.
3. ``PLMContext.build``: runs the generator as a task and waits for it at most ``budget_s``.
   A late, failed or empty answer falls back to plain retrieval; the late task is cancelled and
   never awaited, so the request does not wait for it (a local generation stops within a token).

Nothing here formats or escapes text for the target model: the proxy does that
(``proxy.enrich``), for generated lines exactly as for memories.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import structlog

log = structlog.get_logger(__name__)

__all__ = [
    "ContextGenerator",
    "ContextRequest",
    "ContextResult",
    "LocalContextGenerator",
    "PLMContext",
    "QueryAnalyser",
    "QueryAnalysis",
]

Intent = Literal["recall", "advice", "how_to", "planning", "writing", "chat"]
# First match wins, in this order: a question about the user outranks the kind of help asked.
_INTENT_RULES: tuple[tuple[Intent, re.Pattern[str]], ...] = (
    ("recall", re.compile(r"\b(do you remember|what(?:'s| is| are| was) my|remind me|did i (?:tell|say|mention)"
                          r"|who is my|when is my|where do i)\b")),
    ("writing", re.compile(r"\b(write|draft|compose|rewrite|summari[sz]e|translate|email to|letter to|poem)\b")),
    ("planning", re.compile(r"\b(plan|schedule|itinerary|organi[sz]e|prepare for|book a|agenda)\b")),
    ("how_to", re.compile(r"\b(how (?:do|can|should) i|how to|fix|debug|install|configure|set up|error)\b")),
    ("advice", re.compile(r"\b(should i|recommend|suggest|what(?:'s| is) a good|any ideas|best way|advice|which one)\b")),
)


@dataclass(frozen=True, slots=True)
class QueryAnalysis:
    intent: Intent
    domains: tuple[str, ...]  # most likely first
    confidence: float  # share of the domain evidence the first domain holds, 0-1; 0 with none


class QueryAnalyser:
    """Intent and domains of one query, by keyword rules and the retrieved memories' labels."""

    def __init__(self, keyword_domains: Callable[[str], Sequence[str]] | None = None, *,
                 max_domains: int = 3) -> None:
        """``keyword_domains``: text -> its domains, best first; default the memory system's lexicon."""
        if keyword_domains is None:
            from memory import infer_domains as keyword_domains
        self.keyword_domains = keyword_domains
        self.max_domains = max_domains

    def analyse(self, query: str, memory_domains: Sequence[Sequence[str]] = ()) -> QueryAnalysis:
        """``memory_domains``: the domain labels of the retrieved memories, best memory first."""
        text = query.lower()
        votes: Counter[str] = Counter()
        for rank, domain in enumerate(self.keyword_domains(query)):
            votes[domain] += 1.0 / (1 + 0.25 * rank)
        for rank, labels in enumerate(memory_domains):
            for label in labels:
                label = label.strip().lower()
                if label:
                    votes[label] += 0.5 / (1 + rank)  # the best memories speak loudest
                    if re.search(rf"\b{re.escape(label)}\b", text):
                        votes[label] += 1.0  # a user's own label named in the query
        intent: Intent = next((name for name, rule in _INTENT_RULES if rule.search(text)), "chat")
        if not votes:
            return QueryAnalysis(intent, (), 0.0)
        ranked = votes.most_common(self.max_domains)
        return QueryAnalysis(intent, tuple(d for d, _ in ranked), round(ranked[0][1] / sum(votes.values()), 3))


@dataclass(frozen=True, slots=True)
class ContextRequest:
    user_id: str
    query: str
    analysis: QueryAnalysis
    memories: tuple[str, ...]  # the memories the context may draw on, best first


class ContextGenerator(Protocol):
    async def __call__(self, request: ContextRequest) -> str: ...


class ChatModel(Protocol):
    """What LocalContextGenerator needs of a model: ``adapters.LocalModel`` has it."""

    loaded: bool

    def load(self) -> None: ...
    def generate(self, messages: list[dict], params: Any) -> Any: ...


_SYSTEM = (
    "You brief another assistant about its user. From the facts given, write at most {lines} short "
    "lines, each starting with '- ', stating only facts that help answer the user's message. "
    "Do not answer the message. Do not invent facts."
)


class LocalContextGenerator:
    """Asks the local model for the context, with the user's personal adapter where it has one.

    A model whose ``generate`` takes ``user_id`` (``adapters.plm.serve.PersonalModel``) gets it,
    so the user's live adapter writes the context. ``adapter_for(user_id)`` says whether the user
    has one (None: no); without memories and without an adapter there is nothing to tell, and it
    returns "" at once instead of letting the base model make things up.
    """

    def __init__(
        self, model: ChatModel, *, adapter_for: Callable[[str], object | None] | None = None,
        max_lines: int = 3, max_new_tokens: int = 60, max_memories: int = 6,
    ) -> None:
        self.model = model
        self.adapter_for = adapter_for
        self.per_user = "user_id" in inspect.signature(model.generate).parameters
        self.max_lines = max_lines
        self.max_new_tokens = max_new_tokens
        self.max_memories = max_memories

    async def __call__(self, request: ContextRequest) -> str:
        from adapters.local_model import GenerationParams

        personal = self.adapter_for is not None and self.adapter_for(request.user_id) is not None
        if not personal and not request.memories:
            return ""
        model = self.model
        if not model.loaded:  # off the loop; if the budget runs out first, the load goes on and warms up
            await asyncio.to_thread(model.load)
        facts = "\n".join(f"- {m}" for m in request.memories[: self.max_memories]) or "- (none retrieved)"
        topic = ", ".join(request.analysis.domains) or "general"
        messages = [
            {"role": "system", "content": _SYSTEM.format(lines=self.max_lines)},
            {"role": "user", "content": f"Facts about the user:\n{facts}\n\nTopics: {topic}\n"
                                        f"Kind of request: {request.analysis.intent}\n"
                                        f"User's message: {request.query}"},
        ]
        params = GenerationParams(max_new_tokens=self.max_new_tokens, temperature=0.0, stop=("\n\n",))
        kwargs = {"user_id": request.user_id} if self.per_user else {}
        generation = await asyncio.to_thread(model.generate, messages, params, **kwargs)
        return await generation.text()


PathName = Literal["context", "fallback"]


@dataclass(frozen=True, slots=True)
class ContextResult:
    path: PathName  # "context": use ``lines``; "fallback": plain retrieval
    lines: tuple[str, ...] = ()
    analysis: QueryAnalysis | None = None
    reason: str | None = None  # why it fell back: "late" | "error" | "empty"
    elapsed_ms: float = 0.0


def context_lines(text: str, *, max_lines: int, max_chars: int) -> tuple[str, ...]:
    """Model text -> at most ``max_lines`` non-empty lines, list markers stripped, ``max_chars`` in all."""
    lines: list[str] = []
    used = 0
    for raw in text.splitlines():
        line = re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s*", "", raw).strip()
        if not line:
            continue
        if used + len(line) > max_chars:
            break
        lines.append(line)
        used += len(line)
        if len(lines) == max_lines:
            break
    return tuple(lines)


class PLMContext:
    """The request-path step: analyse, then generate within ``budget_s`` or fall back."""

    def __init__(
        self, generator: ContextGenerator, *, budget_s: float, analyser: QueryAnalyser | None = None,
        max_lines: int = 4, max_chars: int = 600,
    ) -> None:
        if budget_s <= 0:
            raise ValueError("the PLM context budget must be positive")
        self.generator = generator
        self.budget_s = budget_s
        self.analyser = analyser or QueryAnalyser()
        self.max_lines = max_lines
        self.max_chars = max_chars
        self._late: set[asyncio.Task[str]] = set()  # cancelled tasks still winding down

    def select(self, analysis: QueryAnalysis, memories: Sequence[Any]) -> tuple[str, ...]:
        """Memory texts for the generator: those in the query's domains first, then the rest,
        each group in retrieval order. ``memories``: MemoryEntry-like (content, domains) or str."""
        wanted = set(analysis.domains)
        inside, outside = [], []
        for memory in memories:
            text = memory if isinstance(memory, str) else memory.content
            (inside if wanted.intersection(self._labels(memory)) else outside).append(text)
        return tuple(inside + outside)

    def _labels(self, memory: Any) -> tuple[str, ...]:
        """A memory's domain labels; a memory stored without any gets those its text reads as."""
        if isinstance(memory, str):
            return tuple(self.analyser.keyword_domains(memory))
        labels = tuple(label.lower() for label in getattr(memory, "domains", ()) or ())
        return labels or tuple(self.analyser.keyword_domains(memory.content))

    async def build(self, user_id: str, query: str, memories: Sequence[Any] = ()) -> ContextResult:
        started = time.perf_counter()
        analysis = self.analyser.analyse(query, [self._labels(m) for m in memories])
        request = ContextRequest(user_id, query, analysis, self.select(analysis, memories))
        task = asyncio.ensure_future(self.generator(request))
        try:
            done, _ = await asyncio.wait({task}, timeout=self.budget_s)
        except asyncio.CancelledError:
            task.cancel()
            raise

        def result(path: PathName, reason: str | None, lines: tuple[str, ...] = ()) -> ContextResult:
            elapsed = round((time.perf_counter() - started) * 1000, 2)
            log.info("plm_context", path=path, reason=reason, intent=analysis.intent, domains=list(analysis.domains),
                     lines=len(lines), elapsed_ms=elapsed)
            return ContextResult(path, lines, analysis, reason, elapsed)

        if not done:
            task.cancel()  # not awaited: the request goes on now; the task ends on its own
            self._late.add(task)
            task.add_done_callback(self._discard)
            return result("fallback", "late")
        if task.exception() is not None:
            log.warning("plm_context_failed", error=type(task.exception()).__name__)
            return result("fallback", "error")
        lines = context_lines(task.result() or "", max_lines=self.max_lines, max_chars=self.max_chars)
        if not lines:
            return result("fallback", "empty")
        return result("context", None, lines)

    def _discard(self, task: asyncio.Task[str]) -> None:
        self._late.discard(task)
        if not task.cancelled() and task.exception() is not None:  # retrieved, so asyncio stays quiet
            log.debug("plm_context_late_failed", error=type(task.exception()).__name__)
