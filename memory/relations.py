"""Reading a memory's sentence: its dedup hash, what it is about, and how to classify it.

Memories are third-person sentences ("The user lives in Paris."). `parse_relation` finds a
single-valued relation in one (subject "user", relation "residence", value "paris"): two
current memories with the same subject and relation but different values contradict each
other, and the newer one supersedes the older ("The user moved to Berlin." against "The user
lives in Paris."). Relations that can hold many values at once ("is allergic to", "likes")
are not single-valued and never supersede.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from hashlib import sha256

from memory.entry import MemoryType, TruthCategory

__all__ = ["Relation", "classify", "content_hash", "parse_relation"]

_SPACE = re.compile(r"\s+")


def content_hash(content: str) -> str:
    """sha256 of content lower-cased, whitespace collapsed, trailing punctuation cut."""
    text = _SPACE.sub(" ", content.lower()).strip()
    end = len(text)
    while end and (text[end - 1].isspace() or unicodedata.category(text[end - 1])[0] == "P"):
        end -= 1
    return sha256(text[:end].encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Relation:
    subject: str  # "user", "user.dog", "user.sister"
    relation: str  # "residence", "employer", "name", "favorite_color", ...
    value: str  # normalised: lower case, no time phrase, no trailing punctuation


_MONTHS = (
    "january|february|march|april|may|june|july|august|september|october|november|december"
)
_ADVERB = r"(?:(?:now|still|recently|currently|also|finally|just|actually) )*"
_WHEN = (
    rf"(?:\s+(?:in|since|back in)\s+(?:{_MONTHS})"
    r"|\s+(?:last|this|next|this past)\s+(?:year|month|week|summer|winter|spring|fall|autumn)"
    r"|\s+(?:in|since)\s+\d{4}|\s+recently|\s+now|\s+\d+\s+\w+\s+ago|\s+a\s+while\s+ago)*"
)
_VALUE = rf"(?P<value>.+?){_WHEN}\.?$"
_POSSESSIVE = r"the user's (?P<owner>(?:[a-z-]+\s){0,2}?[a-z-]+)"

# (pattern, relation, subject) tried in order on the lower-cased sentence; subject None
# means "user.<owner>" from the possessive.
_PATTERNS: tuple[tuple[re.Pattern[str], str, str | None], ...] = tuple(
    (re.compile(pattern), relation, subject)
    for pattern, relation, subject in (
        (rf"^the user {_ADVERB}(?:lives|has lived|is living|resides|is based|has moved|moved|"
         rf"relocated|has relocated) (?:in|to) {_VALUE}", "residence", "user"),
        (rf"^the user {_ADVERB}(?:works|is working) (?:at|for) {_VALUE}", "employer", "user"),
        (rf"^the user {_ADVERB}(?:has )?(?:joined|started working at|"
         rf"(?:got|has|started|took|accepted) (?:a |the )?(?:new )?(?:job|position|role) (?:at|with)) "
         rf"{_VALUE}", "employer", "user"),
        (rf"^the user {_ADVERB}works as (?:an? )?{_VALUE}", "occupation", "user"),
        (rf"^the user is (?P<value>\d{{1,3}})(?: years old)?{_WHEN}\.?$", "age", "user"),
        (rf"^the user's (?P<attr>name|age|birthday|email|email address|phone number|job|"
         rf"employer|address|hometown|nationality|partner|wife|husband|boyfriend|girlfriend|"
         rf"(?:favou?rite|preferred) [a-z -]+?) is {_VALUE}", "", "user"),
        (rf"^{_POSSESSIVE} is (?:called|named) {_VALUE}", "name", None),
        (rf"^{_POSSESSIVE}'s name is {_VALUE}", "name", None),
        (rf"^the user (?:now )?(?:drives|owns) an? (?P<value>(?:car|bike|phone)\b.+?|.+?){_WHEN}\.?$",
         "", "user"),
    )
)


def _normal(value: str) -> str:
    value = _SPACE.sub(" ", value.strip().lower()).strip(" .,!;:")
    return value.removeprefix("the ").removeprefix("a ").removeprefix("an ")


def parse_relation(content: str) -> Relation | None:
    """The single-valued relation a memory states, if it states one."""
    text = _SPACE.sub(" ", content.strip().lower())
    for pattern, relation, subject in _PATTERNS:
        match = pattern.match(text)
        if match is None:
            continue
        groups = match.groupdict()
        if relation == "" and groups.get("attr"):
            relation = groups["attr"].replace("favourite", "favorite").replace(" ", "_")
        elif relation == "":
            verb = "drives" if " drives " in text else "owns"
            if verb == "owns":
                return None  # owning one thing does not exclude owning another
            relation = "vehicle"
        owner = groups.get("owner")
        subject = subject or f"user.{owner.replace(' ', '_')}"  # type: ignore[union-attr]
        value = _normal(groups["value"])
        if not value:
            return None
        return Relation(subject, relation, value)
    return None


# Extractor kinds ("fact", "preference", ...) to memory types.
_KIND_TYPES = {
    "fact": MemoryType.FACT,
    "preference": MemoryType.PREFERENCE,
    "skill": MemoryType.SKILL,
    "event": MemoryType.EVENT,
    "negation": MemoryType.FACT,
    "belief": MemoryType.BELIEF,
    "context": MemoryType.CONTEXT,
}
_BELIEF_RE = re.compile(r"^the user (?:believes|thinks|feels|is convinced|considers)\b")
_IDENTITY_RELATIONS = frozenset({"name", "age", "birthday", "nationality", "hometown"})
_ABSOLUTE_RE = re.compile(
    r"\b(?:was born|born in|\d{4}|birthday|is \d{1,3}(?: years old)?\b|allergic|name is|"
    r"is called|is named|weighs|is \d+(?:\.\d+)? ?(?:cm|m|kg|lb)s?\b)"
)


def classify(content: str, kind: str | None = None) -> tuple[MemoryType, TruthCategory, tuple[str, ...]]:
    """Memory type, truth category and tags of a memory sentence (the extractor's `kind`,
    when given, decides the type). Facts about who the user is are tagged `identity`."""
    text = _SPACE.sub(" ", content.strip().lower())
    memory_type = _KIND_TYPES.get(kind or "", MemoryType.FACT)
    if _BELIEF_RE.match(text):
        memory_type = MemoryType.BELIEF
    if memory_type in (MemoryType.PREFERENCE, MemoryType.BELIEF):
        truth = TruthCategory.OPINION
    elif _ABSOLUTE_RE.search(text):
        truth = TruthCategory.ABSOLUTE
    else:
        truth = TruthCategory.CONTEXTUAL
    relation = parse_relation(content)
    tags: tuple[str, ...] = ()
    if relation is not None and relation.subject == "user" and relation.relation in _IDENTITY_RELATIONS:
        tags = ("identity",)
    return memory_type, truth, tags
