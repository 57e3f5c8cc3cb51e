"""At start the server builds the RAM views of the users active most recently (memory/views.py)."""

from __future__ import annotations

import asyncio
import time

from .conftest import running


async def views_after(store, seconds: float) -> set[str]:
    """The users with a view once `seconds` have passed (or all three are built)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        if all(store._views.get(u) is not None for u in ("alice", "bob", "cy")):
            break
    await asyncio.to_thread(store.flush)
    return {u for u in ("alice", "bob", "cy") if store._views.get(u) is not None}


def fill(store) -> None:
    for user in ("alice", "bob", "cy"):
        store.add(user, f"{user.title()} lives in Lisbon.", source="api")
    store._views.settle_s = 0.0  # written a moment ago: no view is built for 2 s after a write


async def test_the_server_preloads_views_so_first_searches_skip_duckdb(app_factory, store):
    fill(store)
    async with running(app_factory()):  # memory_view_preload is on by default
        assert await views_after(store, 10.0) == {"alice", "bob", "cy"}


async def test_preloading_can_be_turned_off(app_factory, store):
    fill(store)
    async with running(app_factory(memory_view_preload=False)):
        assert await views_after(store, 1.0) == set()
