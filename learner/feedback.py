"""Feedback on an answer: a training weight for the interaction, and corrected memories.

Seed 004's rule: "good" weighs the interaction x1.5 in the training data, "bad" x0.5, and a
correction x3.0, the correction becoming the training target in place of the answer. A
correction also corrects the memories involved in that request: the memories injected into it
and the memories extracted from it. The correction's own statements about the user are
remembered (written by the user, so validated); a single-valued relation supersedes as usual
("I live in Milan" replaces "lives in Rome"), and any other involved memory close in meaning to
a corrected statement (cosine >= `CORRECTS_COSINE`) is superseded by it too ("I'm allergic to
cashews, not peanuts" replaces "allergic to peanuts"). Superseded memories stay as history.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from html import unescape
from typing import Any

import numpy as np
import structlog

from learner.extract import extract_facts
from memory import FeedbackRecord, Link, MemorySource, MemoryStore, content_hash

__all__ = [
    "CORRECTS_COSINE",
    "RATINGS",
    "WEIGHTS",
    "FeedbackResult",
    "UnknownResponse",
    "give_feedback",
    "injected_memories",
    "weight_of",
]

log = structlog.get_logger("memlane.feedback")

RATINGS = ("good", "bad")
WEIGHTS = {"good": 1.5, "bad": 0.5, "correction": 3.0}
CORRECTS_COSINE = 0.6  # an involved memory this close to a corrected statement is replaced
MAX_CORRECTION_CHARS = 4000

# Lines of memlane's injected block in each target's format (`proxy.enrich.format_block`).
_BLOCK_LINE_RES = (
    re.compile(r"<memlane_memories>\n(?P<body>.*?)\n</memlane_memories>", re.DOTALL),
    re.compile(r"<user_profile>\n(?P<body>.*?)\n</user_profile>", re.DOTALL),
    re.compile(r"What you know about the user from earlier conversations:\n(?P<body>.*)", re.DOTALL),
)
_ITEM_RE = re.compile(r"^\s*(?:- |<memory>)(?P<text>.*?)(?:</memory>)?\s*$")


class UnknownResponse(LookupError):
    """No logged interaction of this user has that response id."""


@dataclass(frozen=True, slots=True)
class FeedbackResult:
    request_id: str
    rating: str | None
    weight: float
    created: tuple[str, ...]  # memories the correction wrote
    superseded: tuple[str, ...]  # memories it replaced
    involved: tuple[str, ...]  # memories injected into or extracted from the request


def weight_of(rating: str | None, correction: str | None) -> float:
    """x3.0 for a correction (whatever the rating), else x1.5 good, x0.5 bad."""
    if correction:
        return WEIGHTS["correction"]
    if rating not in RATINGS:
        raise ValueError("feedback needs a rating (good or bad) or a correction")
    return WEIGHTS[rating]


def injected_memories(store: MemoryStore, user_id: str, request_sent: dict | None) -> list[str]:
    """Ids of the user's current memories whose text memlane injected into this request."""
    ids: list[str] = []
    for text in _block_lines(request_sent or {}):
        found = store.current_by_hash(user_id, content_hash(text))
        if found is not None and found.id not in ids:
            ids.append(found.id)
    return ids


def _block_lines(request: dict) -> list[str]:
    texts: list[str] = []
    system = request.get("system")
    if isinstance(system, str):
        texts.append(system)
    elif isinstance(system, list):
        texts += [b.get("text", "") for b in system if isinstance(b, dict)]
    for message in request.get("messages") or []:
        if isinstance(message, dict) and message.get("role") == "system" and isinstance(message.get("content"), str):
            texts.append(message["content"])
    lines: list[str] = []
    for text in texts:
        for block_re in _BLOCK_LINE_RES:
            for block in block_re.finditer(text):
                for line in block["body"].splitlines():
                    item = _ITEM_RE.match(line)
                    if item and item["text"].strip():
                        lines.append(unescape(item["text"].strip()))
    return lines


def give_feedback(
    store: MemoryStore, user_id: str, response_id: str, *,
    rating: str | None = None, correction: str | None = None,
) -> FeedbackResult:
    """Record feedback on one of the user's responses; a correction corrects its memories."""
    correction = correction.strip() if correction else None
    weight = weight_of(rating, correction)
    interaction = store.interaction_for_response(response_id)
    if interaction is None or interaction["user_id"] != user_id:
        raise UnknownResponse(f"no logged response {response_id!r} for this user")
    request_id = interaction["request_id"]
    involved = list(dict.fromkeys(
        injected_memories(store, user_id, interaction["request_sent"])
        + store.memories_from_request(user_id, request_id)
    ))
    created: list[str] = []
    superseded: list[str] = []
    if correction:
        created, superseded = _correct(store, user_id, request_id, correction, involved)
    now = store.clock.now()
    earlier = store.feedback_of(user_id).get(request_id)
    store.save_feedback(FeedbackRecord(
        request_id=request_id, user_id=user_id, rating=rating, correction=correction, weight=weight,
        result={"created": created, "superseded": superseded, "involved": involved},
        created_at=earlier.created_at if earlier else now, updated_at=now,
    ))
    log.info("feedback_recorded", rating=rating, correction_chars=len(correction or ""), weight=weight,
             involved=len(involved), created=len(created), superseded=len(superseded))
    return FeedbackResult(request_id, rating, weight, tuple(created), tuple(superseded), tuple(involved))


def _statements(correction: str) -> list[tuple[str, str | None]]:
    """(third-person sentence, kind) the correction states about the user."""
    facts = [(f.content, f.kind) for f in extract_facts(correction)]
    if not facts and re.match(r"^the user\b", correction, re.IGNORECASE) and "?" not in correction:
        facts = [(correction, None)]  # already written the way memories are
    return facts


def _correct(
    store: MemoryStore, user_id: str, request_id: str, correction: str, involved: list[str],
) -> tuple[list[str], list[str]]:
    created: list[str] = []
    superseded: list[str] = []
    source = MemorySource("api", request_id, "feedback")
    for content, kind in _statements(correction):
        vector = store.embedder.embed([content])[0]
        entry, is_new = store.add(user_id, content, source=source, embedding=vector, kind=kind)
        if is_new:
            created.append(entry.id)
        replaced = store.entries_where("user_id = ? AND superseded_by = ?", [user_id, entry.id])
        superseded += [e.id for e in replaced if e.id not in superseded]
        for other in _close(store, user_id, vector, involved, exclude={entry.id, *superseded}):
            _supersede(store, user_id, other, entry.id, store.clock.now())
            superseded.append(other)
    return created, superseded


def _close(store: MemoryStore, user_id: str, vector: np.ndarray, ids: list[str], exclude: set[str]) -> list[str]:
    candidates = [i for i in ids if i not in exclude]
    scores = store.similarities(user_id, vector, candidates)
    return [i for i in candidates if scores.get(i, 0.0) >= CORRECTS_COSINE]


def _supersede(store: MemoryStore, user_id: str, old_id: str, new_id: str, now: datetime) -> None:
    old = store.get(user_id, old_id)
    if old is None or not old.is_current:
        return
    changes: dict[str, Any] = {"valid_to": now, "superseded_by": new_id, "updated_at": now,
                               "contradiction_count": old.confidence.contradiction_count + 1}
    store.update_entry(user_id, old_id, **changes)
    store.add_links(user_id, [Link(new_id, old_id, "contradicts"), Link(new_id, old_id, "supersedes")])
