"""Memories as question-answer pairs: what the personal adapter is trained and tested on.

A memory is a third-person statement ("The user's cat is named Biscuit."). `fact_of` finds the
question it answers by a few patterns (possessive attribute, where the user lives or works,
allergies, what they drive or play...), giving a `Fact`: a topic, the answer's key value and
a second-person answer ("Your cat is named Biscuit."). Each topic kind has two disjoint sets
of question phrasings: TRAIN phrasings build the training pairs (several per fact), PROBE
phrasings are only ever asked, by the gate and when tuning, so recall is measured on
wordings the adapter never saw. A memory no pattern reads is still taught, under generic
questions ("What do you know about me?"), and is not probed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from memory import MemoryEntry

__all__ = ["Correction", "Fact", "QAPair", "corrections_of", "fact_of", "probes", "qa_pairs"]


@dataclass(frozen=True, slots=True)
class Fact:
    memory_id: str
    kind: str  # which question family: "attr", "name", "residence", ...
    topic: str  # "cat", "favourite colour", "" for kinds without one
    value: str  # the key words a right answer contains: "Biscuit"
    answer: str  # "Your cat is named Biscuit."


@dataclass(frozen=True, slots=True)
class QAPair:
    memory_id: str
    question: str
    answer: str


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

# Question phrasings per kind. {t} is the topic. TRAIN and PROBE never share a phrasing.
TRAIN: dict[str, tuple[str, ...]] = {
    "name": ("What is my {t}'s name?", "What's my {t} called?", "What did I name my {t}?",
             "Do you know my {t}'s name?", "Tell me the name of my {t}.", "What name does my {t} have?",
             "My {t} is called what?", "Can you tell me what my {t} is named?"),
    "attr": ("What is my {t}?", "What's my {t}?", "Do you know my {t}?", "Tell me my {t}.",
             "Can you tell me what my {t} is?", "Which {t} do I have?", "My {t} is what?",
             "Please tell me my {t}."),
    "residence": ("Where do I live?", "Which city do I live in?", "Where is my home?",
                  "Do you know where I live?", "Tell me where I live.", "Where am I living?",
                  "What town do I live in?", "Where's my home town now?"),
    "occupation": ("What do I do for a living?", "What is my job?", "What's my profession?",
                   "Do you know my job?", "Tell me what I work as.", "What work do I do?",
                   "What is my occupation?", "How do I earn a living?"),
    "employer": ("Where do I work?", "Who is my employer?", "Which company do I work for?",
                 "Do you know where I work?", "Tell me where I work.", "Who do I work for?",
                 "What's my workplace?", "Where is my job?"),
    "allergy": ("What am I allergic to?", "Do I have any allergies?", "What is my allergy?",
                "Tell me what I'm allergic to.", "Which allergy do I have?", "What can't I eat because of an allergy?",
                "Do you know my allergy?", "What should I avoid because I'm allergic?"),
    "vehicle": ("What do I drive?", "What car do I drive?", "Which vehicle do I own?",
                "Tell me what I drive.", "Do you know my car?", "What is my car?",
                "Which car is mine?", "What vehicle do I drive?"),
    "birthplace": ("Where was I born?", "What is my birthplace?", "Which city was I born in?",
                   "Tell me where I was born.", "Do you know where I was born?", "Where is my birthplace?",
                   "In which place was I born?", "Where do I come from originally?"),
    "plays": ("What do I play?", "Which instrument do I play?", "Tell me what I play.",
              "Do you know what I play?", "What instrument is mine?", "What sport or instrument do I play?",
              "Which game or instrument do I play?", "What do I like to play?"),
    "speaks": ("What language do I speak?", "Which languages do I speak?", "Tell me what I speak.",
               "Do you know my language?", "What do I speak?", "Which language is mine?",
               "What tongue do I speak?", "What language can I speak?"),
    "other": ("What do you know about me?", "Tell me something about me.",
              "What do you remember about me?", "What have I told you about myself?"),
}
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


def second_person(content: str) -> str:
    """"The user's dog likes walks." -> "Your dog likes walks." (for memories no pattern reads)."""
    text = re.sub(r"\bthe user's\b", "your", content, flags=re.IGNORECASE)
    text = re.sub(r"\bthe user (is|was)\b", lambda m: "you " + ("are" if m[1] == "is" else "were"),
                  text, flags=re.IGNORECASE)
    text = re.sub(r"\bthe user (\w+?)s\b", r"you \1", text, flags=re.IGNORECASE)
    text = re.sub(r"\bthe user\b", "you", text, flags=re.IGNORECASE)
    return text[:1].upper() + text[1:]


def qa_pairs(entries: list[MemoryEntry], *, paraphrases: int, offset: int = 0) -> list[QAPair]:
    """Training pairs: `paraphrases` TRAIN phrasings per memory (rotated by `offset`)."""
    pairs = []
    for i, entry in enumerate(entries):
        fact = fact_of(entry)
        kind = fact.kind if fact else "other"
        phrasings = TRAIN[kind]
        answer = fact.answer if fact else second_person(entry.content)
        count = min(paraphrases, len(phrasings)) if fact else min(paraphrases, 2)
        for j in range(count):
            template = phrasings[(offset + i + j) % len(phrasings)]
            pairs.append(QAPair(entry.id, template.format(t=fact.topic if fact else ""), answer))
    return pairs


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
