"""After DuckDB invalidates the database (a fatal error), the store reopens it and goes on,
with everything committed before the error."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import duckdb
import pytest

from memory import HashEmbedder, MemoryStore
from tests.duckdb_faults import invalidate_database


def contents(store: MemoryStore, user: str = "u1") -> set[str]:
    return {m.content for m in store.list(user)}


def test_an_invalidated_database_is_reopened_with_what_was_committed(store: MemoryStore, db_path: Path) -> None:
    store.add("u1", "The user keeps bees on the roof.", source="test")
    store.add("u1", "The user's sister lives in Porto.", source="test")
    invalidate_database(store)
    with pytest.raises(duckdb.FatalException):
        store.count("u1")

    assert store.recover() is True
    assert store.recoveries == 1
    assert contents(store) == {"The user keeps bees on the roof.", "The user's sister lives in Porto."}
    assert [m.content for m in store.search_text("u1", "bees on the roof", k=1)] == ["The user keeps bees on the roof."]
    store.add("u1", "The user plays the oboe.", source="test")  # writes work again
    assert store.recover() is False  # a healthy database is left alone

    store.close()
    with MemoryStore.open(db_path, embedder=HashEmbedder()) as reopened:
        assert len(contents(reopened)) == 3


def test_other_threads_get_cursors_of_the_new_connection(store: MemoryStore) -> None:
    store.add("u1", "The user keeps bees on the roof.", source="test")
    with concurrent.futures.ThreadPoolExecutor(1) as worker:
        assert worker.submit(store.count, "u1").result() == 1  # this thread's cursor is made now
        invalidate_database(store)
        with pytest.raises(duckdb.FatalException):
            worker.submit(store.count, "u1").result()
        assert store.recover()
        assert worker.submit(store.count, "u1").result() == 1


def test_recover_soon_reopens_in_the_background(store: MemoryStore) -> None:
    store.add("u1", "The user keeps bees on the roof.", source="test")
    invalidate_database(store)
    try:
        store.ping()
    except duckdb.FatalException as exc:
        store.recover_soon(exc)
    else:
        pytest.fail("the invalidated database answered")
    deadline = time.monotonic() + 10
    while store.recoveries == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    store.ping()
    assert contents(store) == {"The user keeps bees on the roof."}


def test_other_errors_do_not_reopen(store: MemoryStore) -> None:
    with pytest.raises(duckdb.CatalogException) as caught:
        store._cursor().execute("SELECT * FROM no_such_table")
    store.recover_soon(caught.value)
    store.flush()
    assert store.recoveries == 0
    assert store.recover() is False


def test_an_in_memory_store_is_not_reopened() -> None:
    with MemoryStore.open(":memory:", embedder=HashEmbedder()) as store:
        store.add("u1", "The user keeps bees on the roof.", source="test")
        assert store.recover() is False
        assert contents(store) == {"The user keeps bees on the roof."}
