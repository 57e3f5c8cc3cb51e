"""The gate's view of memories: which question a memory answers, the probe phrasings it asks
kept apart from every question the learner's dataset trains on, corrections found from
supersession."""

from __future__ import annotations

from datetime import datetime

from adapters.plm.facts import (
    PROBE,
    contains_value,
    corrections_of,
    fact_of,
    probes,
)
from learner.datasets import bare_question, questions_for
from memory import Confidence, MemoryEntry, MemoryType, Tier, TruthCategory

NOW = datetime(2026, 1, 1)


def entry(content: str, id_: str = "m1", **fields) -> MemoryEntry:
    return MemoryEntry(
        id=id_, user_id="u", content=content, content_hash=id_, tier=Tier.LONG_TERM,
        truth_category=TruthCategory.CONTEXTUAL, memory_type=MemoryType.FACT, confidence=Confidence(),
        created_at=NOW, updated_at=NOW, valid_from=NOW, recorded_at=NOW, **fields,
    )


def test_extracted_statements_become_questions_with_second_person_answers():
    cases = {
        "The user's cat is named Biscuit.": ("name", "cat", "Biscuit", "Your cat is named Biscuit."),
        "The user has a parrot named Kiwi.": ("name", "parrot", "Kiwi", "Your parrot is named Kiwi."),
        "The user's favourite colour is teal.": ("attr", "favourite colour", "teal", "Your favourite colour is teal."),
        "The user lives in Tromso.": ("residence", "", "Tromso", "You live in Tromso."),
        "The user works as a glassblower.": ("occupation", "", "glassblower", "You work as glassblower."),
        "The user is allergic to kiwi.": ("allergy", "", "kiwi", "You are allergic to kiwi."),
        "The user was born in Lisbon.": ("birthplace", "", "Lisbon", "You were born in Lisbon."),
    }
    for content, (kind, topic, value, answer) in cases.items():
        fact = fact_of(entry(content))
        assert fact is not None, content
        assert (fact.kind, fact.topic, fact.value, fact.answer) == (kind, topic, value, answer)
    assert fact_of(entry("The user enjoys long walks on the beach.")) is None


def test_no_question_of_the_learners_dataset_is_a_probe_the_gate_asks():
    contents = [
        "The user's cat is named Biscuit.", "The user has a parrot named Kiwi.", "The user's favourite colour is teal.",
        "The user lives in Tromso.", "The user works as a glassblower.", "The user works at Nordlys Labs.",
        "The user is allergic to kiwi.", "The user drives a green Volvo.", "The user was born in Lisbon.",
        "The user plays the cello.", "The user speaks Icelandic.",
    ]
    kinds = set()
    for i, content in enumerate(contents):
        memory = entry(content, f"m{i}")
        fact = fact_of(memory)
        kinds.add(fact.kind)
        trained = set(questions_for(memory))
        assert len(trained) >= 5, content  # several wordings to learn from
        assert not trained & set(probes(fact)), content
        # nor one that is a probe with its opener taken off ("Remind me, ..." vs the bare question)
        assert not {bare_question(q) for q in trained} & {bare_question(q) for q in probes(fact)}, content
    assert kinds == set(PROBE)  # every probed kind was checked


def test_value_check_ignores_case_punctuation_and_articles_but_not_other_words():
    assert contains_value("Your cat is named biscuit!", "Biscuit")
    assert contains_value("You drive a green Volvo.", "a green Volvo")
    assert not contains_value("Your cat is named Biscuits.", "Biscuit")


def test_a_superseded_value_is_a_correction_to_honour():
    new = entry("The user lives in Oslo.", "new")
    old = entry("The user lives in Tromso.", "old", valid_to=NOW, superseded_by="new")
    unrelated = entry("The user's cat is named Biscuit.", "cat")
    found = corrections_of([new, unrelated], [new, old, unrelated])
    assert [(c.fact.memory_id, c.fact.value, c.old_value) for c in found] == [("new", "Oslo", "Tromso")]
