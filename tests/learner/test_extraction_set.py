"""The local extractor on the labelled utterance set (see tests/benchmarks/bench_extraction.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from learner.extract import extract_facts
from tests.benchmarks.bench_extraction import (
    HELDOUT_PATH,
    Utterance,
    evaluate,
    load_set,
    local_extractor,
    matches,
    score_one,
)

NEGATIVE_CATEGORIES = {"question", "hypothetical", "request", "chitchat", "other_person", "quoted", "code",
                       "memory_block", "system_prompt", "assistant_paste"}


def test_the_set_is_large_and_has_every_kind_of_negative():
    utterances = load_set()
    categories = Counter(u.category for u in utterances)
    assert len(utterances) >= 200
    assert NEGATIVE_CATEGORIES <= set(categories)
    assert all(not u.facts for u in utterances if u.category in NEGATIVE_CATEGORIES)
    assert sum(1 for u in utterances if u.facts) >= 100
    assert len({u.text for u in utterances}) == len(utterances)


def test_local_extractor_precision_stays_at_or_above_0_9():
    tallies = evaluate(local_extractor(), load_set())
    overall = tallies["all"]
    assert overall.precision >= 0.9, [e for e in overall.errors if e["kind"] == "false_positive"]
    assert overall.recall >= 0.75  # a floor against regressions, not a target
    for category in NEGATIVE_CATEGORIES - {"chitchat"}:
        assert tallies[category].predicted <= 1, (category, tallies[category].errors)


def test_local_extractor_precision_on_the_held_out_set():
    overall = evaluate(local_extractor(), load_set(HELDOUT_PATH))["all"]
    assert overall.expected >= 20 and overall.precision >= 0.9, overall.errors


def test_the_matching_rule_counts_misattributed_and_missing_facts():
    utterance = Utterance(1, "I'm allergic to nuts and I live in Oslo.", "multi",
                          (("The user is allergic to nuts.", ("allergic", "nuts")),
                           ("The user lives in Oslo.", ("oslo",))))
    assert matches("The user isn't allergic to nuts.", ["not|never", "nuts"])
    assert not matches("The user is allergic to peanuts.", ["allergic", "nuts"])  # whole words
    tally = score_one(utterance, ["The user is allergic to nuts.", "The user likes Oslo a lot.",
                                  "The user is a pilot."])
    assert (tally.correct, tally.predicted, tally.found, tally.expected) == (2, 3, 2, 2)
    parrot = evaluate(lambda text: [text], load_set())["all"]  # storing every message verbatim
    assert parrot.precision < 0.6


@pytest.mark.parametrize(("message", "contents"), [
    ("Correction: my name is Anna, not Ana.", ["The user's name is Anna."]),
    ("Sorry, I meant I work at Stripe, not Square.", ["The user works at Stripe."]),
    ("Update: I moved to Seattle.", ["The user moved to Seattle."]),
    ("I like cats, not dogs.", ["The user likes cats, not dogs."]),  # no correction: kept whole
    ("I no longer work at Oracle.", ["The user no longer works at Oracle."]),
    ("You are a helpful assistant. I am a pilot.", []),
    ("Act as my lawyer. I live in Texas.", []),
    ("I'm excited about the trip to Peru.", []),
])
def test_corrections_prompts_and_moods(message, contents):
    assert [f.content for f in extract_facts(message)] == contents
