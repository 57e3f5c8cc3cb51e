"""Graceful shutdown: SIGTERM `memlane serve` with 64 streams open.

Each stream either completes or ends with an OpenAI-shaped error event (a stream that would
outlast ``shutdown_grace_s`` is ended by memlane with one), new connections are refused at once,
and every one of the 64 interactions is in the teacher log after the process exits.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest

from memory import HashEmbedder, MemoryStore
from tests.e2e.conftest import start_server, upstream_config
from tests.hardening.conftest import broken_events
from tests.hardening.fault_upstream import FaultUpstream

STREAMS = 64
ENV = {"OPENAI_API_KEY": "sk-upstream-shutdown", "MEMLANE_EMBEDDER": "hash", "MEMLANE_PRELOAD_LOCAL_MODEL": "false"}


@pytest.fixture(scope="module")
def upstream():
    with FaultUpstream() as fake:
        yield fake


async def _streams_through_sigterm(server, fault: str) -> tuple[list[tuple[str, bytes]], BaseException | None, float]:
    """Open the streams, SIGTERM once each has its first bytes, then read them to the end.
    Returns (request id, body) per stream, what a new connection got, and when it got it."""
    started = 0
    all_started = asyncio.Event()
    limits = httpx.Limits(max_connections=STREAMS + 4)

    async def one(client: httpx.AsyncClient) -> tuple[str, bytes]:
        nonlocal started
        body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": f"fault:{fault}"}]}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            chunks = []
            async for chunk in r.aiter_raw():
                if not chunks:
                    started += 1
                    if started == STREAMS:
                        all_started.set()
                chunks.append(chunk)
            return r.headers["x-request-id"], b"".join(chunks)

    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
        tasks = [asyncio.ensure_future(one(client)) for _ in range(STREAMS)]
        await asyncio.wait_for(all_started.wait(), 60)
        server.process.send_signal(signal.SIGTERM)
        refused, sigterm_at = None, time.monotonic()
        while time.monotonic() - sigterm_at < 5:
            try:
                await asyncio.to_thread(httpx.get, f"{server.url}/healthz", timeout=2)
            except httpx.HTTPError as exc:
                refused = exc
                break
            await asyncio.sleep(0.05)
        refused_after = time.monotonic() - sigterm_at
        results = await asyncio.gather(*tasks)
    return results, refused, refused_after


def _outcome(body: bytes) -> str:
    events = [block[len(b"data: "):] for block in body.split(b"\n\n") if block.startswith(b"data: ")]
    assert events and events[-1] == b"[DONE]", body[-300:]
    parsed = [json.loads(e) for e in events[:-1]]
    errors = [e["error"] for e in parsed if "error" in e]
    if errors:
        assert len(errors) == 1 and set(errors[0]) == {"message", "type", "param", "code"}
        return errors[0]["code"]
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"
    return "completed"


def _logged(db) -> dict[str, int]:
    with MemoryStore.open(db, embedder=HashEmbedder()) as store:
        return {row["request_id"]: row["status_code"] for row in store.interactions(limit=100_000)}


@pytest.mark.parametrize("fault,grace,expect", [
    ("drip30", 30, "completed"),  # ~3 s streams, well within the grace period: they finish
    ("drip600", 2, "server_shutting_down"),  # ~60 s streams, a 2 s grace: ended with an error event
], ids=["within-grace", "past-grace"])
def test_sigterm_with_64_open_streams(tmp_path, upstream, fault, grace, expect):
    server = start_server(tmp_path, config=upstream_config(upstream),
                          env={**ENV, "MEMLANE_SHUTDOWN_GRACE_S": str(grace)})
    try:
        results, refused, refused_after = asyncio.run(_streams_through_sigterm(server, fault))
        returncode = server.process.wait(grace + 30)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert returncode in (0, -signal.SIGTERM), server.logs()[-3000:]
    assert isinstance(refused, httpx.ConnectError), f"a new connection got {refused!r}"
    assert refused_after < 2.0
    assert [_outcome(body) for _, body in results] == [expect] * STREAMS
    logged = _logged(server.db)
    assert all(rid in logged for rid, _ in results), f"{sum(r not in logged for r, _ in results)} rows missing"
    assert {logged[rid] for rid, _ in results} == ({200} if expect == "completed" else {503})
    assert upstream.attempts(fault) >= STREAMS
    assert not broken_events(server.logs())
