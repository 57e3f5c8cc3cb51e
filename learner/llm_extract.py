"""The LLM extractor: ask the teacher upstream (or the local model) for the user's facts as JSON.

Only the user's latest turn goes to the model, with memlane's injected memory block and code
stripped, so system prompts, the assistant's words and memories already known never reach it.
The answer must be one JSON object `{"facts": [...]}` whose facts validate against
`ExtractedFact`; an answer that does not is asked again once with the validation error, then
`ExtractionError` is raised: the queue retries the job with backoff and dead-letters it after its
last attempt. Valid facts then pass a post-filter against the user's own words: each must quote
evidence found in the visible text, outside quotes, from a first-person statement that is not a
question or a hypothetical, about the user (subject `user` or `user.<thing>`); facts failing it
are dropped deliberately and counted in the log (`llm_facts_rejected`), never silently.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from typing import Any, Protocol

import httpx
import structlog
from pydantic import ValidationError

from learner.extractor import MAX_FACTS, ExtractedFact, ExtractionError

__all__ = [
    "Completer",
    "LLMExtractor",
    "LiteLLMCompleter",
    "LocalModelCompleter",
    "OpenAICompatibleCompleter",
    "post_filter",
    "visible_user_text",
]

log = structlog.get_logger("memlane.learner")

SYSTEM_PROMPT = """You extract durable facts that a user states about themselves.
You get one message the user wrote, between <utterance> and </utterance>. Answer with one JSON
object and nothing else: {"facts": [FACT, ...]}, where FACT is
{"statement": "The user ...", "subject": "user" or "user.<thing>", "relation": "...",
 "object": "...", "memory_type": "FACT|BELIEF|PREFERENCE|SKILL|EVENT|CONTEXT",
 "truth_category": "ABSOLUTE|CONTEXTUAL|OPINION|INFERRED", "confidence": 0.0-1.0,
 "domains": ["..."], "entities": ["..."], "evidence": "<the user's exact words>"}.
Rules: only facts the user states about themselves (or their own things: subject "user.dog").
Write statements in the third person, starting with "The user". Copy `evidence` verbatim from
the utterance. Skip questions, requests, hypotheticals ("if I were..."), quoted text, facts about
other people, and instructions. No facts: {"facts": []}."""

# For a small local model (SmolLM2-135M): the long schema above is more than it can follow, so it
# is asked for the two fields it can fill, evidence first (copying the user's words is what a small
# model does best; the rest take ExtractedFact's defaults and are classified later), and shown three
# worked examples as earlier turns: a negation, a message without facts, and two facts beside a
# question. None of them is from the labelled benchmark set.
COMPACT_SYSTEM_PROMPT = """Copy each sentence where the user says something about themselves, then restate it.
Answer with JSON only: {"facts": [{"evidence": "<the user's exact words>", "statement": "The user ..."}]}
Skip questions, requests, hypotheticals, quoted text and other people. No facts: {"facts": []}"""
COMPACT_EXAMPLES = (
    ("I don't eat meat.",
     '{"facts": [{"evidence": "I don\'t eat meat", "statement": "The user does not eat meat."}]}'),
    ("My aunt keeps goats. If I moved to the coast I would buy a kayak.", '{"facts": []}'),
    ("I have two dogs and I work night shifts. Any tips for sleeping in the day?",
     ('{"facts": [{"evidence": "I have two dogs", "statement": "The user has two dogs."}, '
      '{"evidence": "I work night shifts", "statement": "The user works night shifts."}]}')),
)

# memlane's injected blocks (proxy.enrich's formats), should a client echo one back.
_INJECTED = (
    re.compile(r"<user_profile>.*?(?:</user_profile>|\Z)", re.DOTALL | re.IGNORECASE),
    re.compile(r"<memlane_memories>.*?(?:</memlane_memories>|\Z)", re.DOTALL | re.IGNORECASE),
    re.compile(r"Things the user has told you in earlier conversations, remembered by memlane\.[^\n]*"),
    re.compile(r"What you know about the user from earlier conversations:\n(?:[ \t]*- [^\n]*\n?)*"),
    re.compile(r"(```|~~~).*?(?:\1|\Z)", re.DOTALL),  # code is not the user speaking
)
_QUOTED = re.compile(r'"[^"\n]*"|“[^”\n]*”|`[^`\n]*`')
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_QUESTION = re.compile(r"\?|^(?:what|how|can|could|would|should|is|are|am|do|does|did|will|why|where|"
                       r"when|who|which|was|were|have|has)\b")
_HYPOTHETICAL = re.compile(r"\b(?:if|unless|suppose|imagine|hypothetically|pretend|assuming|let's say|"
                           r"would|might|could|wish)\b")
_FIRST_PERSON = re.compile(r"\b(?:i|i'm|im|i've|i'd|i'll|me|my|mine|myself)\b")
_I_SUBJECT = re.compile(r"\b(?:i|i'm|im|i've|i'd|i'll)\b")


class Completer(Protocol):
    """One chat completion, returned as text."""

    name: str  # "llm:<model>"

    def complete(self, messages: list[dict[str, str]]) -> str: ...


def visible_user_text(text: str) -> str:
    """The user's turn without memlane's injected block or code."""
    for pattern in _INJECTED:
        text = pattern.sub("\n", text)
    return text.strip()


class LLMExtractor:
    def __init__(self, completer: Completer, *, tries: int = 2) -> None:
        self.completer = completer
        self.name = completer.name
        self.tries = tries

    def extract(self, text: str) -> list[ExtractedFact]:
        visible = visible_user_text(text)
        if not visible:
            return []
        messages = prompt(visible, compact=getattr(self.completer, "compact_prompt", False))
        problem = ""
        for attempt in range(1, self.tries + 1):
            answer = self.completer.complete(messages)
            try:
                facts = parse_answer(answer)
            except ExtractionError as exc:
                problem = str(exc)
                log.warning("llm_extract_invalid", extractor=self.name, attempt=attempt,
                            answer_chars=len(answer), problem=problem[:200])
                messages = [*messages, {"role": "assistant", "content": answer},
                            {"role": "user", "content": f"That was not valid: {problem}. "
                                                        "Answer with the JSON object only."}]
                continue
            return post_filter(facts, visible)
        raise ExtractionError(f"invalid output from {self.name} after {self.tries} tries: {problem}")


def prompt(visible: str, *, compact: bool = False) -> list[dict[str, str]]:
    """The chat messages asking for `visible`'s facts: the full schema for a teacher, or the
    short prompt with worked examples for a small local model (`compact`)."""
    if not compact:
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": f"<utterance>\n{visible}\n</utterance>"}]
    messages = [{"role": "system", "content": COMPACT_SYSTEM_PROMPT}]
    for utterance, answer in COMPACT_EXAMPLES:
        messages += [{"role": "user", "content": utterance}, {"role": "assistant", "content": answer}]
    return [*messages, {"role": "user", "content": visible}]


def parse_answer(answer: str) -> list[ExtractedFact]:
    """The facts of a model's answer; ExtractionError (without the answer's text) if invalid.

    The first JSON object in the answer is read and what follows it ignored: small models often
    add a sentence or a second object after a valid answer, or leave off the final brace."""
    start = (answer or "").find("{")
    if start < 0:
        raise ExtractionError("no JSON object in the answer")
    doc = _first_object(answer[start:])
    if not isinstance(doc, dict) or not isinstance(doc.get("facts"), list):
        raise ExtractionError('the answer is not an object with a "facts" list')
    if len(doc["facts"]) > MAX_FACTS:
        raise ExtractionError(f"more than {MAX_FACTS} facts")
    try:
        return [ExtractedFact.model_validate(item) for item in doc["facts"]]
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'fact'}: {e['msg']}"
                          for e in exc.errors(include_input=False, include_url=False))
        raise ExtractionError(f"a fact does not match the schema ({where})") from None


def _first_object(text: str) -> Any:
    """The JSON value `text` starts with; an object cut short of its last one or two closing
    brackets (`...}]`, `...}`) is closed, since nothing of its content is missing."""
    decoder = json.JSONDecoder()
    try:
        return decoder.raw_decode(text)[0]
    except json.JSONDecodeError as exc:
        problem = exc
    stripped = text.rstrip()
    for closer in ("}", "]}"):
        try:
            return decoder.raw_decode(stripped + closer)[0]
        except ValueError:
            continue
    raise ExtractionError(f"broken JSON ({problem.msg} at character {problem.pos})") from None


def post_filter(facts: list[ExtractedFact], visible: str) -> list[ExtractedFact]:
    """Keep the facts the user's own words support; count and log the rest by reason."""
    unquoted = _norm(_QUOTED.sub(" ", visible))
    sentences = [_norm(s) for s in _SENTENCE_END.split(visible) if s.strip()]
    kept, rejected = [], Counter()
    for fact in facts:
        reason = _rejection(fact, unquoted, sentences)
        if reason:
            rejected[reason] += 1
        else:
            kept.append(fact)
    if rejected:
        log.info("llm_facts_rejected", kept=len(kept), **rejected)
    return kept


def _rejection(fact: ExtractedFact, unquoted: str, sentences: list[str]) -> str | None:
    if fact.subject != "user" and not fact.subject.startswith("user."):
        return "other_subject"
    evidence = _norm(fact.evidence).rstrip(".!")
    if not evidence or evidence not in unquoted:
        return "evidence_not_in_text"
    sentence = next((s for s in sentences if evidence in s), evidence)
    if _QUESTION.search(sentence):
        return "question"
    if _HYPOTHETICAL.search(sentence):
        return "hypothetical"
    if not _FIRST_PERSON.search(evidence):
        return "not_first_person"
    if not fact.statement.lower().startswith("the user's") and not _I_SUBJECT.search(evidence):
        return "someone_else"  # "My sister is a nurse" is not "The user is a nurse"
    return None


def _norm(text: str) -> str:
    return " ".join(text.replace("’", "'").lower().split())


# -- where the completions come from ---------------------------------------------------


class OpenAICompatibleCompleter:
    """An OpenAI-compatible `/chat/completions` (OpenAI, vLLM, llama.cpp, ...), called directly
    (not through the proxy, so the learner's own calls are never logged and learned from)."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout_s: float = 60.0,
                 client: httpx.Client | None = None) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.name = f"llm:{model}"
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client or httpx.Client(timeout=timeout_s, trust_env=False)

    def complete(self, messages: list[dict[str, str]]) -> str:
        body = {"model": self.model, "messages": messages, "temperature": 0,
                "response_format": {"type": "json_object"}}
        try:
            response = self._client.post(self.url, json=body, headers=self._headers)
            response.raise_for_status()
            return str(response.json()["choices"][0]["message"]["content"] or "")
        except httpx.HTTPStatusError as exc:
            raise ExtractionError(f"teacher upstream answered {exc.response.status_code}") from exc
        except httpx.HTTPError as exc:
            raise ExtractionError(f"teacher upstream unreachable ({type(exc).__name__})") from exc
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ExtractionError("teacher upstream sent no chat completion") from exc


class LiteLLMCompleter:
    """Anthropic or Ollama teachers, translated by litellm."""

    def __init__(self, provider: str, model: str, *, api_base: str | None, api_key: str | None,
                 timeout_s: float = 60.0) -> None:
        prefix = {"anthropic": "anthropic", "ollama": "ollama_chat"}[provider]
        self.model = f"{prefix}/{model}"
        self.name = f"llm:{model}"
        self._options: dict[str, Any] = {"api_base": api_base, "api_key": api_key, "timeout": timeout_s}

    def complete(self, messages: list[dict[str, str]]) -> str:
        import litellm

        try:
            response = litellm.completion(model=self.model, messages=messages, temperature=0,
                                          max_tokens=1024, **self._options)
            return str(response.choices[0].message.content or "")
        except Exception as exc:  # litellm's many error types, translated once here
            raise ExtractionError(f"teacher upstream failed ({type(exc).__name__})") from exc


class LocalModelCompleter:
    """The embedded local model (SmolLM2 by default): offline, slow, often invalid JSON.

    Greedy decoding with a tight token budget; a small model gets the compact prompt
    (`compact_prompt`), since the full schema is more than a 135M-parameter model can follow."""

    def __init__(self, model: Any, *, max_new_tokens: int = 160, compact_prompt: bool = True) -> None:
        self.model = model
        self.name = f"llm:local/{getattr(model, 'name', 'model')}"
        self.max_new_tokens = max_new_tokens
        self.compact_prompt = compact_prompt

    def complete(self, messages: list[dict[str, str]]) -> str:
        from adapters import GenerationParams, LocalModelError

        params = GenerationParams(max_new_tokens=self.max_new_tokens, temperature=0.0)
        try:
            self.model.load()
            generation = self.model.generate(messages, params)
            return asyncio.run(generation.text())
        except LocalModelError as exc:
            raise ExtractionError(f"local model failed ({type(exc).__name__})") from exc
