"""The interaction journal: segments come and go with the learner's commits, and a start after a
killed run replays exactly what the database lacks."""

from __future__ import annotations

import json
from datetime import datetime

from learner import journal as journal_module
from learner.journal import InteractionJournal
from learner.worker import Exchange, LearnerWorker, exchange_from, exchange_line
from memory import HashEmbedder, MemoryStore


def exchange(n: int, text: str = "What is the weather like?") -> Exchange:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    raw = b'data: {"choices":[{"index":0,"delta":{"content":"Sunny \\u00e9\\n"}}]}\n\ndata: [DONE]\n\n'
    return Exchange(f"req_{n:04d}", "default", datetime(2026, 1, 1, 12, 0, n % 60), "gpt-4o-mini", "openai",
                    True, 200, None, body, body, raw + bytes([0xFF]), 12.5, 3.0, text, "conv_1")


def test_an_exchange_survives_the_round_trip_byte_for_byte():
    e = exchange(1, "I live in Zürich\nand\u2028more")
    line = exchange_line(e)
    assert b"\n" not in line
    assert exchange_from(json.loads(line)) == e


def test_segments_are_deleted_once_committed(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "SEGMENT_ROWS", 10)
    j = InteractionJournal(tmp_path)
    for n in range(35):
        j.append(exchange_line(exchange(n)))
    assert len(list(tmp_path.iterdir())) == 4
    j.committed(25)  # the first two segments are done; the third is half done
    assert len(list(tmp_path.iterdir())) == 2
    j.committed(10)
    j.close()
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_a_killed_run_are_read_back_and_a_torn_line_skipped(tmp_path):
    j = InteractionJournal(tmp_path)
    for n in range(3):
        j.append(exchange_line(exchange(n)))
    segment = next(tmp_path.iterdir())
    with segment.open("ab") as f:
        f.write(exchange_line(exchange(3))[:40])  # the write the kill interrupted
    again = InteractionJournal(tmp_path)  # no close(): the process died
    assert [d["request_id"] for d in again.leftovers()] == ["req_0000", "req_0001", "req_0002"]
    again.append(exchange_line(exchange(9)))  # a new segment: the old one is not written to again
    again.forget_leftovers()
    assert not segment.exists() and len(list(tmp_path.iterdir())) == 1


def test_the_learner_replays_only_what_the_database_lacks(tmp_path):
    store = MemoryStore.open(tmp_path / "memlane.duckdb", embedder=HashEmbedder())
    try:
        first = LearnerWorker(store, HashEmbedder(), journal=InteractionJournal(tmp_path / "journal"))
        logged_before_the_kill = exchange(0, "I am allergic to peanuts.")
        first._process([logged_before_the_kill])  # written to the database, the journal not yet trimmed
        # The killed run's journal: one exchange already logged, two that were not.
        killed = InteractionJournal(tmp_path / "journal")
        for e in (logged_before_the_kill, exchange(1, "I live in Lisbon."), exchange(2)):
            killed.append(exchange_line(e))
        learner = LearnerWorker(store, HashEmbedder(), journal=InteractionJournal(tmp_path / "journal"))
        learner.start()
        assert learner.drain(20)
        learner.stop()
        assert sorted(r["request_id"] for r in store.interactions(limit=100)) == ["req_0000", "req_0001", "req_0002"]
        assert {m.content for m in store.list("default")} >= {"The user is allergic to peanuts.",
                                                              "The user lives in Lisbon."}
        assert store.job_counts()["pending"] == 0
        assert list((tmp_path / "journal").iterdir()) == []
    finally:
        store.close()
