"""What a memory is: the MemoryEntry of the PMS design, its classifications and its provenance.

A memory belongs to one user and lives in one tier. Its confidence has parts (how reliable
the source was, how often it was corroborated or contradicted); its relations to other
memories (related, supports, contradicts, supersedes) are links stored beside it. Validity is
bi-temporal: `valid_from`/`valid_to` say when the fact held in the user's life as far as memlane
knows, `recorded_at` when memlane learned it. A superseded memory keeps its row with `valid_to`
set and `superseded_by` pointing at its successor; it is history, not current.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

__all__ = [
    "Confidence",
    "MemoryEntry",
    "MemorySource",
    "MemoryType",
    "ScoreParts",
    "Sensitivity",
    "Tier",
    "TruthCategory",
    "entry_from_dict",
    "entry_to_dict",
]


class Tier(StrEnum):
    SHORT_TERM = "SHORT_TERM"  # fresh, unvalidated, expires unless promoted
    LONG_TERM = "LONG_TERM"  # validated, vector + full-text searchable
    PERSISTENT = "PERSISTENT"  # core identity and stable beliefs


class TruthCategory(StrEnum):
    ABSOLUTE = "ABSOLUTE"  # verifiable: dates, names, measurements
    CONTEXTUAL = "CONTEXTUAL"  # true in some contexts
    OPINION = "OPINION"  # the user's beliefs and tastes
    INFERRED = "INFERRED"  # derived from behaviour, not stated


class MemoryType(StrEnum):
    FACT = "FACT"
    BELIEF = "BELIEF"
    PREFERENCE = "PREFERENCE"
    SKILL = "SKILL"
    EVENT = "EVENT"
    CONTEXT = "CONTEXT"


class Sensitivity(StrEnum):
    """How private a memory is; the proxy's egress policy decides which upstreams may see each label."""

    NONE = "none"
    PERSONAL = "personal"
    HEALTH = "health"
    FINANCE = "finance"
    CREDENTIALS = "credentials"


@dataclass(frozen=True, slots=True)
class Confidence:
    overall: float = 0.5  # 0-1
    source_reliability: float = 0.5  # how far the source is trusted, 0-1
    recency: float = 1.0  # time-decay factor, 1 = just seen, refreshed by the decay pass
    corroboration_count: int = 0  # times confirmed after the first statement
    contradiction_count: int = 0  # times contradicted


@dataclass(frozen=True, slots=True)
class MemorySource:
    """Where a memory, or one corroboration of it, came from."""

    kind: str  # "interaction" | "api" | "cli" | "import" | "consolidation"
    ref: str | None = None  # request id of the interaction, or the importing file's name
    extractor: str | None = None  # "rules", "llm:<model>", None for direct writes
    conversation_id: str | None = None
    recorded_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ScoreParts:
    """Why a memory was retrieved: each signal in [0, 1] and the fused total."""

    total: float
    vector: float = 0.0  # cosine similarity to the query
    text: float = 0.0  # BM25 over the query, saturated: bm25 / (bm25 + 2)
    recency: float = 0.0
    importance: float = 0.0
    confidence: float = 0.0
    frequency: float = 0.0  # access count, log-scaled
    tier: float = 0.0
    link: float = 0.0  # reached through a link from a stronger hit
    via: str | None = None  # the memory id that link came from

    def as_dict(self) -> dict[str, float | str | None]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class MemoryEntry:
    id: str
    user_id: str
    content: str
    content_hash: str
    tier: Tier
    truth_category: TruthCategory
    memory_type: MemoryType
    confidence: Confidence
    created_at: datetime
    updated_at: datetime
    valid_from: datetime
    recorded_at: datetime
    summary: str | None = None
    importance: float = 0.5
    tags: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    entities: tuple[str, ...] = ()
    subject: str | None = None  # "user", "user.dog": what the fact is about
    relation: str | None = None  # "lives_in", "name": single-valued relations can be superseded
    value: str | None = None
    validated: bool = False  # confirmed by the user
    valid_to: datetime | None = None  # set when superseded
    superseded_by: str | None = None
    supersedes: str | None = None
    expires_at: datetime | None = None  # short-term TTL
    last_accessed: datetime | None = None
    access_count: int = 0
    related_memories: tuple[str, ...] = ()
    contradicts: tuple[str, ...] = ()
    supports: tuple[str, ...] = ()
    sources: tuple[MemorySource, ...] = field(default=())
    score: ScoreParts | None = None  # set on search results
    sensitivity: Sensitivity = Sensitivity.NONE  # egress label: which upstreams may be told this

    @property
    def is_current(self) -> bool:
        return self.valid_to is None


_TIMES = ("created_at", "updated_at", "valid_from", "recorded_at", "valid_to", "expires_at",
          "last_accessed")


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def entry_to_dict(entry: MemoryEntry) -> dict:
    """A JSON-ready dict of every field (times as ISO 8601 UTC without offset)."""
    out: dict = {}
    for name in entry.__slots__:  # type: ignore[attr-defined]
        value = getattr(entry, name)
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, StrEnum):
            value = value.value
        elif isinstance(value, Confidence | ScoreParts):
            value = {n: getattr(value, n) for n in value.__slots__}  # type: ignore[attr-defined]
        elif name == "sources":
            value = [
                {n: (v.isoformat() if isinstance(v, datetime) else v)
                 for n in s.__slots__ for v in (getattr(s, n),)}  # type: ignore[attr-defined]
                for s in value
            ]
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return out


def entry_from_dict(data: dict) -> MemoryEntry:
    """The inverse of `entry_to_dict` (the score, if any, is dropped)."""
    fields = dict(data)
    fields.pop("score", None)
    for name in _TIMES:
        fields[name] = _time(fields.get(name))
    fields["tier"] = Tier(fields["tier"])
    fields["truth_category"] = TruthCategory(fields["truth_category"])
    fields["memory_type"] = MemoryType(fields["memory_type"])
    fields["sensitivity"] = Sensitivity(fields.get("sensitivity") or Sensitivity.NONE)
    fields["confidence"] = Confidence(**fields["confidence"])
    fields["sources"] = tuple(
        MemorySource(**{**s, "recorded_at": _time(s.get("recorded_at"))})
        for s in fields.get("sources", ())
    )
    for name in ("tags", "domains", "entities", "related_memories", "contradicts", "supports"):
        fields[name] = tuple(fields.get(name, ()))
    return MemoryEntry(**fields)
