"""One interface for turning the user's latest turn into facts, and the schema of a fact.

Two implementations: `RulesExtractor` (the local rule extractor of `learner.extract`, no model)
and `learner.llm_extract.LLMExtractor` (the teacher upstream or the local model, asked for JSON).
Both return `ExtractedFact`s, the one shape the queue applies to the store, whether the facts
come from this process or from an external `memlane learner` over HTTP (where the server
validates them again with the same schema before writing).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from learner.extract import Fact, extract_facts
from memory import MemoryType, TruthCategory

__all__ = ["ExtractedFact", "ExtractionError", "Extractor", "RulesExtractor"]

MAX_FACTS = 20  # per utterance; more is a runaway model, not a talkative user
_THIRD_PERSON = re.compile(r"^the user(?:'s)?\b", re.IGNORECASE)


class ExtractionError(Exception):
    """The extractor could not give a valid answer (bad JSON, schema violation, upstream down).
    The job is retried with backoff and dead-lettered after its last attempt."""


class ExtractedFact(BaseModel):
    """One fact about the user, as the learner stores it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    statement: str = Field(min_length=8, max_length=400)  # "The user is allergic to peanuts."
    subject: str = Field(default="user", min_length=1, max_length=100)  # "user", "user.dog"
    relation: str = Field(default="", max_length=100)
    object: str = Field(default="", max_length=300)
    memory_type: MemoryType | None = None  # None: classified from the statement
    truth_category: TruthCategory | None = None
    confidence: float = Field(default=0.6, ge=0.0, le=1.0)
    domains: tuple[str, ...] = Field(default=(), max_length=16)
    entities: tuple[str, ...] = Field(default=(), max_length=32)
    evidence: str = Field(default="", max_length=1000)  # the user's own words it rests on
    kind: str | None = None  # the rule extractor's kind: fact, preference, skill, event, negation

    @field_validator("memory_type", "truth_category", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("statement")
    @classmethod
    def _about_the_user(cls, value: str) -> str:
        value = " ".join(value.split())
        if not _THIRD_PERSON.match(value):
            raise ValueError("a statement starts with 'The user' (third person)")
        if "?" in value:
            raise ValueError("a statement is not a question")
        return value[0].upper() + value[1:]

    @field_validator("subject")
    @classmethod
    def _subject(cls, value: str) -> str:
        value = value.strip().lower().replace(" ", "_")
        if value in ("i", "me", "the_user", "myself"):
            return "user"
        return value

    @field_validator("domains", "entities", mode="before")
    @classmethod
    def _labels(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            return tuple(str(v).strip()[:100] for v in value if str(v).strip())
        return value


class Extractor(Protocol):
    """Turns the user's latest turn into facts; raises `ExtractionError` when it cannot."""

    name: str  # recorded as the memory's `extractor` provenance: "rules", "llm:<model>"

    def extract(self, text: str) -> list[ExtractedFact]: ...


class RulesExtractor:
    """The local rule extractor (`learner.extract.extract_facts`) behind the interface."""

    name = "rules"

    def __init__(self, rules: Callable[[str], list[Fact]] = extract_facts) -> None:
        self._rules = rules

    def extract(self, text: str) -> list[ExtractedFact]:
        return [
            ExtractedFact(statement=f.content, evidence=f.evidence, kind=f.kind)
            for f in self._rules(text)
        ][:MAX_FACTS]
