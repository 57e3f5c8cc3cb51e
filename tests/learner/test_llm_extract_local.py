"""The LLM extractor on the embedded local model: its compact prompt, the parsing that a small
model's answers need, and one real SmolLM2 extraction (greedy, so the same every run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from learner import ExtractionError, LLMExtractor, LocalModelCompleter
from learner.llm_extract import (
    COMPACT_SYSTEM_PROMPT,
    SYSTEM_PROMPT,
    parse_answer,
    prompt,
)


class _Recording:
    """A completer that answers from a list and keeps what it was asked."""

    name = "llm:recording"

    def __init__(self, answers: list[str], *, compact_prompt: bool) -> None:
        self.answers = answers
        self.compact_prompt = compact_prompt
        self.asked: list[list[dict[str, str]]] = []

    def complete(self, messages: list[dict[str, str]]) -> str:
        self.asked.append(messages)
        return self.answers.pop(0)


def test_a_small_model_gets_the_short_prompt_with_worked_examples_and_the_users_turn_last():
    completer = _Recording(['{"facts": [{"evidence": "I keep bees", "statement": "The user keeps bees."}]}'],
                           compact_prompt=True)
    facts = LLMExtractor(completer).extract("I keep bees. How do I stop them swarming?")
    assert [f.statement for f in facts] == ["The user keeps bees."]
    sent = completer.asked[0]
    assert sent[0] == {"role": "system", "content": COMPACT_SYSTEM_PROMPT}
    assert [m["role"] for m in sent[1:-1]] == ["user", "assistant"] * 3
    assert sent[-1] == {"role": "user", "content": "I keep bees. How do I stop them swarming?"}
    assert all(parse_answer(m["content"]) is not None for m in sent[1:-1] if m["role"] == "assistant")


def test_a_teacher_gets_the_full_schema():
    assert [m["role"] for m in prompt("I keep bees.")] == ["system", "user"]
    assert prompt("I keep bees.")[0]["content"] == SYSTEM_PROMPT


def test_the_local_completer_asks_for_the_compact_prompt_and_a_tight_budget():
    completer = LocalModelCompleter(object())
    assert completer.compact_prompt and completer.max_new_tokens <= 200
    assert not LocalModelCompleter(object(), compact_prompt=False).compact_prompt


@pytest.mark.parametrize("answer", [
    '{"facts": [{"evidence": "I keep bees", "statement": "The user keeps bees."}]} Hope this helps! {"x": 1}',
    '{"facts": [{"evidence": "I keep bees", "statement": "The user keeps bees."}]',  # last brace left off
    'Sure: {"facts": [{"evidence": "I keep bees", "statement": "The user keeps bees."}',
])
def test_a_valid_answer_with_text_after_it_or_its_last_brackets_missing_is_read(answer):
    assert [f.statement for f in parse_answer(answer)] == ["The user keeps bees."]


@pytest.mark.parametrize("answer", [
    '{"facts": [{"evidence": "I keep bees", "statement": "The user',  # cut inside a string
    '{"facts": [{"evidence": "I keep bees", "statement": "The user keeps bees."}, {"evid',
    "I cannot help with that.",
])
def test_an_answer_cut_short_inside_a_fact_is_still_invalid(answer):
    with pytest.raises(ExtractionError):
        parse_answer(answer)


@pytest.mark.slow
def test_smollm2_extracts_a_plain_first_person_fact(model_cache_dir):
    from adapters import LocalModel

    model = LocalModel(cache_dir=Path(model_cache_dir))
    try:
        facts = LLMExtractor(LocalModelCompleter(model)).extract("I'm on a low-sodium diet.")
    finally:
        model.close()
    assert [f.statement for f in facts] == ["The user is on a low-sodium diet."]
    assert facts[0].evidence.rstrip(".") == "I'm on a low-sodium diet"
