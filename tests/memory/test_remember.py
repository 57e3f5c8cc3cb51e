"""Writing memories: dedup, corroboration, contradiction and supersession, relations."""

from datetime import datetime, timedelta

import numpy as np
import pytest

from memory import HashEmbedder, MemorySource, MemoryStore, parse_relation
from memory.remember import remember

CHAT = MemorySource("interaction", "req-1", "rules", "conv-1")


class Clock:
    def __init__(self) -> None:
        self.t = datetime(2026, 3, 1, 9, 0)

    def now(self) -> datetime:
        self.t += timedelta(seconds=1)
        return self.t


@pytest.fixture
def store():
    with MemoryStore.open(":memory:", embedder=HashEmbedder(), clock=Clock()) as opened:
        yield opened


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def test_a_near_duplicate_by_cosine_corroborates_instead_of_duplicating(store):
    rng = np.random.default_rng(1)
    base = unit(rng.standard_normal(384))
    close = unit(base + 0.01 * rng.standard_normal(384))  # cosine ~0.98
    far = unit(base + 0.5 * rng.standard_normal(384))  # cosine ~0.6
    assert float(base @ close) >= 0.95 > float(base @ far)

    first = remember(store, "ada", "The user is vegetarian.", source=CHAT, embedding=base)
    second = remember(store, "ada", "The user eats no meat at all.", source=CHAT, embedding=close)
    third = remember(store, "ada", "The user enjoys cooking.", source=CHAT, embedding=far)

    assert second.action == "corroborated" and second.entry.id == first.entry.id
    assert second.entry.confidence.corroboration_count == 1 and len(second.entry.sources) == 2
    assert third.action == "created"
    assert store.count("ada") == 2
    # Another user's identical vector is not a duplicate of ada's.
    assert remember(store, "bob", "The user is vegetarian.", source=CHAT, embedding=base).created


def test_a_moved_city_supersedes_the_old_one_with_bi_temporal_validity(store):
    paris = remember(store, "ada", "The user lives in Paris.", source=CHAT).entry
    berlin = remember(store, "ada", "The user moved to Berlin last year.",
                      source=MemorySource("interaction", "req-2", "rules"))
    old = store.get("ada", paris.id)

    assert berlin.action == "superseded" and berlin.superseded == (paris.id,)
    assert old.valid_to == berlin.entry.valid_from and old.superseded_by == berlin.entry.id
    assert old.recorded_at == paris.recorded_at and not old.is_current
    assert berlin.entry.supersedes == paris.id
    # Counts on both, and each lists the other as contradicting it.
    new = store.get("ada", berlin.entry.id)
    assert old.confidence.contradiction_count == 1 and new.confidence.contradiction_count == 1
    assert old.contradicts == (new.id,) and new.contradicts == (old.id,)
    # History stays listable, but only the current value is retrieved.
    assert [m.content for m in store.list("ada")] == ["The user moved to Berlin last year."]
    assert len(store.list("ada", include_history=True)) == 2
    store.refresh_text_index()
    found = store.search_text("ada", "Where does the user live? Paris?", k=5)
    assert [m.id for m in found] == [new.id]


def test_the_same_value_again_corroborates_the_current_memory(store):
    moved = remember(store, "ada", "The user moved to Berlin.", source=CHAT).entry
    again = remember(store, "ada", "The user lives in Berlin now.", source=CHAT)
    assert again.action == "corroborated" and again.entry.id == moved.id


def test_values_that_can_coexist_never_supersede(store):
    remember(store, "ada", "The user is allergic to peanuts.", source=CHAT)
    second = remember(store, "ada", "The user is allergic to shellfish.", source=CHAT)
    assert second.action == "created" and store.count("ada", include_history=False) == 2


def test_a_pet_renamed_supersedes_only_that_pets_name(store):
    dog = remember(store, "ada", "The user's dog is called Biscuit.", source=CHAT).entry
    cat = remember(store, "ada", "The user's cat is called Miso.", source=CHAT).entry
    renamed = remember(store, "ada", "The user's dog is named Rex.", source=CHAT)
    assert renamed.superseded == (dog.id,)
    assert store.get("ada", cat.id).is_current


def test_deleting_a_memory_deletes_what_was_derived_from_it(store):
    parent = remember(store, "ada", "The user runs marathons.", source=CHAT).entry
    child = remember(store, "ada", "The user is probably very fit.", source=MemorySource("consolidation"),
                     derived_from=[parent.id]).entry
    grandchild = remember(store, "ada", "The user may like sports drinks.",
                          source=MemorySource("consolidation"), derived_from=[child.id]).entry
    other = remember(store, "ada", "The user likes chess.", source=CHAT).entry

    deleted = store.delete_entries("ada", [parent.id])

    assert set(deleted) == {parent.id, child.id, grandchild.id}
    assert [m.id for m in store.list("ada", include_history=True)] == [other.id]
    store.refresh_text_index()
    assert store.text_matches("ada", "marathons fit sports drinks", 10) == []
    rows = store._cursor().execute(
        "SELECT (SELECT count(*) FROM memory_vectors), (SELECT count(*) FROM memory_sources), "
        "(SELECT count(*) FROM memory_links), (SELECT count(*) FROM fts_main_memories.docs)"
    ).fetchone()
    assert rows == (1, 1, 0, 1)


def test_a_deleted_memory_is_found_by_no_index(store):
    doomed = remember(store, "ada", "The user hates olives.", source=CHAT).entry
    store.refresh_text_index()
    vector = store.embedder.embed(["The user hates olives."])[0]
    assert store.text_matches("ada", "olives", 5)[0][0] == doomed.id
    store.forget("ada", doomed.id)
    assert store.text_matches("ada", "olives", 5) == []
    assert store.vector_neighbours("ada", vector, 5) == []


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        ("The user lives in Paris.", ("user", "residence", "paris")),
        ("The user moved to Berlin last year.", ("user", "residence", "berlin")),
        ("The user works at Acme.", ("user", "employer", "acme")),
        ("The user's dog is called Biscuit.", ("user.dog", "name", "biscuit")),
        ("The user's wife's name is Sara.", ("user.wife", "name", "sara")),
        ("The user's favorite color is blue.", ("user", "favorite_color", "blue")),
        ("The user is 34.", ("user", "age", "34")),
        ("The user is allergic to peanuts.", None),
        ("The user likes jazz.", None),
        ("The user owns a bike.", None),
    ],
)
def test_single_valued_relations_are_recognised(sentence, expected):
    relation = parse_relation(sentence)
    assert (None if relation is None else (relation.subject, relation.relation, relation.value)) == expected


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        ("The user now lives in Berlin.", ("user", "residence", "berlin")),
        ("The user relocated to Berlin in March.", ("user", "residence", "berlin")),
        ("The user still lives in Paris.", ("user", "residence", "paris")),
        ("The user got a new job at Acme.", ("user", "employer", "acme")),
    ],
)
def test_adverbs_dates_and_new_jobs_do_not_hide_the_relation(sentence, expected):
    relation = parse_relation(sentence)
    assert relation is not None and (relation.subject, relation.relation, relation.value) == expected
