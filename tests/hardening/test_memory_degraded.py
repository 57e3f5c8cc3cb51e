"""The memory path failing: a store locked by another process, a store that hangs or is slow,
a broken text index. Chat is answered within the memory budget, without memory, and the
response says ``x-memlane-memory: degraded``; the upstream gets the request as the client sent it.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.duckdb_faults import invalidate_database
from tests.e2e.fake_upstream import FakeUpstream
from tests.hardening.conftest import assert_openai_error, chat, serving, settings_for
from tests.own_time import with_own_time

BUDGET_MS = 300
ANSWER_WITHIN_S = BUDGET_MS / 1000 + 1.0  # memlane's own time: budget plus room for a shared 2-core machine


@pytest.fixture(scope="module")
def upstream():
    with FakeUpstream() as fake:
        yield fake


def ask(server, text: str) -> tuple[httpx.Response, float]:
    """The answer and memlane's own time for it (the memory path included, the upstream not)."""
    return with_own_time(server.url, lambda: httpx.post(f"{server.url}/v1/chat/completions",
                                                        json=chat(text), timeout=30))


def assert_answered_without_memory(r: httpx.Response, elapsed: float, upstream, text: str) -> None:
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == f"You said: {text}"
    assert r.headers["x-memlane-memory"] == "degraded"
    assert r.headers["x-memlane-memories"] == "0"
    assert upstream.state.requests[-1]["messages"] == [{"role": "user", "content": text}]  # nothing injected
    assert elapsed < ANSWER_WITHIN_S, f"memlane took {elapsed:.2f}s"


def test_memory_works_when_healthy(tmp_path, upstream, store):
    """The control: the same set-up with a healthy store injects the memory."""
    store.add("default", "The user keeps bees on the roof.", source="test")
    with serving(settings_for(tmp_path, upstream.base_url, memory_budget_ms=BUDGET_MS), store) as server:
        r, _ = ask(server, "what do I keep on the roof, bees?")
    assert r.headers["x-memlane-memory"] == "on" and r.headers["x-memlane-memories"] == "1"
    assert "bees" in upstream.state.requests[-1]["messages"][0]["content"]


def test_store_locked_by_another_process(tmp_path, upstream):
    db = tmp_path / "memlane.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
         "print('locked', flush=True); time.sleep(120)", str(db)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with serving(settings_for(tmp_path, upstream.base_url, memory_budget_ms=BUDGET_MS)) as server:
            text = "hello while the file is locked"
            r, elapsed = ask(server, text)
            assert_answered_without_memory(r, elapsed, upstream, text)
            ready = httpx.get(f"{server.url}/readyz")
            listing = httpx.get(f"{server.url}/v1/memories")
    finally:
        holder.kill()
        holder.wait()
    assert ready.status_code == 503  # orchestrators see it
    assert listing.status_code == 503 and assert_openai_error(listing)["code"] == "memory_unavailable"


@pytest.mark.parametrize("failure", ["hangs", "slow"])
def test_store_that_hangs_or_is_slow(tmp_path, upstream, store, failure):
    store.add("default", "The user keeps bees on the roof.", source="test")
    release = threading.Event()
    real_search = store.search

    def stuck_search(*args, **kwargs):
        if failure == "hangs":
            release.wait(60)  # a lock that is never given back (until the test ends)
        else:
            time.sleep(BUDGET_MS / 1000 * 3)
        return real_search(*args, **kwargs)

    store.search = stuck_search
    try:
        with serving(settings_for(tmp_path, upstream.base_url, memory_budget_ms=BUDGET_MS), store) as server:
            # More requests than the default thread pool has workers: stuck searches pile up
            # on threads, and requests still get their answer within the budget.
            for i in range(8):
                text = f"what do I keep on the roof {i}?"
                r, elapsed = ask(server, text)
                assert_answered_without_memory(r, elapsed, upstream, text)
            metrics = httpx.get(f"{server.url}/metrics").text
            release.set()
    finally:
        release.set()
        store.search = real_search
    assert "memlane_memory_failures_total 8.0" in metrics


def test_broken_text_index(tmp_path, upstream, store):
    store.add("default", "The user keeps bees on the roof.", source="test")
    cursor = store._cursor()
    cursor.execute("DROP TABLE memory_postings")  # the BM25 postings, as a corrupted file would leave them
    cursor.execute("CREATE VIEW memory_postings AS SELECT error('postings index is corrupt') AS user_id, "
                   "0::BIGINT AS termid, '' AS id, 0::BIGINT AS len, 0::BIGINT AS tf")
    with serving(settings_for(tmp_path, upstream.base_url, memory_budget_ms=BUDGET_MS), store) as server:
        text = "what do I keep on the roof?"
        r, elapsed = ask(server, text)
    assert_answered_without_memory(r, elapsed, upstream, text)


def test_a_database_duckdb_invalidated_is_reopened_without_a_restart(tmp_path, upstream, store):
    """After a fatal DuckDB error (here a checkpoint that could not write) every query on the
    database fails until it is opened again: memlane keeps answering, reopens it in the
    background, and memory, readiness and the teacher log come back, with nothing lost."""
    store.add("default", "The user keeps bees on the roof.", source="test")
    with serving(settings_for(tmp_path, upstream.base_url, memory_budget_ms=BUDGET_MS), store) as server:
        assert ask(server, "hello before the error")[0].headers["x-memlane-memory"] in ("on", "degraded")
        invalidate_database(store)
        texts = [f"what do I keep on the roof, bees? ({i})" for i in range(40)]
        answers = []
        for text in texts:
            r, _ = ask(server, text)
            answers.append(r)
            if r.headers["x-memlane-memory"] == "on" and store.recoveries:
                break
            time.sleep(0.1)
        ready = httpx.get(f"{server.url}/readyz")
        listing = httpx.get(f"{server.url}/v1/memories")
        store.flush()
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    assert store.recoveries == 1
    assert answers[-1].headers["x-memlane-memory"] == "on" and answers[-1].headers["x-memlane-memories"] == "1"
    assert "bees" in upstream.state.requests[-1]["messages"][0]["content"]
    assert ready.status_code == 200, ready.text
    assert listing.status_code == 200 and len(listing.json()["data"]) == 1
    # Every answered request is in the teacher log, those answered while the database was invalid too
    logged = {row["request_id"] for row in store.interactions(user_id="default", limit=1000)}
    assert {r.headers["x-request-id"] for r in answers} <= logged


def test_a_memories_call_on_an_invalidated_database_gets_a_503_and_starts_the_reopen(tmp_path, upstream, store):
    store.add("default", "The user keeps bees on the roof.", source="test")
    reconnect, store._reconnect = store._reconnect, None  # hold the reopening back to see the error
    with serving(settings_for(tmp_path, upstream.base_url, memory_budget_ms=BUDGET_MS), store) as server:
        invalidate_database(store)
        failed = httpx.get(f"{server.url}/v1/memories")
        store._reconnect = reconnect
        started = httpx.get(f"{server.url}/v1/memories")  # this one starts the reopening
        deadline = time.monotonic() + 10
        while store.recoveries == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        listing = httpx.get(f"{server.url}/v1/memories")
    for r in (failed, started):
        assert r.status_code == 503 and assert_openai_error(r)["code"] == "memory_unavailable"
        assert "retry" in r.json()["error"]["message"]
    assert listing.status_code == 200 and len(listing.json()["data"]) == 1
