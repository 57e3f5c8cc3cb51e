"""The user's domain activations as seed 004's pruning step reads them.

The store counts activations (`memory.domains`); this module turns them into shares and the
seed's decision: keep a domain above `keep_share` (5%), prune one under `prune_share` (1%),
and leave the rest undecided until there is more data.
"""

from __future__ import annotations

from dataclasses import dataclass

from memory import DomainCount, MemoryStore

__all__ = ["DomainShare", "domain_report"]


@dataclass(frozen=True, slots=True)
class DomainShare:
    domain: str
    retrieval: int
    memory: int
    total: int
    share: float  # of all the user's activations, 0-1
    decision: str  # "keep" | "prune" | "undecided"

    def as_dict(self) -> dict:
        return {"domain": self.domain, "retrieval": self.retrieval, "memory": self.memory,
                "total": self.total, "share": round(self.share, 4), "decision": self.decision}


def domain_report(
    store: MemoryStore, user_id: str, *, keep_share: float = 0.05, prune_share: float = 0.01
) -> list[DomainShare]:
    """The user's domains, most activated first, with their share and pruning decision."""
    counts: list[DomainCount] = store.domain_activations(user_id)
    total = sum(c.total for c in counts)
    out = []
    for c in counts:
        share = c.total / total if total else 0.0
        decision = "keep" if share > keep_share else "prune" if share < prune_share else "undecided"
        out.append(DomainShare(c.domain, c.retrieval, c.memory, c.total, share, decision))
    return out
