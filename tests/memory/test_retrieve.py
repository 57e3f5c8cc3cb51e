"""Hybrid retrieval: both legs, the memory's own signals, links, filters, explanations."""

from datetime import datetime, timedelta

import numpy as np
import pytest

from memory import HashEmbedder, Link, MemorySource, MemoryStore, Tier
from memory.remember import remember

RNG = np.random.default_rng(5)


class Clock:
    def __init__(self) -> None:
        self.t = datetime(2026, 5, 1, 9, 0)

    def now(self) -> datetime:
        return self.t


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock):
    with MemoryStore.open(":memory:", embedder=HashEmbedder(), clock=clock) as opened:
        yield opened


def add(store, content, *, user="ada", vector=None, conversation=None, **kw):
    source = MemorySource("interaction", None, "rules", conversation)
    return remember(store, user, content, source=source, embedding=vector, **kw).entry


def test_every_result_explains_its_score(store):
    add(store, "The user is allergic to peanuts.")
    store.refresh_text_index()
    hit = store.search_text("ada", "peanuts allergy", k=1)[0]
    parts = hit.score
    assert parts.vector > 0 and parts.text > 0 and parts.recency == pytest.approx(1.0)
    assert parts.tier == pytest.approx(0.4)  # short-term
    w = store.weights
    match = w.vector * parts.vector + w.text * parts.text + w.link * parts.link
    prior = 1 - (w.recency * (1 - parts.recency) + w.importance * (1 - parts.importance)
                 + w.confidence * (1 - parts.confidence) + w.frequency * (1 - parts.frequency)
                 + w.tier * (1 - parts.tier))
    assert parts.total == pytest.approx(match * prior, abs=1e-5)


def test_the_text_leg_finds_a_rare_word_the_vectors_miss(store):
    query = unit(RNG.standard_normal(384))
    for i in range(40):  # near the query vector, but not about it
        add(store, f"The user noted item {i}.", vector=unit(query + 0.3 * RNG.standard_normal(384)))
    target = add(store, "The user's locker code is Zanzibar.", vector=unit(RNG.standard_normal(384)))
    store.refresh_text_index()

    vector_only = [i for i, _ in store.vector_neighbours("ada", query, 5)]
    assert target.id not in vector_only
    hybrid = store.search("ada", query, k=5, query="zanzibar")
    assert hybrid[0].id == target.id and hybrid[0].score.text > 0
    assert all(m.score.text == 0 for m in hybrid[1:])


def test_a_new_memory_is_found_before_the_text_index_is_rebuilt(store):
    add(store, "The user plays padel.")
    found = store.search_text("ada", "padel", k=1)
    assert found and found[0].content == "The user plays padel."


def test_links_pull_in_supporting_and_same_conversation_memories(store):
    q = unit(RNG.standard_normal(384))
    seed = add(store, "The user trains for a marathon.", vector=q, conversation="c1")
    support = add(store, "The user runs 60 km a week.", vector=unit(RNG.standard_normal(384)))
    sibling = add(store, "The user's coach is called Mo.", vector=unit(RNG.standard_normal(384)),
                  conversation="c1")
    store.add_links("ada", [Link(support.id, seed.id, "supports")])

    results = {m.id: m for m in store.search("ada", q, k=5, min_score=0.25)}

    assert results[seed.id].score.link == 0
    assert results[support.id].score.via == seed.id and results[support.id].score.link > 0
    assert results[sibling.id].score.via == seed.id
    assert results[support.id].score.link > results[sibling.id].score.link  # supports > conversation
    without = store.search("ada", q, k=5, min_score=0.25, expand_links=False)
    assert [m.id for m in without] == [seed.id]


def test_a_long_conversation_lends_each_of_its_memories_less(store):
    """Sharing a chat session with a strong hit says little when the session held many facts:
    the conversation's link weight is shared among the seed's conversation mates."""
    q = unit(RNG.standard_normal(384))
    small_seed = add(store, "The user trains for a marathon.", vector=q, conversation="short")
    small_mate = add(store, "The user's coach is called Mo.", vector=unit(RNG.standard_normal(384)),
                     conversation="short")
    noise = RNG.standard_normal(384)
    noise -= (noise @ q) * q
    near_q = unit(q + 0.5 * unit(noise))  # cosine 0.89 to q: not a duplicate of small_seed
    big_seed = add(store, "The user runs every morning.", vector=near_q, conversation="long")
    big_mates = [add(store, f"The user mentioned errand {i}.", vector=unit(RNG.standard_normal(384)),
                     conversation="long") for i in range(9)]

    results = {m.id: m for m in store.search("ada", q, k=20)}

    assert results[small_mate.id].score.via == small_seed.id
    lent = [results[m.id].score.link for m in big_mates if results[m.id].score.via == big_seed.id]
    per_relevance = results[small_mate.id].score.link  # small_seed's relevance is 1
    expected = results[big_seed.id].score.vector * per_relevance / 9  # nine mates share it
    assert len(lent) == 9 and all(link == pytest.approx(expected, abs=1e-5) for link in lent)


def test_tiers_and_domains_filter(store):
    q = unit(RNG.standard_normal(384))
    work = remember(store, "ada", "The user deploys with Kubernetes.", source=MemorySource("api"),
                    embedding=q, domains=["work"]).entry
    home = add(store, "The user grows tomatoes.", vector=unit(q + 0.1 * RNG.standard_normal(384)),
               domains=["home"])
    assert work.tier is Tier.LONG_TERM and home.tier is Tier.SHORT_TERM

    assert [m.id for m in store.search("ada", q, k=5, domains=["work"])] == [work.id]
    assert [m.id for m in store.search("ada", q, k=5, tiers=[Tier.SHORT_TERM])] == [home.id]
    assert {m.id for m in store.search("ada", q, k=5)} == {work.id, home.id}


def test_the_memorys_own_signals_order_nearly_equally_similar_ones(store, clock):
    q = unit(RNG.standard_normal(384))

    def at_distance(scale: float) -> np.ndarray:  # cosine to q is exactly 1 / sqrt(1 + scale^2)
        noise = RNG.standard_normal(384)
        noise -= (noise @ q) * q
        return unit(q + scale * unit(noise))

    weak_vector, strong_vector = at_distance(0.75), at_distance(0.77)
    weak = add(store, "The user maybe likes opera.", vector=weak_vector)
    strong = remember(store, "ada", "The user likes opera.", source=MemorySource("api"),
                      embedding=strong_vector, importance=0.9).entry  # validated, long-term
    first = store.search("ada", q, k=2, expand_links=False)
    assert [m.id for m in first] == [strong.id, weak.id]
    assert first[0].score.vector < first[1].score.vector


def test_retrieval_updates_access_statistics(store, clock):
    entry = add(store, "The user likes opera.")
    for _ in range(3):
        store.search_text("ada", "opera", k=1)
    store.flush()
    seen = store.get("ada", entry.id)
    assert seen.access_count == 3 and seen.last_accessed == clock.t
    store.search_text("ada", "opera", k=1, touch=False)
    store.flush()
    assert store.get("ada", entry.id).access_count == 3


def test_expired_and_other_users_memories_are_never_returned(store, clock):
    q = unit(RNG.standard_normal(384))
    add(store, "The user likes opera.", vector=q)
    add(store, "Bob likes opera.", user="bob", vector=q)
    clock.t += timedelta(hours=73)  # past the TTL, before maintenance ran
    assert store.search("ada", q, k=5) == []
    assert [m.user_id for m in store.search("bob", q, k=5)] == []  # bob's expired too
    fresh = add(store, "The user likes jazz.", vector=q)
    assert [m.id for m in store.search("ada", q, k=5)] == [fresh.id]


def test_min_score_needs_the_query_to_be_relevant_not_the_memory_strong(store):
    q = unit(RNG.standard_normal(384))
    remember(store, "ada", "The user likes opera.", source=MemorySource("api"),
             embedding=unit(RNG.standard_normal(384)), importance=1.0)
    assert store.search("ada", q, k=5, min_score=0.3) == []
