"""The learner thread: teacher-log rows, extraction, a bounded queue that never blocks."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime

import learner.worker
from learner import Exchange, LearnerWorker, assemble
from memory import HashEmbedder, MemoryStore


def exchange(i: int, text: str = "I prefer tabs over spaces.", **kw) -> Exchange:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    raw = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                   "finish_reason": "stop"}], "usage": {"total_tokens": 3}}).encode()
    data = dict(request_id=f"req_{i:04d}", user_id="ada", created_at=datetime(2026, 1, 1), model="gpt-4o-mini",
                provider="openai", stream=False, status_code=200, error=None, request_received=body,
                request_sent=body, response_raw=raw, latency_ms=1.0, ttft_ms=None, user_text=text)
    data.update(kw)
    return Exchange(**data)


def test_rows_are_written_and_facts_extracted(tmp_path):
    store = MemoryStore.open(tmp_path / "l.duckdb", embedder=HashEmbedder())
    worker = LearnerWorker(store, HashEmbedder())
    worker.start()
    worker.submit(exchange(1))
    worker.submit(exchange(2, "What's the weather like?"))
    worker.submit(exchange(3, "I live in Paris.", status_code=502, response_raw=b""))
    worker.stop()
    rows = store.interactions(limit=10)
    assert sorted(r["request_id"] for r in rows) == ["req_0001", "req_0002", "req_0003"]
    assert [m.content for m in store.list("ada")] == ["The user prefers tabs over spaces."]  # not from a failed call
    assert store.list("ada")[0].sources[0].ref == "req_0001"


def test_a_turn_with_no_fact_is_written_done_and_never_leased(tmp_path):
    """Leasing and completing a job are the queue's costly statements (each a scan of every
    job ever run): a turn the rules find no fact in is done as it is written; a turn with a
    fact still goes through a lease, and both count for the user's learning triggers."""
    store = MemoryStore.open(tmp_path / "l.duckdb", embedder=HashEmbedder())
    leased: list[str] = []
    lease_jobs = store.lease_jobs

    def counted(*args, **kwargs):
        jobs = lease_jobs(*args, **kwargs)
        leased.extend(j.id for j in jobs)
        return jobs

    store.lease_jobs = counted  # type: ignore[method-assign]
    finished: list[str] = []

    class Observer:
        def queue_depth(self, depth): ...
        def dropped(self): ...
        def written(self, rows): ...
        def extracted(self, n): ...
        def job_finished(self, state): finished.append(state)

    worker = LearnerWorker(store, HashEmbedder(), observer=Observer())
    worker.start()
    worker.submit(exchange(1, "What's the weather like in Lisbon?"))
    worker.submit(exchange(2, "Can you sort this list?"))
    worker.submit(exchange(3, "My dog is called Biscuit."))
    assert worker.drain()
    worker.stop()
    assert leased == ["req_0003"]
    jobs = {j.id: j for j in store.jobs(state="done")}
    assert set(jobs) == {"req_0001", "req_0002", "req_0003"}
    assert jobs["req_0001"].attempts == 1 and jobs["req_0001"].result == {"extractor": "rules", "facts": 0, "memories": []}
    assert jobs["req_0003"].result["facts"] == 1
    assert [m.content for m in store.list("ada")] == ["The user's dog is called Biscuit."]
    assert store.learner_user("ada")["pending"] == 3  # all three count towards the next learning run
    assert finished == ["done"] * 3


def test_a_full_queue_drops_and_counts_without_blocking(tmp_path):
    store = MemoryStore.open(tmp_path / "l.duckdb", embedder=HashEmbedder())
    dropped = []

    class Observer:
        def queue_depth(self, depth): ...
        def dropped(self): dropped.append(1)
        def written(self, rows): ...
        def extracted(self, n): ...

    worker = LearnerWorker(store, HashEmbedder(), maxsize=5, observer=Observer())  # not started: nothing drains
    accepted = [worker.submit(exchange(i)) for i in range(8)]
    assert accepted == [True] * 5 + [False] * 3 and len(dropped) == 3
    worker.start()
    worker.stop()
    assert len(store.interactions(limit=100)) == 5


def test_rows_arriving_one_by_one_go_in_one_batch_without_waking_the_writer_for_each(tmp_path, monkeypatch):
    """The writer waits for more rows by looking at the queue a few times, not by blocking on
    it for each row: each such wake-up took the interpreter lock from the event loop in the
    middle of the request that had just queued its row."""
    monkeypatch.setattr(learner.worker, "_LINGER_S", 1.0)  # the 12 rows arrive well within it
    store = MemoryStore.open(tmp_path / "l.duckdb", embedder=HashEmbedder())
    batches: list[int] = []

    class Observer:
        def queue_depth(self, depth): ...
        def dropped(self): ...
        def written(self, rows): batches.append(rows)
        def extracted(self, n): ...

    worker = LearnerWorker(store, HashEmbedder(), observer=Observer())
    blocking_gets = 0
    get = worker._queue.get

    def counted(block=True, timeout=None):
        nonlocal blocking_gets
        blocking_gets += bool(block)
        return get(block, timeout)

    worker._queue.get = counted  # type: ignore[method-assign]
    worker.start()
    for i in range(12):
        worker.submit(exchange(i, "What's the weather like?"))
        time.sleep(0.01)
    assert worker.drain()
    worker.stop()
    assert batches == [12]
    assert blocking_gets <= 3  # the first row of the batch, the stop, and one spare; was one per row
    assert len(store.interactions(limit=20)) == 12


def test_stop_ends_a_linger_at_once_and_writes_what_it_held(tmp_path, monkeypatch):
    monkeypatch.setattr(learner.worker, "_LINGER_S", 3.0)
    store = MemoryStore.open(tmp_path / "l.duckdb", embedder=HashEmbedder())
    worker = LearnerWorker(store, HashEmbedder())
    worker.start()
    worker.submit(exchange(1, "What's the weather like?"))
    time.sleep(0.02)  # the writer has the row and lingers for more
    started = time.monotonic()
    worker.stop()
    assert time.monotonic() - started < 1.5  # not the rest of the 3 s linger
    assert [r["request_id"] for r in store.interactions(limit=10)] == ["req_0001"]


def test_stop_drains_everything_accepted(tmp_path):
    store = MemoryStore.open(tmp_path / "l.duckdb", embedder=HashEmbedder())
    worker = LearnerWorker(store, HashEmbedder())
    worker.start()
    threads = [threading.Thread(target=lambda k=k: [worker.submit(exchange(k * 100 + i)) for i in range(50)])
               for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    worker.stop()
    assert len(store.interactions(limit=1000)) == 200


def test_a_failing_extractor_does_not_lose_the_log_row(tmp_path):
    store = MemoryStore.open(tmp_path / "l.duckdb", embedder=HashEmbedder())

    def broken(text):
        raise ValueError("extractor bug")

    worker = LearnerWorker(store, HashEmbedder(), extractor=broken)
    worker.start()
    worker.submit(exchange(1))
    worker.submit(exchange(2))
    worker.stop()
    assert len(store.interactions(limit=10)) == 2


def test_assemble_non_stream_and_stream():
    answer, usage = assemble(b'{"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},'
                             b'"finish_reason":"stop"}],"usage":{"total_tokens":2}}', stream=False)
    assert answer == {"role": "assistant", "content": "hi", "finish_reason": "stop"} and usage == {"total_tokens": 2}
    sse = (b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"a"}}]}\n\n'
           b'data: {"choices":[{"index":0,"delta":{"content":"b"},"finish_reason":"length"}]}\n\n'
           b'data: {"choices":[],"usage":{"total_tokens":9}}\n\ndata: [DONE]\n\n')
    answer, usage = assemble(sse, stream=True)
    assert answer == {"role": "assistant", "content": "ab", "finish_reason": "length"} and usage == {"total_tokens": 9}
    assert assemble(b"not json", stream=False) == (None, None)


def test_maintenance_runs_on_its_interval_while_idle(tmp_path):
    passes = []

    class Store:
        def maintain(self):
            passes.append(time.monotonic())
            if len(passes) == 2:
                raise RuntimeError("one bad pass")  # logged; the learner keeps going

        def recover_soon(self, error):  # a failed call hands its error here; only DuckDB's fatal one reopens
            pass

    worker = LearnerWorker(Store(), HashEmbedder(), maintenance_interval_s=0.05)  # type: ignore[arg-type]
    worker.start()
    time.sleep(0.4)
    worker.stop()
    assert len(passes) >= 4
    assert all(b - a >= 0.04 for a, b in zip(passes, passes[1:], strict=False))


def test_each_successful_interaction_is_fed_to_the_nml_model_per_user(tmp_path):
    store = MemoryStore.open(tmp_path / "l.duckdb", embedder=HashEmbedder())
    fed: list[tuple[str, str]] = []

    def feed(user_id: str, text: str) -> None:
        fed.append((user_id, text))
        if len(fed) == 1:
            raise RuntimeError("state file locked")  # logged; later interactions still go in

    worker = LearnerWorker(store, HashEmbedder(), nml_feed=feed)
    worker.start()
    worker.submit(exchange(1))
    worker.submit(exchange(2, "What's the weather like?"))
    worker.submit(exchange(3, "I live in Paris.", status_code=502, response_raw=b""))
    worker.stop()
    assert [user for user, _ in fed] == ["ada", "ada"]  # not the failed call
    assert fed[1][1] == "user: What's the weather like?\nassistant: ok\n"
    assert len(store.interactions(limit=10)) == 3
