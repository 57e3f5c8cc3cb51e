import concurrent.futures
import os
import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import numpy as np
import pytest

import memory
import memory.indexes
from memory import (
    MIGRATIONS,
    Clock,
    HashEmbedder,
    InteractionRecord,
    MemoryEntry,
    MemoryStore,
    MigrationError,
    ReadOnlyStoreError,
    StoreClosedError,
    connect,
    content_hash,
)
from memory.indexes import EXACT_SQL as EXACT_SEARCH_SQL
from memory.indexes import HNSW_SQL as HNSW_SEARCH_SQL

DIM = 384


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def near(center: np.ndarray, n: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """n unit vectors scattered around `center`; larger noise, lower cosine."""
    return unit(center + noise * rng.standard_normal((n, DIM)).astype(np.float32))


def plan(conn: duckdb.DuckDBPyConnection, sql: str, params: list) -> str:
    return conn.execute("EXPLAIN " + sql, params).fetchall()[0][1]


# -- schema ------------------------------------------------------------------


def test_migrations_are_applied_once_and_recorded(db_path: Path) -> None:
    with MemoryStore.open(db_path, embedder=HashEmbedder()) as store:
        store.add("alice", "The user lives in Lisbon.", source="cli")
    with MemoryStore.open(db_path, embedder=HashEmbedder()) as store:
        assert store.count("alice") == 1  # reopening kept the data
    conn = connect(db_path)
    try:
        rows = conn.execute("SELECT version, name FROM schema_migrations").fetchall()
        indexes = {
            name for (name,) in conn.execute("SELECT index_name FROM duckdb_indexes()").fetchall()
        }
    finally:
        conn.close()
    assert rows[:2] == [(1, "m001_initial"), (2, "m002_pms")]
    assert rows == [(m.version, m.name) for m in MIGRATIONS]  # every migration once, in order
    assert {"memories_user", "memory_vectors_hnsw"} <= indexes


def test_hnsw_index_is_used_after_reopen_and_exact_scan_avoids_it(db_path: Path) -> None:
    rng = np.random.default_rng(0)
    with MemoryStore.open(db_path, embedder=HashEmbedder()) as store:
        store.bulk_add("alice", [f"fact {i}" for i in range(50)], near(np.ones(DIM), 50, 3, rng),
                       source="test")
    conn = connect(db_path)
    try:
        conn.execute("SET hnsw_enable_experimental_persistence = true")
        query = unit(rng.standard_normal(DIM)).tolist()
        top_k = "SELECT id FROM memory_vectors ORDER BY array_cosine_distance(embedding, ?::FLOAT[384]) LIMIT 5"
        assert "HNSW_INDEX_SCAN" in plan(conn, top_k, [query])
        assert "HNSW_INDEX_SCAN" in plan(conn, HNSW_SEARCH_SQL, [query, "alice", 50])
        assert "HNSW_INDEX_SCAN" not in plan(conn, EXACT_SEARCH_SQL, [query, "alice", 5])
    finally:
        conn.close()


def test_read_only_store_reads_but_refuses_writes(db_path: Path) -> None:
    with MemoryStore.open(db_path, embedder=HashEmbedder()) as store:
        memory, _ = store.add("alice", "The user drinks green tea.", source="cli")
    with MemoryStore.open(db_path, embedder=HashEmbedder(), read_only=True) as store:
        assert [m.id for m in store.search_text("alice", "green tea")] == [memory.id]
        with pytest.raises(ReadOnlyStoreError):
            store.add("alice", "Another fact.", source="cli")
        with pytest.raises(ReadOnlyStoreError):
            store.forget("alice", memory.id)


def test_read_only_refuses_an_unmigrated_database(db_path: Path) -> None:
    duckdb.connect(str(db_path)).close()
    with pytest.raises(MigrationError, match="m001_initial"):
        MemoryStore.open(db_path, embedder=HashEmbedder(), read_only=True)


def test_a_database_from_a_newer_memlane_is_refused(db_path: Path) -> None:
    MemoryStore.open(db_path, embedder=HashEmbedder()).close()
    conn = connect(db_path)
    conn.execute("INSERT INTO schema_migrations VALUES (99, 'm099_future', now())")
    conn.close()
    with pytest.raises(MigrationError, match="upgrade memlane"):
        MemoryStore.open(db_path, embedder=HashEmbedder())


def test_embedder_dimension_must_match_the_schema(db_path: Path) -> None:
    with pytest.raises(ValueError, match="384"):
        MemoryStore.open(db_path, embedder=HashEmbedder(dim=8))


# -- writing memories --------------------------------------------------------


def test_content_hash_normalises_case_space_and_trailing_punctuation() -> None:
    assert content_hash("The user likes tea.") == content_hash("  the USER likes\n tea !?")
    assert content_hash("The user likes tea.") != content_hash("The user likes coffee.")


def test_same_content_is_stored_once_per_user(store: MemoryStore) -> None:
    first, created = store.add("alice", "The user likes tea.", source="extractor:rules",
                               source_ref="req-1")
    again, created_again = store.add("alice", "the user  LIKES tea!", source="cli")
    other, created_other = store.add("bob", "The user likes tea.", source="cli")

    assert created and not created_again and created_other
    assert again.id == first.id and again.content == "The user likes tea."
    assert [(s.kind, s.ref) for s in again.sources] == [("interaction", "req-1"), ("cli", None)]
    assert again.created_at == first.created_at and again.confidence.corroboration_count == 1
    assert again.confidence.overall > first.confidence.overall
    assert other.id != first.id
    assert store.count("alice") == 1 and store.count() == 2


def test_empty_content_is_rejected(store: MemoryStore) -> None:
    with pytest.raises(ValueError):
        store.add("alice", "   ", source="cli")


def test_forget_deletes_only_the_owners_memory(store: MemoryStore) -> None:
    memory, _ = store.add("alice", "The user's cat is called Miso.", source="cli")

    assert store.forget("bob", memory.id) is False
    assert store.get("alice", memory.id).content == memory.content
    assert store.forget("alice", memory.id) is True
    assert store.get("alice", memory.id) is None
    assert store.forget("alice", memory.id) is False
    # Forgotten content can be learned again.
    assert store.add("alice", "The user's cat is called Miso.", source="cli")[1] is True


def test_get_and_list_are_per_user_and_newest_first(store: MemoryStore) -> None:
    added = [store.add("alice", f"Fact number {i}.", source="cli")[0] for i in range(5)]
    store.add("bob", "Bob's fact.", source="cli")

    assert store.get("bob", added[0].id) is None
    listed = store.list("alice")
    assert [m.id for m in listed] == [m.id for m in reversed(added)]
    assert all(m.score is None for m in listed)
    assert [m.id for m in store.list("alice", limit=2, offset=1)] == [added[3].id, added[2].id]


def test_bulk_add_skips_duplicates_and_finds_rows_by_vector(store: MemoryStore) -> None:
    store.add("alice", "Already known.", source="cli")
    contents = ["Already known", "New fact one.", "new fact ONE", "New fact two.", " "]
    vectors = HashEmbedder().embed(contents)

    assert store.bulk_add("alice", contents, vectors, source="import") == 2
    assert store.count("alice") == 3
    assert store.bulk_add("alice", contents, vectors, source="import") == 0
    best_id, similarity = store.vector_neighbours("alice", vectors[3], 1)[0]
    best = store.get("alice", best_id)
    assert best.content == "New fact two." and best.sources[0].kind == "import"
    assert similarity == pytest.approx(1.0, abs=1e-5)


# -- search ------------------------------------------------------------------


def test_search_ranks_by_cosine_and_applies_min_score(store: MemoryStore) -> None:
    embedder = HashEmbedder()
    contents = [
        "The user is allergic to peanuts.",
        "The user is allergic to cats.",
        "The user plays the violin on weekends.",
    ]
    for content in contents:
        store.add("alice", content, source="cli")
    query = embedder.embed(["allergic to peanuts"])[0]
    expected = embedder.embed(contents) @ query  # (3,) cosines of unit vectors

    neighbours = store.vector_neighbours("alice", query, 5)
    by_id = {m.id: m.content for m in store.list("alice")}
    assert [by_id[i] for i, _ in neighbours] == [contents[i] for i in np.argsort(-expected)]
    assert [s for _, s in neighbours] == pytest.approx(sorted(expected, reverse=True), abs=1e-5)

    results = store.search("alice", query, k=5)
    assert all(isinstance(m, MemoryEntry) and m.score is not None for m in results)
    assert results[0].content == contents[0]
    threshold = float(expected[1]) - 1e-4
    assert [m.content for m in store.search("alice", query, min_score=threshold)] == contents[:2]
    assert store.search("alice", query, k=0) == []


def test_user_with_few_memories_among_many_similar_ones_gets_their_own_top_k(
    store: MemoryStore,
) -> None:
    rng = np.random.default_rng(7)
    query = unit(rng.standard_normal(DIM))
    # 1,200 memories of other users sit right next to the query ...
    for u in range(3):
        crowd = near(query, 400, 0.02, rng)
        store.bulk_add(f"other-{u}", [f"other {u} {i}" for i in range(400)], crowd, source="test")
    # ... while alice's 8 are much further away.
    mine = near(query, 8, 0.08, rng)
    store.bulk_add("alice", [f"alice {i}" for i in range(8)], mine, source="test")

    results = store.vector_neighbours("alice", query, 5)

    cosines = mine @ query
    expected = [f"alice {i}" for i in np.argsort(-cosines)[:5]]
    assert [m.content for m in store.get_many("alice", [i for i, _ in results])] == expected
    assert [s for _, s in results] == pytest.approx(sorted(cosines, reverse=True)[:5], abs=1e-5)
    assert [m.content for m in store.search("alice", query, k=5, expand_links=False)] == expected
    assert store.search("nobody", query, k=5) == []


def test_the_index_alone_would_have_missed_them(store: MemoryStore, db_path: Path) -> None:
    """Guards the test above: the filtered HNSW scan really returns too few rows."""
    rng = np.random.default_rng(7)
    query = unit(rng.standard_normal(DIM))
    store.bulk_add("other", [f"o {i}" for i in range(400)], near(query, 400, 0.02, rng),
                   source="test")
    store.bulk_add("alice", [f"a {i}" for i in range(8)], near(query, 8, 0.08, rng), source="test")
    store.close()
    conn = connect(db_path)
    try:
        rows = conn.execute(HNSW_SEARCH_SQL, [query.tolist(), "alice", 50]).fetchall()
    finally:
        conn.close()
    assert len(rows) < 5


def test_search_over_a_large_user_uses_the_index_and_stays_per_user(
    store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory.indexes, "EXACT_SCAN_MAX_ROWS", 100)  # 300 rows: the HNSW path
    rng = np.random.default_rng(3)
    query = unit(rng.standard_normal(DIM))
    mine = near(query, 300, 0.5, rng)
    store.bulk_add("alice", [f"alice {i}" for i in range(300)], mine, source="test")
    store.bulk_add("bob", [f"bob {i}" for i in range(300)], near(query, 300, 0.5, rng),
                   source="test")

    found = store.vector_neighbours("alice", query, 10)
    results = store.get_many("alice", [i for i, _ in found])

    assert len(results) == 10 and all(m.user_id == "alice" for m in results)
    scores = [s for _, s in found]
    assert scores == sorted(scores, reverse=True)
    exact_top = {f"alice {i}" for i in np.argsort(-(mine @ query))[:10]}
    assert len(exact_top & {m.content for m in results}) >= 8  # HNSW is approximate


def test_search_rejects_a_malformed_query_vector(store: MemoryStore) -> None:
    with pytest.raises(ValueError):
        store.search("alice", np.ones(10, dtype=np.float32))
    with pytest.raises(ValueError):
        store.search("alice", np.zeros(DIM, dtype=np.float32))


# -- the teacher log ---------------------------------------------------------


def interaction(request_id: str, user_id: str, clock: Clock, **overrides) -> InteractionRecord:
    fields = dict(
        request_id=request_id,
        user_id=user_id,
        created_at=clock.now(),
        model="gpt-4o-mini",
        provider="openai",
        stream=True,
        status_code=200,
        error=None,
        request_received={"messages": [{"role": "user", "content": "Olá, café? ☕"}]},
        request_sent={"messages": [{"role": "system", "content": "memory"}], "n": 1.5},
        response={"choices": [{"message": {"content": "Sim!"}}], "ok": True, "none": None},
        usage={"prompt_tokens": 12, "completion_tokens": 3},
        latency_ms=123.5,
        ttft_ms=45.25,
    )
    fields.update(overrides)
    return InteractionRecord(**fields)


def test_interactions_round_trip_with_json(store: MemoryStore, clock: Clock) -> None:
    first = interaction("req-1", "alice", clock)
    failed = interaction("req-2", "alice", clock, status_code=502, error="upstream timeout",
                         request_sent=None, response=None, usage=None, ttft_ms=None, stream=False)
    bobs = interaction("req-3", "bob", clock)
    store.log_interactions([first, failed, bobs])
    with pytest.raises(duckdb.ConstraintException):  # request ids are unique; a duplicate is a bug
        store.log_interactions([first])

    logged = store.interactions(user_id="alice")
    assert [row["request_id"] for row in logged] == ["req-2", "req-1"]
    assert logged[1] == {
        "request_id": "req-1", "user_id": "alice", "created_at": first.created_at,
        "model": "gpt-4o-mini", "provider": "openai", "stream": True, "status_code": 200,
        "error": None, "request_received": first.request_received,
        "request_sent": first.request_sent, "response": first.response, "usage": first.usage,
        "latency_ms": 123.5, "ttft_ms": 45.25, "conversation_id": None,
    }
    assert logged[0]["error"] == "upstream timeout" and logged[0]["response"] is None
    assert [row["request_id"] for row in store.interactions(limit=2)] == ["req-3", "req-2"]


# -- lifecycle and threads ---------------------------------------------------


def test_ping_and_close(db_path: Path) -> None:
    store = MemoryStore.open(db_path, embedder=HashEmbedder())
    store.ping()
    store.close()
    store.close()
    with pytest.raises(StoreClosedError):
        store.ping()
    with pytest.raises(StoreClosedError):
        store.search_text("alice", "anything")


def test_in_memory_database_works(tmp_path: Path) -> None:
    with MemoryStore.open(":memory:", embedder=HashEmbedder()) as store:
        store.add("alice", "The user is left-handed.", source="api")
        assert store.search_text("alice", "left-handed")[0].content == "The user is left-handed."


def test_searches_in_threads_while_one_thread_writes(store: MemoryStore, clock: Clock) -> None:
    # Regression: an HNSW scan overlapping an insert crashed the process (SIGSEGV in
    # vss/usearch), most often while the index grows past a power of two.
    embedder = HashEmbedder()
    rng = np.random.default_rng(11)
    store.bulk_add("bob", [f"bob likes thing {i}" for i in range(100)],
                   embedder.embed([f"bob likes thing {i}" for i in range(100)]), source="test")
    stop = threading.Event()
    errors: list[BaseException] = []
    seen_rows: list[int] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                results = store.search_text("alice", "alice likes thing", k=5)
                assert all(m.user_id == "alice" for m in results)
                store.ping()
                seen_rows.append(len(results))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for thread in readers:
        thread.start()
    try:
        for i in range(60):
            store.add("alice", f"alice likes thing {i}", source="test")
            store.bulk_add(f"crowd-{i}", [f"crowd {i} {j}" for j in range(16)],
                           unit(rng.standard_normal((16, DIM))), source="test")
            if i % 20 == 0:
                store.log_interactions([interaction(f"req-{i}", "alice", clock)])
    finally:
        stop.set()
        for thread in readers:
            thread.join()

    assert errors == []
    assert store.count("alice") == 60 and store.count() == 100 + 60 * 17
    assert len(store.interactions()) == 3
    assert max(seen_rows) == 5
    assert len(store.search_text("alice", "alice likes thing", k=5)) == 5


def test_the_same_fact_stated_many_times_stays_one_memory(store: MemoryStore) -> None:
    # Regression: touching the duplicate with an UPDATE hung DuckDB's HNSW index after ~190 times.
    for _ in range(300):
        _, created = store.add("alice", "The user prefers tabs.", source="extractor:rules")
    assert store.count("alice") == 1


@pytest.mark.timeout(60, method="thread")  # a hang is inside DuckDB, out of reach of signals
def test_learning_and_forgetting_a_fact_many_times_does_not_hang(
    store: MemoryStore, db_path: Path
) -> None:
    # Regression: vss left a tombstone per deleted row and the ~100th DELETE spun forever.
    for _ in range(250):
        memory, created = store.add("alice", "The user prefers tabs.", source="cli")
        assert created and store.forget("alice", memory.id)
    kept, _ = store.add("alice", "The user prefers tabs.", source="cli")

    assert [m.id for m in store.search_text("alice", "prefers tabs")] == [kept.id]
    store.close()
    conn = connect(db_path)
    try:
        query = HashEmbedder().embed(["tabs"])[0].tolist()
        assert "HNSW_INDEX_SCAN" in plan(conn, HNSW_SEARCH_SQL, [query, "alice", 50])
    finally:
        conn.close()


def test_a_store_left_by_a_crash_reopens_with_its_memories(db_path: Path) -> None:
    writer = (
        "import os, sys\n"
        "from memory import HashEmbedder, MemoryStore\n"
        "store = MemoryStore.open(sys.argv[1], embedder=HashEmbedder())\n"
        "for i in range(20):\n"
        "    store.add('alice', f'The user owns {i} bicycles.', source='cli')\n"
        "doomed, _ = store.add('alice', 'The user hates olives.', source='cli')\n"
        "store.forget('alice', doomed.id)\n"
        "os._exit(0)  # no close, no checkpoint: the WAL must be replayed\n"
    )
    root = Path(memory.__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", writer, str(db_path)], cwd=root, check=True,
                   env={**os.environ, "PYTHONPATH": str(root)}, timeout=60)
    assert Path(f"{db_path}.wal").exists()

    with MemoryStore.open(db_path, embedder=HashEmbedder()) as store:
        assert store.count("alice") == 20
        assert store.search_text("alice", "owns 7 bicycles", k=1)[0].content == (
            "The user owns 7 bicycles."
        )
        assert store.search_text("alice", "hates olives", min_score=0.5) == []
        first = store.list("alice")[0]
        assert store.forget("alice", first.id) and store.count("alice") == 19


def test_a_large_interactions_batch_goes_in_whole(store: MemoryStore, clock: Clock) -> None:
    many = [interaction(f"req-batch-{i:02d}", "carol", clock) for i in range(20)]  # the Arrow path
    store.log_interactions(many)
    logged = store.interactions(user_id="carol")
    assert sorted(r["request_id"] for r in logged) == [r.request_id for r in many]
    assert all(r["request_received"] == many[0].request_received and r["ttft_ms"] == 45.25 for r in logged)


def test_reads_leave_no_transaction_open_to_block_checkpoints(store: MemoryStore) -> None:
    """A thread's cursor that read one row and then sits idle must not hold its transaction:
    while one is open DuckDB neither checkpoints nor frees superseded row versions, and the
    WAL and memory grow with every write (what `fetchone()` did)."""
    entry, _ = store.add("u1", "The user keeps bees on the roof.", source="test")
    store.flush()
    reads = [
        lambda: store.count("u1"),
        lambda: store.user_signature("u1"),
        lambda: store.identity_since(entry.id),
        lambda: store.learner_user("u1"),
        lambda: store.next_job_due(),
        store.ping,
    ]
    with concurrent.futures.ThreadPoolExecutor(1) as worker:  # its thread and cursor stay alive
        for i, read in enumerate(reads):
            worker.submit(read).result()
            assert store.update_entry("u1", entry.id, importance=0.1 * (i + 1))  # a write after the read
            store._cursor().execute("CHECKPOINT")
