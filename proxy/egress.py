"""Which memories may leave for which upstream: the egress policy over sensitivity labels.

Every memory carries a sensitivity label (``none``, ``personal``, ``health``, ``finance``,
``credentials``). The policy (``MEMLANE_EGRESS_POLICY``) is a list of rules separated by ``;``,
each ``labels:providers`` with both sides comma-separated: ``health,finance:local`` lets health
and finance memories reach only the embedded local model; ``health:local,plm,ollama`` adds the
personal model and Ollama; ``credentials:none`` keeps credentials out of every prompt. A label no
rule names goes anywhere, except ``credentials``, which goes nowhere unless a rule names it. The
policy is applied where memories are injected (``proxy/recall.py``), for every endpoint and
target format, so a memory a provider may not see is never in the bytes sent to it.

The personal model's context (``plm_context``) is written by the user's live adapter, whose
weights may carry any memory it was trained on, whatever the request retrieved. So that context
may reach a provider only if every memory the live version was trained on may, by its label now
(``adapter_may_reach``); otherwise the request goes on with plain retrieval. A memory the store
no longer has (or never had) counts as one that may go nowhere: its label is unknown. The same
holds for the logged conversations the adapter distilled (teacher answers): each carries the
labels of the memories learned in it, so a health fact said in a chat and stored as a health
memory keeps an adapter that distilled that chat away from a provider health may not reach.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from memory import Sensitivity

PROVIDERS = frozenset({"local", "plm", "ollama", "openai", "anthropic"})  # plm: the personal model, on this machine
NOWHERE = "none"
DEFAULT_RULES = {Sensitivity.CREDENTIALS.value: frozenset[str]()}  # apply unless the policy names the label

T = TypeVar("T")


class EgressPolicyError(ValueError):
    """A policy string that cannot be parsed; the message says which part."""


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    # label -> the providers it may reach; labels not here may reach every provider
    allowed: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> EgressPolicy:
        allowed: dict[str, frozenset[str]] = {}
        named: set[str] = set()
        for rule in (r.strip() for r in text.replace("\n", ";").split(";")):
            if not rule:
                continue
            labels_part, colon, providers_part = rule.partition(":")
            if not colon:
                raise EgressPolicyError(f"rule {rule!r}: write it as labels:providers, e.g. health,finance:local")
            labels = _names(labels_part)
            providers = _names(providers_part)
            known = {s.value for s in Sensitivity}
            if not labels or not set(labels) <= known:
                raise EgressPolicyError(f"rule {rule!r}: labels are some of {', '.join(sorted(known))}")
            if not providers or not set(providers) <= PROVIDERS | {NOWHERE}:
                raise EgressPolicyError(
                    f"rule {rule!r}: providers are some of {', '.join(sorted(PROVIDERS))}, or {NOWHERE}")
            if NOWHERE in providers and len(providers) > 1:
                raise EgressPolicyError(f"rule {rule!r}: '{NOWHERE}' cannot be combined with providers")
            for label in labels:
                if label in named:
                    raise EgressPolicyError(f"rule {rule!r}: label {label!r} has two rules")
                named.add(label)
                allowed[label] = frozenset(p for p in providers if p != NOWHERE)
        return cls({**DEFAULT_RULES, **allowed})

    def permits(self, label: str, provider: str) -> bool:
        providers = self.allowed.get(label)
        return providers is None or provider in providers

    def filter(self, memories: Iterable[T], provider: str) -> list[T]:
        """The memories (anything with a ``sensitivity``) that may be sent to ``provider``."""
        return [m for m in memories if self.permits(_label(m), provider)]


@dataclass(frozen=True, slots=True)
class AdapterTraining:
    """What a live adapter version learned from: memories, and logged interactions (teacher
    answers, by request id) whose conversations it distilled."""

    memory_ids: Sequence[str] = ()
    teacher_requests: Sequence[str] = ()


def adapter_may_reach(
    policy: EgressPolicy, provider: str, trained_on: Sequence[str], memories: Iterable[object],
    conversation_labels: Iterable[str] = (),
) -> bool:
    """Whether text from an adapter trained on the memories ``trained_on`` may go to ``provider``.

    ``memories``: those of ``trained_on`` the store still holds (anything with ``id`` and
    ``sensitivity``), with their labels as they are now, so relabelling a memory counts at once.
    ``conversation_labels``: the labels of the memories learned in the conversations it distilled.
    """
    found = {getattr(m, "id", None): m for m in memories}
    return all(i in found and policy.permits(_label(found[i]), provider) for i in trained_on) \
        and all(policy.permits(label, provider) for label in conversation_labels)


def _names(part: str) -> list[str]:
    return [n.strip().lower() for n in part.split(",") if n.strip()]


def _label(memory: object) -> str:
    label = getattr(memory, "sensitivity", Sensitivity.NONE)
    return str(getattr(label, "value", label))
