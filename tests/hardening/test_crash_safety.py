"""Crash safety: SIGKILL `memlane serve` in the middle of write-heavy load, then look.

Acknowledged means the client got a 2xx and the whole body: a memory added through
``POST /v1/memories`` (committed before the answer), or a chat interaction whose answer was
complete. Chat interactions are written by the learner after the answer, so before the answer
completes each one is appended to the interaction journal (``learner/journal.py``), which a
restart replays: a killed process loses nothing it acknowledged (a power cut can still lose
the journal's last writes: it is not fsynced). After a restart, the learner's durable queue
runs the extraction jobs of the interactions the crash left pending.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from memory import HashEmbedder, MemoryStore
from tests.e2e.conftest import start_server, upstream_config
from tests.e2e.fake_upstream import FakeUpstream
from tests.hardening.conftest import broken_events

WRITERS = 8
LOAD_S = 4.0
ENV = {"OPENAI_API_KEY": "sk-upstream-crash", "MEMLANE_EMBEDDER": "hash", "MEMLANE_PRELOAD_LOCAL_MODEL": "false"}


@dataclass
class Acked:
    memories: dict[str, str] = field(default_factory=dict)  # id -> content
    interactions: set[str] = field(default_factory=set)  # request ids
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def writer(url: str, n: int, stop: threading.Event, acked: Acked) -> None:
    with httpx.Client(base_url=url, timeout=10) as client:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                if i % 2:
                    content = f"Writer {n} note {i} is zq{n:02d}{i:06d}."
                    r = client.post("/v1/memories", json={"content": content})
                    if r.status_code in (200, 201):
                        with acked.lock:
                            acked.memories[r.json()["id"]] = content
                else:
                    stream = i % 4 == 0
                    body = {"model": "gpt-4o-mini", "stream": stream,
                            "messages": [{"role": "user", "content": f"I am allergic to thing{n}x{i}."}]}
                    with client.stream("POST", "/v1/chat/completions", json=body) as r:
                        content = r.read()  # the whole answer: only then is it acknowledged
                    if r.status_code == 200 and (not stream or content.rstrip().endswith(b"[DONE]")):
                        with acked.lock:
                            acked.interactions.add(r.headers["x-request-id"])
            except httpx.HTTPError:
                with acked.lock:
                    acked.failed += 1
                return  # the server is gone


@pytest.fixture(scope="module")
def upstream():
    with FakeUpstream() as fake:
        yield fake


def test_sigkill_under_write_load_loses_nothing_acknowledged(tmp_path, upstream):
    server = start_server(tmp_path, config=upstream_config(upstream), env=ENV)
    acked, stop = Acked(), threading.Event()
    threads = [threading.Thread(target=writer, args=(server.url, n, stop, acked)) for n in range(WRITERS)]
    for t in threads:
        t.start()
    time.sleep(LOAD_S)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)
    stop.set()
    for t in threads:
        t.join(15)
    assert len(acked.memories) > 20 and len(acked.interactions) > 20, "too little load to mean anything"

    # The restarted server opens the database (replaying the killed process's WAL) and gets
    # ready; its learner takes back the jobs the crash left and runs them; a graceful stop
    # runs every job already due.
    restarted = start_server(tmp_path, config=upstream_config(upstream), env=ENV, ready_timeout=90)
    time.sleep(1.0)
    assert restarted.terminate() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    assert not broken_events(restarted.logs())
    assert '"event": "journal_replayed"' in restarted.logs()
    with MemoryStore.open(server.db, embedder=HashEmbedder()) as store:
        found = {m.id: m.content for m in store.list("default", limit=100_000)}
        logged = {row["request_id"] for row in store.interactions(limit=1_000_000)}
        counts = store.job_counts()
    lost_memories = {i for i in acked.memories if found.get(i) != acked.memories[i]}
    extracted = set(found.values())
    lost_rows = acked.interactions - logged
    record = {"acknowledged_memories": len(acked.memories), "acknowledged_interactions": len(acked.interactions),
              "lost_memories": len(lost_memories), "lost_interactions": len(lost_rows), "jobs": counts}
    print("crash_safety", json.dumps(record))
    assert not lost_memories, f"{len(lost_memories)} of {len(acked.memories)} acknowledged memories lost"
    assert not lost_rows, f"{len(lost_rows)} of {len(acked.interactions)} acknowledged interactions lost"
    assert counts["pending"] == 0 and counts["leased"] == 0 and counts["dead"] == 0, counts
    # Each acknowledged interaction's job ran: its fact is a memory now.
    assert sum("allergic to thing" in c for c in extracted) >= len(acked.interactions)

