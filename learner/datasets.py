"""Distillation datasets for a user's personal model, from their memories and the teacher log.

Two sources of examples:

- memories: each current memory becomes question-answer pairs, `paraphrases` questions per
  fact, from templates chosen by the memory's relation (`memory.relations`: residence,
  employer, name, favorite_*, ...) or by patterns on its sentence (allergies, languages, ...),
  then by its type; the answer is the memory turned to the second person ("You live in Paris.").
  Weight: confidence x type weight (seed 004: FACT and PREFERENCE high, BELIEF medium-high,
  SKILL and CONTEXT medium, EVENT low) x the feedback weight of the interaction it came from.
- the teacher log: each successful answer of an upstream model (memlane's own local models are
  not teachers) to the conversation as the client sent it (without the injected memory block,
  which the personal model is meant to replace), with the teacher's top log-probabilities where
  the upstream returned them. Weight: the feedback weight (x1.5 good, x0.5 bad, x3.0 with a
  correction, which then replaces the answer as the target).

Every example carries both formats: instruction (`instruction`, `input`, `output`) and chat
(`messages`; `conversation()` gives its turns before the answer without the dataset's system
prompt: what the personal adapter is trained on, `adapters/plm/update.py`). The build is
deterministic: the same store gives byte-identical JSONL (sorted examples, sorted keys, no
clock), and `version` is a hash of those bytes.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memory import FeedbackRecord, MemoryEntry, MemoryStore, MemoryType, parse_relation

__all__ = [
    "SYSTEM_PROMPT",
    "TYPE_WEIGHTS",
    "Dataset",
    "Example",
    "bare_question",
    "build_dataset",
    "questions_for",
    "second_person",
]

SYSTEM_PROMPT = "You are the user's personal assistant. You know the user; answer from what you know."
TYPE_WEIGHTS = {
    MemoryType.FACT: 1.0,
    MemoryType.PREFERENCE: 1.0,
    MemoryType.BELIEF: 0.8,
    MemoryType.SKILL: 0.6,
    MemoryType.CONTEXT: 0.6,
    MemoryType.EVENT: 0.4,
}
LOCAL_PROVIDERS = frozenset({"local", "plm"})
MAX_TOP_LOGPROBS = 20

# relation -> questions (the `{x}` is the relation's topic, e.g. "favorite color" -> "color"). Several
# wordings per relation: the personal model is trained on a handful of them and must then answer
# wordings it never saw. The gate's held-out probes (adapters/plm/facts.py PROBE) are never here.
_RELATION_QUESTIONS = {
    "residence": ("Where do I live?", "Which city am I based in?", "Where is my home?", "Where am I living now?",
                  "Which city do I live in?", "Do you know where I live?", "Tell me where I live.",
                  "What town do I live in?", "Where did I tell you I live?"),
    "employer": ("Where do I work?", "Who is my employer?", "Which company do I work for?", "Who do I work for?",
                 "Do you know where I work?", "Tell me where I work.", "What's my workplace?", "Who employs me?",
                 "Where did I say I work?"),
    "occupation": ("What do I do for a living?", "What is my job?", "What's my profession?", "What work do I do?",
                   "Do you know my job?", "Tell me what I work as.", "What is my occupation?",
                   "How do I earn a living?", "What did I tell you I do for work?"),
    "age": ("How old am I?", "What is my age?", "Do you know my age?"),
    "name": ("What is my {x} called?", "What's the name of my {x}?", "Do you remember my {x}'s name?",
             "What is my {x}'s name?", "What did I name my {x}?", "Tell me the name of my {x}.",
             "What name does my {x} have?", "Can you tell me what my {x} is named?",
             "What did I tell you my {x} is called?"),
    "user_name": ("What is my name?", "What am I called?", "Do you remember my name?", "Who am I?"),
    "vehicle": ("What do I drive?", "What car do I have?", "Which vehicle do I drive?", "Tell me what I drive.",
                "Do you know my car?", "What is my car?", "Which car is mine?", "What did I say I drive?"),
    "favorite": ("What is my favorite {x}?", "Which {x} do I like best?", "Do you know my favorite {x}?",
                 "Tell me my favorite {x}.", "Which {x} is my favorite?",
                 "What {x} do I love most?", "Can you tell me my favorite {x}?",
                 "What did I tell you my favorite {x} is?", "Which {x} did I mention as my favorite?"),
    "attribute": ("What is my {x}?", "Do you know my {x}?", "Tell me my {x}.",
                  "Can you tell me what my {x} is?", "Please tell me my {x}.",
                  "What did I tell you my {x} is?", "Which {x} did I mention?"),
}
_HAS_NAMED = re.compile(r"^the user has an? ([a-z -]+?) (?:called|named) ")  # "has a parrot named Kiwi"
# patterns on the memory sentence -> questions
_PATTERN_QUESTIONS = (
    (re.compile(r"\ballergic\b"), ("What am I allergic to?", "Do I have any allergies?", "Which allergies do I have?",
                                   "Tell me what I'm allergic to.", "Do you know my allergy?",
                                   "What can't I eat because of an allergy?",
                                   "What should I avoid because I'm allergic?", "What did I tell you I'm allergic to?")),
    (re.compile(r"\b(?:speaks?|fluent|native)\b"), ("Which languages do I speak?",
                                                    "What language do I speak?", "Tell me what I speak.",
                                                    "Do you know my language?", "Which language is mine?",
                                                    "Which language did I say I speak?")),
    (re.compile(r"\b(?:vegetarian|vegan|eats?|diet|intolerant|gluten)\b"),
     ("What should I keep in mind about my diet?", "What do I eat?", "Do I have dietary restrictions?")),
    (re.compile(r"\bborn\b"), ("Where was I born?", "When was I born?", "Tell me about my birth.",
                               "What is my birthplace?",
                               "Do you know where I was born?", "Where did I say I was born?")),
    (re.compile(r"^the user (?:also |still )?plays\b"), ("What do I play?",
                                                      "Tell me what I play.", "Do you know what I play?",
                                                      "What do I like to play?", "What did I tell you I play?")),
    (re.compile(r"\b(?:uses|prefers)\b"), ("Which tools do I prefer?", "What do I use?")),
)
_TYPE_QUESTIONS = {
    MemoryType.PREFERENCE: ("What do I like?", "What are my preferences?", "What do you know about my tastes?"),
    MemoryType.SKILL: ("What skills do I have?", "What am I good at?", "What can I do?"),
    MemoryType.EVENT: ("What has happened in my life lately?", "Tell me about a recent event in my life.",
                       "What did I do recently?"),
    MemoryType.BELIEF: ("What do I believe?", "What are my views?", "What do I think about things?"),
}
_GENERIC_QUESTIONS = ("What do you know about me?", "Tell me something about me.", "What have I told you about myself?")

_OPENER = re.compile(r"^(?:\w+[ ']?){1,3}[,:] +")  # "Quick question: ", "By the way, "


def bare_question(question: str) -> str:
    """The question without a conversational opener, lower case: "Quick question: where do I
    live?" -> "where do i live?". Held-out phrasings (the gate's, a benchmark's) must differ
    from every training question on this, not only on the exact string."""
    return _OPENER.sub("", question.strip(), count=1).lower()


_SECOND_PERSON = (  # (pattern on the sentence, replacement), in order
    (re.compile(r"\bthe user's\b", re.IGNORECASE), "your"),
    (re.compile(r"^the user (is|was)\b", re.IGNORECASE), lambda m: "you " + {"is": "are", "was": "were"}[m[1].lower()]),
    (re.compile(r"^the user has\b", re.IGNORECASE), "you have"),
    (re.compile(r"^the user does(n't| not)?\b", re.IGNORECASE), lambda m: "you do" + (m[1] or "")),
    (re.compile(r"^the user (\w+?)(ies|es|s)\b", re.IGNORECASE), None),  # verb agreement, below
    (re.compile(r"\bthe user\b", re.IGNORECASE), "you"),
    (re.compile(r"\bthemselves\b"), "yourself"),
)
_ES_VERBS = re.compile(r"(?:ss|sh|ch|x|z|o)$")


def second_person(content: str) -> str:
    """"The user lives in Paris." -> "You live in Paris."; "The user's dog" -> "Your dog"."""
    text = content.strip()
    for pattern, replacement in _SECOND_PERSON:
        if replacement is None:
            text = pattern.sub(_base_verb, text, count=1)
        else:
            text = pattern.sub(replacement, text)
    return text[:1].upper() + text[1:]


def _base_verb(match: re.Match[str]) -> str:
    stem, ending = match[1], match[2].lower()
    if ending == "ies":
        return f"you {stem}y"
    if ending == "es" and _ES_VERBS.search(stem):
        return f"you {stem}"
    if ending == "es":
        return f"you {stem}e"
    return f"you {stem}"


def questions_for(entry: MemoryEntry) -> list[str]:
    """Questions the memory answers, most specific first, without repeats."""
    pool: list[str] = []
    relation = parse_relation(entry.content)
    text = entry.content.lower()
    named = _HAS_NAMED.match(text.strip())
    if relation is not None:
        asked = _relation_questions(relation.subject, relation.relation)
        if "favourite" in text:  # relations are normalised to "favorite": ask as the user spells it
            asked = tuple(q.replace("favorite", "favourite") for q in asked)
        pool += asked
    elif named is not None:  # "The user has a parrot named Kiwi.": not a relation (one may have two)
        pool += tuple(t.format(x=named[1]) for t in _RELATION_QUESTIONS["name"])
    for pattern, questions in _PATTERN_QUESTIONS:
        if pattern.search(text):
            pool += questions
    pool += _TYPE_QUESTIONS.get(entry.memory_type, ())
    pool += _GENERIC_QUESTIONS
    return list(dict.fromkeys(pool))


def _relation_questions(subject: str, relation: str) -> tuple[str, ...]:
    if subject != "user":  # "user.dog" + name: "What is my dog called?"
        owner = subject.removeprefix("user.").replace("_", " ")
        templates = _RELATION_QUESTIONS["name"] if relation == "name" else _RELATION_QUESTIONS["attribute"]
        return tuple(t.format(x=owner if relation == "name" else f"{owner}'s {relation}") for t in templates)
    if relation == "name":
        return _RELATION_QUESTIONS["user_name"]
    if relation.startswith(("favorite_", "preferred_")):
        topic = relation.split("_", 1)[1].replace("_", " ")
        return tuple(t.format(x=topic) for t in _RELATION_QUESTIONS["favorite"])
    if relation in _RELATION_QUESTIONS:
        return _RELATION_QUESTIONS[relation]
    return tuple(t.format(x=relation.replace("_", " ")) for t in _RELATION_QUESTIONS["attribute"])


@dataclass(frozen=True, slots=True)
class Example:
    id: str
    source: str  # "memory" | "teacher"
    instruction: str
    input: str
    output: str
    messages: tuple[dict[str, str], ...]  # the chat format, the answer last
    weight: float
    memory_id: str | None = None
    memory_type: str | None = None
    request_id: str | None = None
    corrected: bool = False  # the output is the user's correction, not the teacher's answer
    teacher_model: str | None = None
    teacher_logprobs: tuple[dict, ...] | None = None  # per answer token: token, logprob, top

    def conversation(self) -> list[dict[str, str]]:
        """The turns before the answer as a client sends them: without the dataset's own system
        prompt (the personal model is served, and so trained, on the client's conversation)."""
        return [dict(m) for m in self.messages[1:-1]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "source": self.source, "instruction": self.instruction, "input": self.input,
            "output": self.output, "messages": list(self.messages), "weight": self.weight,
            "memory_id": self.memory_id, "memory_type": self.memory_type, "request_id": self.request_id,
            "corrected": self.corrected, "teacher_model": self.teacher_model,
            "teacher_logprobs": list(self.teacher_logprobs) if self.teacher_logprobs is not None else None,
        }


@dataclass(frozen=True, slots=True)
class Dataset:
    user_id: str
    examples: tuple[Example, ...]
    version: str  # "ds-" + 16 hex of the JSONL's sha256

    def jsonl(self) -> bytes:
        return _jsonl(self.examples)

    def to_jsonl(self, path: str | Path) -> int:
        """Write one example a line; returns how many."""
        Path(path).write_bytes(self.jsonl())
        return len(self.examples)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.examples:
            out[e.source] = out.get(e.source, 0) + 1
        return out


def _jsonl(examples: Iterable[Example]) -> bytes:
    return b"".join(
        json.dumps(e.to_dict(), sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        for e in examples
    )


def _id(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def _chat(question: str, answer: str, context: list[dict[str, str]] | None = None) -> tuple[dict[str, str], ...]:
    history = context if context is not None else [{"role": "user", "content": question}]
    return ({"role": "system", "content": SYSTEM_PROMPT}, *history, {"role": "assistant", "content": answer})


def _memory_examples(
    entries: list[MemoryEntry], feedback: dict[str, FeedbackRecord], *, seed: int, paraphrases: int
) -> list[Example]:
    out = []
    for entry in entries:
        questions = questions_for(entry)
        specific, generic = questions[:-len(_GENERIC_QUESTIONS)], questions[-len(_GENERIC_QUESTIONS):]
        random.Random(f"{seed}:{entry.content}").shuffle(specific)  # content, not the random id: reproducible
        chosen = (specific + generic)[:paraphrases]
        weight = round(entry.confidence.overall * TYPE_WEIGHTS[entry.memory_type]
                       * _memory_feedback(entry, feedback), 6)
        answer = second_person(entry.content)
        for question in chosen:
            out.append(Example(
                id=_id("memory", entry.id, question), source="memory", instruction=question, input="",
                output=answer, messages=_chat(question, answer), weight=weight, memory_id=entry.id,
                memory_type=entry.memory_type.value,
            ))
    return out


def _memory_feedback(entry: MemoryEntry, feedback: dict[str, FeedbackRecord]) -> float:
    """The weight of the latest feedback on an interaction this memory came from (1 if none);
    a memory a correction wrote counts as corrected (x3.0)."""
    if any(s.extractor == "feedback" for s in entry.sources):
        return 3.0
    rated = [feedback[s.ref] for s in entry.sources if s.ref in feedback]
    return max(rated, key=lambda r: (r.updated_at, r.request_id)).weight if rated else 1.0


def _plain(messages: list[Any]) -> list[dict[str, str]]:
    """The conversation as plain text turns (text parts joined; tool turns and images dropped)."""
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            continue
        content = m.get("content")
        if isinstance(content, list):
            content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if isinstance(content, str) and content.strip():
            out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def _logprobs(answer: dict) -> tuple[dict, ...] | None:
    """OpenAI's `logprobs.content[]` as (token, logprob, top: [[token, logprob], ...])."""
    record = answer.get("logprobs")
    content = record.get("content") if isinstance(record, dict) else None
    if not isinstance(content, list) or not content:
        return None
    out = []
    for position in content:
        if not isinstance(position, dict) or "token" not in position:
            return None
        top = [[t.get("token"), t.get("logprob")] for t in (position.get("top_logprobs") or [])[:MAX_TOP_LOGPROBS]
               if isinstance(t, dict)]
        out.append({"token": position["token"], "logprob": position.get("logprob"), "top": top})
    return tuple(out)


def _teacher_examples(interactions: list[dict], feedback: dict[str, FeedbackRecord]) -> list[Example]:
    out = []
    for row in interactions:
        record = feedback.get(row["request_id"])
        correction = record.correction if record else None
        if row.get("status_code") != 200 or (row.get("provider") in LOCAL_PROVIDERS and not correction):
            continue
        answer = row.get("response") or {}
        text = correction or answer.get("content")
        conversation = _plain((row.get("request_received") or {}).get("messages") or [])
        if not isinstance(text, str) or not text.strip() or not conversation or conversation[-1]["role"] != "user":
            continue
        turns = [m for m in conversation if m["role"] != "system"]
        history = "\n".join(f"{m['role']}: {m['content']}" for m in turns[:-1])
        out.append(Example(
            id=_id("teacher", row["request_id"]), source="teacher", instruction=turns[-1]["content"],
            input=history, output=text, messages=_chat(turns[-1]["content"], text, conversation),
            weight=record.weight if record else 1.0, request_id=row["request_id"], corrected=bool(correction),
            teacher_model=row.get("model"), teacher_logprobs=None if correction else _logprobs(answer),
        ))
    return out


def build_dataset(
    store: MemoryStore, user_id: str, *, seed: int = 0, paraphrases: int = 3,
    max_interactions: int = 100_000,
) -> Dataset:
    """The user's training examples: memories' QA pairs and the teacher log's answers."""
    entries = [
        e for e in store.entries_where("user_id = ? AND valid_to IS NULL ORDER BY id", [user_id])
        if str(getattr(e, "sensitivity", "none")) != "credentials"  # never trained into weights
    ]
    entries = store.with_relations(user_id, entries)  # sources, for the feedback weights
    feedback = store.feedback_of(user_id)
    interactions = store.interactions(user_id=user_id, limit=max_interactions)
    examples = _memory_examples(entries, feedback, seed=seed, paraphrases=paraphrases)
    examples += _teacher_examples(interactions, feedback)
    # Ordered by what the examples say, so the same memories and log give the same training run
    # (ids are random per store; ordering by them made each update's drift differ run to run).
    examples.sort(key=lambda e: (e.source, e.instruction, e.output, e.input, e.id))
    digest = hashlib.sha256(_jsonl(examples)).hexdigest()[:16]
    return Dataset(user_id, tuple(examples), f"ds-{digest}")
