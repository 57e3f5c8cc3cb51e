"""RAM views of small users and batched access statistics: the same answers as DuckDB, never stale."""

import threading
import time

import numpy as np
import pytest

import memory.indexes
from memory import HashEmbedder, Link, MemorySource, MemoryStore
from memory.ownership import edit_memory
from memory.remember import remember

from .conftest import StepClock

FACTS = [
    "The user lives in Paris.", "The user's dog is called Biscuit.", "The user prefers tabs.",
    "The user is allergic to peanuts.", "The user plays the cello.", "The user drinks green tea.",
    "The user works at a bakery.", "The user's sister is called Ines.", "The user runs on Sundays.",
]
QUERIES = ["where do I live", "my dog", "tabs or spaces", "what am I allergic to", "music", "tea"]


def fill(store: MemoryStore, user: str = "ada") -> list[str]:
    ids = []
    for i, fact in enumerate(FACTS):
        source = MemorySource("interaction", f"turn-{i}", "rules", f"conv-{i % 3}")
        ids.append(remember(store, user, fact, source=source).entry.id)
    store.add_links(user, [Link(ids[0], ids[6], "related"), Link(ids[1], ids[7], "supports")])
    store.refresh_text_index()
    return ids


def with_view(store: MemoryStore, user: str = "ada"):
    """Ask once (which starts the build), wait for the background thread, return the view."""
    store._views.settle_s = 0.0  # build at once after a write (the store waits 2 s by default)
    store.user_signature(user)
    store.flush()
    view = store._views.get(user)
    assert view is not None
    return view


def ranked(store: MemoryStore, user: str = "ada") -> list[list[tuple[str, float]]]:
    return [[(m.id, m.score.total) for m in store.search_text(user, q, k=5, touch=False)] for q in QUERIES]


def from_duckdb(store: MemoryStore, call, user: str = "ada"):
    """`call(store)` answered by DuckDB: the user's view dropped first (a build starts after)."""
    store.flush()
    store._views.invalidate(user)
    return call(store)


def test_a_view_answers_what_duckdb_answers(store):
    ids = fill(store)
    view = with_view(store)
    assert sorted(view.entries) == sorted(ids)
    in_ram = ranked(store)
    store._views.claim = lambda user_id: False  # type: ignore[method-assign]
    assert from_duckdb(store, ranked) == in_ram
    del store._views.claim
    for call in (
        lambda s: sorted(s.links_from("ada", ids), key=repr),
        lambda s: sorted(s.conversation_neighbours("ada", ids[:3], limit=100)),
        lambda s: s.user_signature("ada"),
        lambda s: s.get_many("ada", ids[::-1], relations=False),
    ):
        with_view(store)
        in_ram = call(store)
        assert in_ram == from_duckdb(store, call)


def test_every_kind_of_write_drops_the_view(store):
    ids = fill(store)
    with_view(store)
    store.update_entry("ada", ids[2], importance=0.99)
    assert store._views.get("ada") is None
    assert with_view(store).entries[ids[2]].importance == 0.99
    store.add_links("ada", [Link(ids[3], ids[4], "related")])
    assert any(link.dst_id == ids[4] for link in with_view(store).links[ids[3]])
    store.add_source("ada", ids[5], MemorySource("interaction", "turn-x", "rules", "conv-new", store.clock.now()))
    assert with_view(store).conversations[ids[5]][-1] == "conv-new"
    store.forget("ada", ids[0])
    assert ids[0] not in with_view(store).entries
    assert ids[0] not in [m.id for m in store.search_text("ada", "where do I live", k=9, touch=False)]


def test_a_view_built_during_a_transaction_is_dropped_at_its_commit(store):
    ids = fill(store)
    with_view(store)
    with store.transaction():
        store.update_entry("ada", ids[1], importance=0.42)
        reader = threading.Thread(target=store.user_signature, args=("ada",))  # another thread reads:
        reader.start()                                                          # a view is built from
        reader.join()                                                           # the committed rows
        store.flush()
        assert store._views.get("ada").entries[ids[1]].importance != 0.42
        assert store.get_many("ada", [ids[1]], relations=False)[0].importance == 0.42  # own write
    assert store._views.get("ada") is None
    assert with_view(store).entries[ids[1]].importance == 0.42


def test_another_users_memories_are_never_in_a_view(store):
    fill(store, "ada")
    bob = fill(store, "bob")
    view = with_view(store, "ada")
    assert not set(bob) & set(view.entries)
    assert store.get_many("ada", bob, relations=False) == []
    assert store.links_from("ada", bob) == []


def test_retrievals_are_counted_in_batches_and_reach_the_view(store):
    ids = fill(store)
    with_view(store)
    writes = []
    original = store._access._write
    store._access._write = lambda batch, at: (writes.append(batch), original(batch, at))
    for _ in range(4):
        store.record_access("ada", [ids[0], ids[1]])
    store.record_access("ada", [ids[0]])
    store.flush()
    assert len(writes) == 1  # five retrievals, one write
    assert store.get("ada", ids[0]).access_count == 5
    assert store._views.get("ada").entries[ids[0]].access_count == 5
    assert store._views.get("ada").entries[ids[1]].access_count == 4
    retrieval = {d.domain: d.retrieval for d in store.domain_activations("ada")}
    assert sum(retrieval.values()) > 0


def test_pending_retrievals_are_written_by_close(db_path):
    with MemoryStore.open(db_path, embedder=HashEmbedder(), clock=StepClock()) as store:
        entry = remember(store, "ada", "The user likes opera.", source=MemorySource("api")).entry
        store.record_access("ada", [entry.id])
    with MemoryStore.open(db_path, embedder=HashEmbedder(), clock=StepClock()) as reopened:
        assert reopened.get("ada", entry.id).access_count == 1


def test_pending_retrievals_are_written_without_a_flush(store):
    entry = remember(store, "ada", "The user likes opera.", source=MemorySource("api")).entry
    store.record_access("ada", [entry.id])
    deadline = time.monotonic() + 10
    while store.get("ada", entry.id).access_count == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.get("ada", entry.id).access_count == 1


def test_no_view_is_built_while_a_user_is_being_written(store):
    ids = fill(store)
    store._views.settle_s = 60.0
    store.update_entry("ada", ids[0], importance=0.3)
    store.user_signature("ada")
    store.flush()
    assert store._views.get("ada") is None  # reads go to DuckDB until the writes settle
    assert store.get_many("ada", [ids[0]], relations=False)[0].importance == 0.3


def test_maintenance_updates_in_one_transaction_and_leaves_no_stale_view(store, clock):
    from datetime import timedelta

    ids = fill(store)
    with_view(store)
    clock_now = store.clock.now()
    store.clock.now = lambda: clock_now + timedelta(days=40)  # type: ignore[method-assign]
    report = store.maintain()
    assert report.decayed >= len(ids) - 1
    fresh = with_view(store)
    assert all(fresh.entries[i].confidence.recency < 0.9 for i in ids if i in fresh.entries)


def test_a_decay_pass_patches_the_view_instead_of_rebuilding_it(store):
    """A pass that only moves recency keeps the user's view (a rebuild of 10,000 memories took
    ~0.5 s, much of it holding the GIL) and the view says what DuckDB says."""
    from datetime import timedelta

    ids = fill(store)
    start = store.clock.now()
    store.clock.now = lambda: start + timedelta(days=4)  # type: ignore[method-assign]
    store.maintain()  # promoted by age: a write that drops the view
    store.maintain()  # promotion counted as an update: recency moves once more
    with_view(store)
    builds = []
    build = store._build_view
    store._build_view = lambda *a: (builds.append(a), build(*a))[1]  # type: ignore[method-assign]
    store.clock.now = lambda: start + timedelta(days=5)  # type: ignore[method-assign]
    assert store.maintain().decayed == len(ids)
    patched = store._views.get("ada")
    assert patched is not None
    store.flush()
    assert builds == []
    in_db = {m.id: m.confidence.recency for m in from_duckdb(store, lambda s: s.get_many("ada", ids, relations=False))}
    assert {i: patched.entries[i].confidence.recency for i in ids} == in_db
    assert all(r < 0.995 for r in in_db.values())  # a day idle: 0.9923


def test_a_reopened_store_preloads_the_views_of_the_users_active_last(db_path, clock):
    with MemoryStore.open(db_path, embedder=HashEmbedder(), clock=clock) as store:
        for user in ("ada", "bob", "cy"):  # cy active last, then bob; ada first
            fill(store, user)
    with MemoryStore.open(db_path, embedder=HashEmbedder(), clock=clock,
                          view_rows=2 * len(FACTS) + 1) as store:  # room for two of the three
        assert store.preload_views() == 2
        store.flush()
        assert store._views.get("cy") is not None and store._views.get("bob") is not None
        assert store._views.get("ada") is None
        calls = []
        cursor = store._cursor
        store._cursor = lambda: (calls.append(1), cursor())[1]  # type: ignore[method-assign]
        first = next(iter(store._views.get("cy").entries))
        assert [m.id for m in store.get_many("cy", [first], relations=False)] == [first]
        assert calls == []  # cy's first read after the restart did not go to DuckDB
    with MemoryStore.open(db_path, embedder=HashEmbedder(), clock=clock, view_rows=0) as store:
        assert store.preload_views() == 0  # views off


# -- large users: the search legs in RAM ------------------------------------------------

NOUNS = ["garden", "violin", "bakery", "harbour", "bicycle", "lantern", "orchard", "library"]
VERBS = ["visits", "repairs", "paints", "photographs", "cleans"]
LARGE_QUERIES = ["the violin in the harbour", "who paints lanterns", "orchard bicycle", "library qzt"]


def fill_large(store: MemoryStore, user: str, count: int = 90) -> list[str]:
    tag = ["".join("qwrtzpsdfg"[int(d)] for d in f"{i:03d}") for i in range(count)]  # one word each
    texts = [f"The user {VERBS[i % 5]} the {NOUNS[i % 8]} and the {NOUNS[(i * 3) % 8]} {tag[i]}." for i in range(count)]
    store.bulk_add(user, texts, store.embedder.embed(texts), source="test")
    store.refresh_text_index()
    return [m.id for m in store.list(user, limit=count)]


@pytest.fixture
def large(store, monkeypatch):
    """A store where users above 40 vectors are "large" (the threshold is 16,384)."""
    monkeypatch.setattr(memory.indexes, "EXACT_SCAN_MAX_ROWS", 40)
    return store


def legs(store: MemoryStore, user: str = "ada"):
    out = []
    for q in LARGE_QUERIES:
        vector = store.embedder.embed([q])[0]
        out.append((store.vector_neighbours(user, vector, 10), store.text_matches(user, q, 10)))
    return out


def test_a_large_users_view_answers_both_search_legs_as_duckdb_does_without_sql(large):
    store = large
    ids = fill_large(store, "ada")
    bob = fill_large(store, "bob")
    store._views.claim = lambda user_id: False  # type: ignore[method-assign]
    in_duckdb, ranked_in_duckdb = legs(store), ranked(store)
    del store._views.claim
    view = with_view(store)
    assert view.vectors is not None and view.postings is not None
    assert sorted(view.vectors.ids) == sorted(ids)

    legs(store)  # stems of new query words and the index's dictionary are read once
    calls = []
    cursor = store._cursor
    store._cursor = lambda: (calls.append(1), cursor())[1]  # type: ignore[method-assign]
    in_ram = legs(store)
    assert calls == []  # neither leg asked DuckDB
    store._cursor = cursor  # type: ignore[method-assign]

    for query, (vector_ram, text_ram), (vector_db, text_db) in zip(LARGE_QUERIES, in_ram, in_duckdb, strict=True):
        assert text_ram and [i for i, _ in text_ram] == [i for i, _ in text_db]
        assert [s for _, s in text_ram] == pytest.approx([s for _, s in text_db], rel=1e-9)
        # as near as DuckDB's exact top 10, up to f16 rounding (among ties either may be chosen),
        # and each score is that memory's own cosine
        assert [s for _, s in vector_ram] == pytest.approx([s for _, s in vector_db], abs=2e-3)
        contents = {m.id: m.content for m in store.get_many("ada", [i for i, _ in vector_ram])}
        cosines = store.embedder.embed([contents[i] for i, _ in vector_ram]) @ store.embedder.embed([query])[0]
        assert [s for _, s in vector_ram] == pytest.approx(cosines.tolist(), abs=2e-3)
        assert not {i for i, _ in vector_ram + text_ram} & set(bob)
    for in_ram_ranked, in_duckdb_ranked in zip(ranked(store), ranked_in_duckdb, strict=True):
        # the same memories, but for ties (many memories share a query's words)
        assert [s for _, s in in_ram_ranked] == pytest.approx([s for _, s in in_duckdb_ranked], abs=2e-3)
        assert in_ram_ranked[0][0] == in_duckdb_ranked[0][0] or in_ram_ranked[0][1] == pytest.approx(in_ram_ranked[1][1], abs=2e-3)


def test_a_large_users_postings_follow_a_rebuilt_text_index(large):
    store = large
    fill_large(store, "ada")
    view = with_view(store)
    before = store.text_matches("ada", "violin harbour", 5)
    store.refresh_text_index()  # a new generation of the index: the view's postings are older
    assert store.text_matches("ada", "violin harbour", 5) == before  # answered by DuckDB meanwhile
    store.flush()
    reloaded = store._views.get("ada")
    assert reloaded.postings.text_generation == store._text_generation != view.postings.text_generation
    assert reloaded.entries is view.entries  # only the postings were read again
    after = store.text_matches("ada", "violin harbour", 5)
    assert [i for i, _ in after] == [i for i, _ in before]
    assert [s for _, s in after] == pytest.approx([s for _, s in before], rel=1e-9)


def test_a_forgotten_memory_leaves_a_large_users_view_and_search(large):
    store = large
    ids = fill_large(store, "ada")
    with_view(store)
    gone = ids[17]
    store.forget("ada", gone)
    assert store._views.get("ada") is None
    view = with_view(store)
    assert gone not in view.vectors.keys and gone not in view.postings.docs
    assert gone not in [m.id for m in store.search_text("ada", "library qzt", k=10, touch=False)]


def test_a_large_users_graph_is_patched_after_a_write_not_built_again(large):
    store = large
    ids = fill_large(store, "ada")
    before = with_view(store)
    graph = before.vectors.index
    source = MemorySource("interaction", "turn-bees", "rules", "conv-bees")
    new = remember(store, "ada", "The user keeps bees on the roof of the bakery.", source=source).entry.id
    edited = ids[5]
    edit_memory(store, "ada", edited, content="The user repairs an accordion in the orchard.")
    view = with_view(store)
    assert view.vectors.index is graph  # patched: nothing added again but what changed
    assert new in view.vectors.keys and len(view.vectors.keys) == len(ids) + 1
    assert view.entries[ids[0]] is before.entries[ids[0]]  # an unchanged row is not read again
    assert view.entries[edited].content == "The user repairs an accordion in the orchard."
    assert view.entries[new].content == "The user keeps bees on the roof of the bakery."
    in_ram = [store.vector_neighbours("ada", store.embedder.embed([q])[0], 5)
              for q in ("bees on the roof", "accordion in the orchard")]
    assert in_ram[0][0][0] == new and in_ram[1][0][0] == edited  # the edit's new vector, not its old one
    store._views.claim = lambda user_id: False  # type: ignore[method-assign]
    in_duckdb = [from_duckdb(store, lambda s, q=q: s.vector_neighbours("ada", s.embedder.embed([q])[0], 5))
                 for q in ("bees on the roof", "accordion in the orchard")]
    for ram, db in zip(in_ram, in_duckdb, strict=True):
        assert [s for _, s in ram] == pytest.approx([s for _, s in db], abs=2e-3)


def test_a_delete_drops_a_large_users_graph_with_their_view(large):
    store = large
    ids = fill_large(store, "ada")
    graph = with_view(store).vectors.index
    store.forget("ada", ids[3])
    assert with_view(store).vectors.index is not graph  # no deleted vector kept in RAM


def test_a_patched_graph_finds_what_a_new_one_finds():
    from memory.views import ViewVectors

    def hashed(ids, matrix):
        return ids, matrix, [hash(row.tobytes()) for row in matrix]

    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((400, 384)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    ids = [f"m{i:03d}" for i in range(400)]
    graph = ViewVectors.build(*hashed(ids, matrix))
    # 20 deleted, 10 re-embedded, 30 new
    now_ids = ids[20:] + [f"n{i:03d}" for i in range(30)]
    unit = rng.standard_normal((40, 384)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    now = np.vstack([matrix[20:], unit[:30]])
    now[100:110] = unit[30:]
    _, _, now_hashes = hashed(now_ids, now)
    fetched = []

    def fetch(wanted):
        fetched.extend(wanted)
        rows = [now_ids.index(i) for i in wanted]
        return hashed(wanted, now[rows])

    patched = graph.refreshed(dict(zip(now_ids, now_hashes)), fetch)
    assert patched is not None and patched.index is graph.index
    assert sorted(fetched) == sorted(now_ids[100:110] + now_ids[380:])  # only what changed is read
    assert sorted(patched.keys) == sorted(now_ids)
    fresh = ViewVectors.build(now_ids, now)
    for row in (0, 105, 385):  # kept, re-embedded, new: each its own nearest
        assert patched.nearest(now[row], 1)[0][0] == now_ids[row]
        found, expected = patched.nearest(now[row], 5), fresh.nearest(now[row], 5)
        assert [i for i, _ in found] == [i for i, _ in expected]
        assert [s for _, s in found] == pytest.approx([s for _, s in expected], abs=2e-3)
    assert not {i for i, _ in patched.nearest(matrix[5], 10)} & set(ids[:20])  # deleted: gone
    # the graph the old view held is no longer served; reading it anyway finds no new memory
    assert all(i in graph.keys for i, _ in graph.nearest(now[385], 10))
    assert set(graph.similarities(matrix[0], [ids[0], ids[25]])) == {ids[25]}  # ids[0]'s vector left it
    # most of a user changed: cheaper to build a new graph
    assert patched.refreshed({f"x{i}": i for i in range(400)}, fetch) is None


def test_closing_the_store_stops_a_graph_build():
    from memory.views import BuildCancelled, ViewVectors

    matrix = np.eye(8, 384, dtype=np.float32)
    assert len(ViewVectors.build([str(i) for i in range(8)], matrix).nearest(matrix[3], 1)) == 1
    with pytest.raises(BuildCancelled):
        ViewVectors.build([str(i) for i in range(8)], matrix, cancelled=lambda: True)
