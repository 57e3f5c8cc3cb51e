"""The gate's view of a memory: which question it answers, its key value, held-out phrasings.

A memory is a third-person statement ("The user's cat is named Biscuit."). `fact_of` finds the
question it answers by a few patterns (possessive attribute, where the user lives or works,
allergies, what they drive or play...), giving a `Fact`: a topic and the answer's key value
("Biscuit"), which a right answer must contain (`contains_value`). The gate asks each fact with
PROBE phrasings only: training phrasings come from the learner's dataset
(`learner.datasets.questions_for`), which never holds a probe (the update drops any example
that would, and tests/adapters/test_plm_facts.py checks the two pools apart), so recall is
measured on wordings the adapter never saw. A memory no pattern reads is still trained on, and
is not probed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from memory import MemoryEntry

__all__ = ["Correction", "Fact", "contains_value", "corrections_of", "fact_of", "probes"]


@dataclass(frozen=True, slots=True)
class Fact:
    memory_id: str
    kind: str  # which question family: "attr", "name", "residence", ...
    topic: str  # "cat", "favourite colour", "" for kinds without one
    value: str  # the key words a right answer contains: "Biscuit"
    answer: str  # "Your cat is named Biscuit."


@dataclass(frozen=True, slots=True)
class Correction:
    """A memory that replaced another: the adapter must give the new value, not the old one."""

    fact: Fact
    old_value: str


_S = r"(?:also |now |still |currently )?"
# (kind, pattern on the memory text, answer template); groups: topic, value
_PATTERNS: tuple[tuple[str, re.Pattern[str], str], ...] = tuple(
    (kind, re.compile(pattern, re.IGNORECASE), answer)
    for kind, pattern, answer in (
        ("name", r"^the user's (?P<topic>[\w -]+?) is (?:called|named) (?P<value>.+?)\.?$",
         "Your {topic} is named {value}."),
        ("name", r"^the user has an? (?P<topic>[\w -]+?) (?:called|named) (?P<value>.+?)\.?$",
         "Your {topic} is named {value}."),
        ("attr", r"^the user's (?P<topic>[\w -]+?) is (?P<value>.+?)\.?$", "Your {topic} is {value}."),
        ("residence", rf"^the user {_S}(?:lives|resides) in (?P<value>.+?)\.?$", "You live in {value}."),
        ("occupation", rf"^the user {_S}works as (?:an? )?(?P<value>.+?)\.?$", "You work as {value}."),
        ("employer", rf"^the user {_S}works (?:at|for) (?P<value>.+?)\.?$", "You work at {value}."),
        ("allergy", rf"^the user is {_S}allergic to (?P<value>.+?)\.?$", "You are allergic to {value}."),
        ("vehicle", rf"^the user {_S}drives (?P<value>.+?)\.?$", "You drive {value}."),
        ("birthplace", r"^the user was born in (?P<value>.+?)\.?$", "You were born in {value}."),
        ("plays", rf"^the user {_S}plays (?P<value>.+?)\.?$", "You play {value}."),
        ("speaks", rf"^the user {_S}speaks (?P<value>.+?)\.?$", "You speak {value}."),
    )
)

# Held-out question phrasings per kind, asked by the gate only. {t} is the topic.
PROBE: dict[str, tuple[str, ...]] = {
    "name": ("Remind me, what was my {t}'s name again?", "I forgot: how is my {t} named?"),
    "attr": ("Remind me, what was my {t} again?", "I forgot: what's my {t}?"),
    "residence": ("Remind me, where am I based?", "I forgot: in which place do I live?"),
    "occupation": ("Remind me, what's my line of work?", "I forgot: what job do I have?"),
    "employer": ("Remind me, which organisation employs me?", "I forgot: where's my job at?"),
    "allergy": ("Remind me, which food am I allergic to?", "I forgot: what gives me allergies?"),
    "vehicle": ("Remind me, what car have I got?", "I forgot: what do I drive around in?"),
    "birthplace": ("Remind me, where was I born again?", "I forgot: what's my place of birth?"),
    "plays": ("Remind me, what do I play again?", "I forgot: which thing do I play?"),
    "speaks": ("Remind me, what languages do I know?", "I forgot: which language do I speak?"),
}


def fact_of(entry: MemoryEntry) -> Fact | None:
    """The question a memory answers, if a pattern reads it."""
    text = " ".join(entry.content.split())
    for kind, pattern, answer in _PATTERNS:
        match = pattern.match(text)
        if match is None:
            continue
        groups = match.groupdict()
        topic = (groups.get("topic") or "").strip().lower()
        value = groups["value"].strip()
        if not value or len(topic.split()) > 3:
            continue
        return Fact(entry.id, kind, topic, value, answer.format(topic=topic, value=value))
    return None


def probes(fact: Fact) -> list[str]:
    """Questions the gate may ask about a fact: never used for training."""
    return [p.format(t=fact.topic) for p in PROBE[fact.kind]]


def contains_value(answer: str, value: str) -> bool:
    """Whether an answer states the value (case, punctuation and articles ignored)."""
    def norm(s: str) -> str:
        s = re.sub(r"[^\w\s]", " ", s.lower())
        return " ".join(w for w in s.split() if w not in {"a", "an", "the"})

    return f" {norm(value)} " in f" {norm(answer)} "


def corrections_of(current: list[MemoryEntry], history: list[MemoryEntry]) -> list[Correction]:
    """Current facts that superseded an older memory with another value for the same question."""
    by_id = {e.id: e for e in current}
    out = []
    for old in history:
        new = by_id.get(old.superseded_by or "")
        if old.valid_to is None or new is None:
            continue
        new_fact, old_fact = fact_of(new), fact_of(old)
        if new_fact and old_fact and (new_fact.kind, new_fact.topic) == (old_fact.kind, old_fact.topic) \
                and not contains_value(new_fact.value, old_fact.value):
            out.append(Correction(new_fact, old_fact.value))
    return out
