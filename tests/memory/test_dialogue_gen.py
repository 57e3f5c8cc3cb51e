"""The synthetic dialogue generator behind the retrieval-quality benchmark: its labels must be
right, or the benchmark's recall figures mean nothing."""

import itertools

import pytest

from learner.extract import extract_facts
from memory.relations import parse_relation
from tests.benchmarks.dialogue_gen import QUESTION_KINDS, SLOTS, generate


@pytest.fixture(scope="module")
def users():
    return generate(5, users=6, sessions=8)


def test_same_seed_same_dialogues_other_seed_others():
    first, again, other = (generate(s, users=2, sessions=5) for s in (3, 3, 4))
    assert first == again
    assert [t.text for s in first[0].sessions for t in s.turns] != [
        t.text for s in other[0].sessions for t in s.turns]


def test_sessions_are_one_to_six_days_apart_and_turns_in_order(users):
    for user in users:
        starts = [s.start for s in user.sessions]
        assert all(1 <= (b.date() - a.date()).days <= 6 for a, b in itertools.pairwise(starts))
        times = [t.time for s in user.sessions for t in s.turns]
        assert times == sorted(times)


def test_every_kind_of_question_is_asked(users):
    assert {q.kind for u in users for q in u.questions} == set(QUESTION_KINDS)


def test_evidence_turns_state_the_value_current_when_asked(users):
    for user in users:
        order = {t.id: n for n, t in enumerate(t for s in user.sessions for t in s.turns)}
        for question in user.questions:
            asked = order[question.turn_id]
            stated = [t for t in user.turns.values()
                      if t.states and t.states[0] == question.slot and order[t.id] < asked]
            assert question.evidence, question
            for turn_id in question.evidence:
                turn = user.turns[turn_id]
                assert order[turn_id] < asked
                assert turn.session_id != user.turns[question.turn_id].session_id
                assert turn.states is not None and turn.states[0] == question.slot
                assert turn.states[1] in question.answer
            if question.kind != "multi":  # nothing stated later says otherwise
                latest = max(stated, key=lambda t: order[t.id])
                assert latest.states[1] == question.answer[0]
                assert latest.id in question.evidence
            if question.kind == "corrected":
                old = [t for t in stated if t.states[1] not in question.answer]
                assert old and not set(question.evidence) & {t.id for t in old}


@pytest.mark.parametrize("slot", SLOTS, ids=lambda s: s.name)
def test_the_extractor_learns_every_statement_and_corrections_supersede(slot):
    for template in slot.state + slot.correct:
        for value in slot.values[:6]:
            facts = extract_facts(template.replace("{v}", value))
            assert len(facts) == 1, template
            if slot.correct:  # same relation, this value: the store supersedes the old one
                relation = parse_relation(facts[0].content)
                assert relation is not None, facts[0].content
                assert relation.value == value.lower().removeprefix("the ")


@pytest.mark.parametrize("slot", SLOTS, ids=lambda s: s.name)
def test_questions_store_nothing_and_hard_negatives_supersede_nothing(slot):
    for question in slot.questions:
        assert extract_facts(question) == []
    for template in slot.hard_negatives:
        facts = extract_facts(template.replace("{x}", slot.values[0]))
        assert len(facts) == 1 and parse_relation(facts[0].content) is None, template
