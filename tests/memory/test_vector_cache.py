"""Users small enough to search from RAM get the same answers as DuckDB's exact scan."""

from __future__ import annotations

import numpy as np

from memory import MemoryStore
from memory.indexes import EXACT_SQL, fetch_hashed_vectors, fetch_user_vectors
from memory.rows import ARROW_BATCH_ROWS, arrow_table, vector_param


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def test_ram_search_matches_the_exact_sql_scan_and_stays_per_user(store: MemoryStore) -> None:
    rng = np.random.default_rng(5)
    mine, theirs = unit(rng.standard_normal((500, 384))), unit(rng.standard_normal((500, 384)))
    store.bulk_add("alice", [f"alice {i}" for i in range(500)], mine, source="test")
    store.bulk_add("bob", [f"bob {i}" for i in range(500)], theirs, source="test")
    query = unit(rng.standard_normal(384))

    found = store.vector_neighbours("alice", query, 40)
    sql = store._cursor().execute(EXACT_SQL, [vector_param(query), "alice", 40]).fetchall()

    assert [i for i, _ in found] == [i for i, _ in sql]
    assert np.allclose([s for _, s in found], [s for _, s in sql], atol=1e-5)
    assert "alice" in store._vector_cache  # the search above was answered from RAM

    bobs = [i for i, _ in store.vector_neighbours("bob", query, 3)]
    sims = store.similarities("alice", query, [found[0][0], *bobs])
    assert list(sims) == [found[0][0]] and abs(sims[found[0][0]] - found[0][1]) < 1e-5


def test_a_write_drops_the_users_ram_copy_so_new_memories_are_found(store: MemoryStore) -> None:
    rng = np.random.default_rng(6)
    store.bulk_add("alice", [f"alice {i}" for i in range(50)], unit(rng.standard_normal((50, 384))), source="test")
    query = unit(rng.standard_normal(384))
    store.vector_neighbours("alice", query, 5)

    store.bulk_add("alice", ["the query itself"], query[None, :], source="test")
    (best_id, best), *_ = store.vector_neighbours("alice", query, 5)

    assert best > 0.999 and store.get("alice", best_id).content == "the query itself"
    assert store.similarities("alice", query, [best_id])[best_id] > 0.999


def test_vectors_read_in_arrow_batches_come_back_whole_and_in_order(store: MemoryStore) -> None:
    """A user with more vectors than one Arrow batch: every reader gets each vector once, its own."""
    rows = 2 * ARROW_BATCH_ROWS + 7
    vectors = unit(np.random.default_rng(8).standard_normal((rows, 384)))
    assert store.bulk_add("alice", [f"alice {i}" for i in range(rows)], vectors, source="test") == rows
    stored = store._cursor().execute("SELECT id, content FROM memories WHERE user_id = 'alice'").fetchall()
    by_id = {memory_id: vectors[int(content.split()[1])] for memory_id, content in stored}

    batches = arrow_table(store._cursor().execute("SELECT embedding FROM memory_vectors")).to_batches()
    assert len(batches) >= 3 and max(b.num_rows for b in batches) <= ARROW_BATCH_ROWS

    read_ids, matrix = fetch_user_vectors(store._cursor(), "alice")
    assert read_ids == sorted(by_id)
    assert np.array_equal(matrix, np.stack([by_id[i] for i in read_ids]))

    hashed_ids, hashed, hashes = fetch_hashed_vectors(store._cursor(), "alice")
    assert hashed_ids == read_ids and np.array_equal(hashed, matrix) and len(set(hashes)) == rows

    some = read_ids[::997]
    assert {i: v.tolist() for i, v in store.vectors_of("alice", some).items()} == {i: by_id[i].tolist() for i in some}
