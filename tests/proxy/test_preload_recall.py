"""The learner's preloaded context in the request path, end to end on a loopback server.

The server's learner preloads a user's frequent domains on its learning runs (every
`learn_every` interactions); when retrieval then fails or runs past the budget, a query in a
preloaded domain is answered with that context (`x-memlane-memory: preloaded`) instead of no
memory. Never another user's, never one the user's memories changed since; with
`memory_preload=serve` a query in a preloaded domain skips the search altogether.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from memory import MemoryStore
from tests.e2e.fake_upstream import FakeUpstream
from tests.hardening.conftest import ThreadServer, chat, serving, settings_for
from tests.own_time import with_own_time

BUDGET_MS = 300
FOOD_FACTS = ("I love cooking Italian food and pasta is my favourite dinner.",
              "I never eat peanuts in my food.")
FOOD_QUESTION = "What should I cook for dinner tonight?"


@pytest.fixture(scope="module")
def upstream():
    with FakeUpstream() as fake:
        yield fake


def ask(server: ThreadServer, user: str, text: str) -> httpx.Response:
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat(text), headers={"x-memlane-user": user},
                   timeout=30)
    assert r.status_code == 200, r.text
    return r


def injected(upstream) -> str:
    """The memory block the upstream got (memlane's system message), or "" if none."""
    messages = upstream.state.requests[-1]["messages"]
    return messages[0]["content"] if messages[0]["role"] == "system" else ""


def wait_for(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def preloaded_contents(server: ThreadServer, user: str) -> list[str]:
    cache = server.state.recaller.preloaded
    return [line for context in cache.contexts(user) for line in context.contents]


def learn_food(server: ThreadServer, user: str) -> None:
    """Tell the server two food facts and wait for its learning run to preload them."""
    for text in FOOD_FACTS:
        ask(server, user, text)
    wait_for(lambda: any("peanuts" in line for line in preloaded_contents(server, user)),
             f"the learner to preload {user}'s food memories")
    wait_for(server.state.learner.runner.idle, "the learning run to end")  # its timing probes search too


@contextmanager
def failing_search(store: MemoryStore, failure: str) -> Iterator[list[int]]:
    """Retrieval made to fail: the vector search raises, or answers after three budgets."""
    real_search, calls, release = store.search, [], threading.Event()

    def broken(*args, **kwargs):
        calls.append(1)
        if failure == "raises":
            raise RuntimeError("the vector index is corrupt")
        release.wait(BUDGET_MS / 1000 * 3)
        return real_search(*args, **kwargs)

    store.search = broken
    try:
        yield calls
    finally:
        release.set()
        store.search = real_search


def settings(tmp_path, upstream, **overrides):
    return settings_for(tmp_path, upstream.base_url, **{"memory_budget_ms": BUDGET_MS, "learn_every": 2,
                                                         "learn_min_gap_s": 0, **overrides})


def preloaded_total(server: ThreadServer, reason: str) -> float:
    metrics = httpx.get(f"{server.url}/metrics").text
    line = f'memlane_memory_preloaded_total{{reason="{reason}"}} '
    found = [row for row in metrics.splitlines() if row.startswith(line)]
    return float(found[0].removeprefix(line)) if found else 0.0


@pytest.mark.parametrize("failure", ["raises", "late"])
def test_failed_retrieval_is_answered_with_the_users_preloaded_context(tmp_path, upstream, store, failure):
    with serving(settings(tmp_path, upstream), store) as server:
        learn_food(server, "ada")
        with failing_search(store, failure) as calls:
            r, elapsed = with_own_time(server.url, lambda: ask(server, "ada", FOOD_QUESTION))
        assert calls, "retrieval was attempted first"
        assert r.headers["x-memlane-memory"] == "preloaded"
        assert int(r.headers["x-memlane-memories"]) >= 2
        block = injected(upstream)
        assert "peanuts" in block and "pasta" in block
        assert upstream.state.requests[-1]["messages"][-1] == {"role": "user", "content": FOOD_QUESTION}
        assert elapsed < BUDGET_MS / 1000 + 1.0  # memlane's own time: the fallback adds no wait of its own
        assert preloaded_total(server, "fallback") == 1.0


def test_another_users_preload_is_never_used(tmp_path, upstream, store):
    with serving(settings(tmp_path, upstream), store) as server:
        learn_food(server, "ada")
        with failing_search(store, "raises"):
            r = ask(server, "bob", FOOD_QUESTION)
        assert r.headers["x-memlane-memory"] == "degraded" and r.headers["x-memlane-memories"] == "0"
        assert injected(upstream) == ""
        assert preloaded_total(server, "fallback") == 0.0


def test_a_preload_is_not_used_once_the_users_memories_changed(tmp_path, upstream, store):
    with serving(settings(tmp_path, upstream), store) as server:
        learn_food(server, "ada")
        # A change the learner did not make (the memories API, another process): the preload is stale.
        store.add("ada", "The user gave up pasta and now cooks Japanese food.", source="test")
        with failing_search(store, "raises"):
            r = ask(server, "ada", FOOD_QUESTION)
        assert r.headers["x-memlane-memory"] == "degraded"
        assert injected(upstream) == ""
        assert preloaded_total(server, "fallback") == 0.0


def test_a_learned_fact_refreshes_the_preload_at_once(tmp_path, upstream, store):
    with serving(settings(tmp_path, upstream, learn_every=10), store) as server:
        for text in FOOD_FACTS:
            ask(server, "ada", text)
        wait_for(lambda: server.state.learner.runner.idle() and store.count("ada") >= 2, "the facts to be learned")
        assert preloaded_contents(server, "ada") == []  # no learning run yet (learn_every=10)
        server.state.learner.runner.preload(store, "ada")  # as a learning run would
        ask(server, "ada", "I am a vegetarian.")
        wait_for(lambda: any("vegetarian" in line for line in preloaded_contents(server, "ada")),
                 "the preload to be refreshed with the new food fact")
        with failing_search(store, "raises"):
            r = ask(server, "ada", FOOD_QUESTION)
        assert r.headers["x-memlane-memory"] == "preloaded"
        assert "vegetarian" in injected(upstream)


def test_serve_answers_a_preloaded_domain_without_searching(tmp_path, upstream, store):
    with serving(settings(tmp_path, upstream, memory_preload="serve"), store) as server:
        learn_food(server, "ada")
        with failing_search(store, "raises") as calls:
            r = ask(server, "ada", FOOD_QUESTION)
            assert calls == []  # no embedding, no search
            assert r.headers["x-memlane-memory"] == "preloaded" and "peanuts" in injected(upstream)
            other = ask(server, "ada", "How do I fix a flaky unit test?")  # no preload for this domain
            assert calls and other.headers["x-memlane-memory"] == "degraded"
        assert preloaded_total(server, "served") == 1.0


def test_off_never_reads_a_preload(tmp_path, upstream, store):
    with serving(settings(tmp_path, upstream, memory_preload="off"), store) as server:
        for text in FOOD_FACTS:
            ask(server, "ada", text)
        wait_for(lambda: server.state.learner.runner.idle() and store.count("ada") >= 2, "the facts to be learned")
        assert server.state.recaller.preloaded is None and server.state.learner.runner.preload is None
        with failing_search(store, "raises"):
            r = ask(server, "ada", FOOD_QUESTION)
        assert r.headers["x-memlane-memory"] == "degraded"


def test_the_egress_policy_applies_to_a_preloaded_context(tmp_path, upstream, store):
    store.add("ada", "The user cooks pasta every Sunday.", source="test")
    insulin, _ = store.add("ada", "The user injects insulin before every meal of food.", source="test")
    store.update_entry("ada", insulin.id, sensitivity="health")  # as PATCH /v1/memories/{id} labels it
    with serving(settings(tmp_path, upstream, egress_policy="health:local"), store) as server:
        report = server.state.learner.runner.preload(store, "ada")  # what a learning run does
        assert "food" in report.domains and report.memories_cached >= 2
        with failing_search(store, "raises"):
            r = ask(server, "ada", FOOD_QUESTION)
        assert r.headers["x-memlane-memory"] == "preloaded" and r.headers["x-memlane-memories"] == "1"
        assert "pasta" in injected(upstream) and "insulin" not in injected(upstream)
