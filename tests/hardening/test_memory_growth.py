"""Sustained requests leave no growing Python objects: the cheap, in-process guard beside
`tests/benchmarks/bench_load.py` (which measures the server's resident memory over minutes).

A per-request cache that never forgets (keyed by request id, user or model), a task list never
pruned, a recorder that keeps every body: each adds at least one object per request, so 400
requests add hundreds. What the store holds on disk does not count here; the learner is drained
before each count so its queue is empty both times.
"""

from __future__ import annotations

import gc
from collections import Counter

from tests.hardening.test_injection import proxy_with

QUESTIONS = ("What should I cook tonight?", "Plan my weekend.", "Which city do I live in?", "Any tips for sleep?")
FACTS = ("I live in {}.", "My favourite colour is {}.", "I am allergic to {}.", "I work as a {}.")
WORDS = ("Lisbon", "teal", "peanuts", "carpenter", "Oslo", "amber", "pollen", "nurse")
USERS = 10


def _message(i: int) -> str:
    if i % 10 == 0:  # the learner extracts and stores a memory now and then, as in bench_load
        return FACTS[(i // 10) % len(FACTS)].format(f"{WORDS[i % len(WORDS)]} {i}")
    return f"{QUESTIONS[i % len(QUESTIONS)]} (request {i})"


def _objects() -> Counter:
    gc.collect()
    return Counter(type(o).__name__ for o in gc.get_objects())


async def test_requests_leave_no_growing_python_objects(tmp_path, store):
    async with proxy_with(tmp_path, store) as (client, seen):
        state = client.app.state.memlane

        async def send(first: int, n: int) -> None:
            for i in range(first, first + n):
                body = {"model": "gpt-4o-mini", "stream": i % 4 == 0,
                        "messages": [{"role": "user", "content": _message(i)}]}
                r = await client.post("/v1/chat/completions", json=body, headers={"x-memlane-user": f"u{i % USERS}"})
                assert r.status_code == 200, r.text
            assert state.learner.drain(30)
            seen["openai"].bodies.clear()  # the test's own recorder

        await send(0, 200)  # warm-up: first-use caches, each user's first memories
        before = _objects()
        await send(200, 400)
        after = _objects()
    grown = {kind: after[kind] - before[kind] for kind in after if after[kind] - before[kind] >= 100}
    assert store.count() > 0  # the learner did store memories meanwhile
    assert not grown, grown
