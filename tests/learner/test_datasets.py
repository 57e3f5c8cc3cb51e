"""Distillation datasets: QA pairs from memories, teacher answers from the log; deterministic."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from typer.testing import CliRunner

from learner import assemble
from learner.datasets import build_dataset, second_person
from learner.feedback import give_feedback
from memory import HashEmbedder, InteractionRecord, MemoryStore


class Clock:
    def now(self) -> datetime:
        return datetime(2026, 3, 1, 9)


@pytest.fixture
def store(tmp_path):
    with MemoryStore.open(tmp_path / "ds.duckdb", embedder=HashEmbedder(), clock=Clock()) as opened:
        yield opened


def logged(store: MemoryStore, request_id: str, raw: bytes, *, stream: bool = False, provider: str = "openai",
           text: str = "What is a monad?", user: str = "ada") -> None:
    answer, usage = assemble(raw, stream=stream)
    body = {"model": "gpt-4o", "messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": text}]}
    store.log_interactions([InteractionRecord(
        request_id=request_id, user_id=user, created_at=datetime(2026, 3, 1), model="gpt-4o", provider=provider,
        stream=stream, status_code=200, error=None, request_received=body, request_sent=body, response=answer,
        usage=usage, latency_ms=1.0, ttft_ms=None,
    )])


LOGPROBS = {"content": [
    {"token": "A", "logprob": -0.1, "top_logprobs": [{"token": "A", "logprob": -0.1}, {"token": "The", "logprob": -2.5}]},
    {"token": " box", "logprob": -0.3, "top_logprobs": [{"token": " box", "logprob": -0.3}]},
]}


def completion(content: str, logprobs: dict | None = None) -> bytes:
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop",
              "logprobs": logprobs}
    return json.dumps({"id": "chatcmpl-1", "choices": [choice]}).encode()


def fill(store: MemoryStore) -> None:
    store.add("ada", "The user lives in Paris.", source="api")
    store.add("ada", "The user's dog is called Biscuit.", source="api")
    store.add("ada", "The user is allergic to peanuts.", source="extractor:rules", source_ref="req_x")
    store.add("ada", "The user ran a marathon in October.", source="extractor:rules", kind="event")
    store.add("bob", "The user lives in Rome.", source="api")
    logged(store, "req_1", completion("A monad is a box.", LOGPROBS))


@pytest.mark.parametrize(("content", "answer"), [
    ("The user lives in Paris.", "You live in Paris."),
    ("The user's dog is called Biscuit.", "Your dog is called Biscuit."),
    ("The user is allergic to peanuts.", "You are allergic to peanuts."),
    ("The user doesn't eat meat.", "You don't eat meat."),
    ("The user watches films.", "You watch films."),
    ("The user studies law.", "You study law."),
    ("The user has two kids.", "You have two kids."),
    ("The user was born in 1990.", "You were born in 1990."),
    ("The user taught themselves Python.", "You taught yourself Python."),
])
def test_answers_are_the_memory_in_the_second_person(content, answer):
    assert second_person(content) == answer


def test_same_store_gives_byte_identical_output_and_version(store, tmp_path):
    fill(store)
    first, second = build_dataset(store, "ada"), build_dataset(store, "ada")
    assert first.jsonl() == second.jsonl() and first.version == second.version
    assert first.version.startswith("ds-")
    path = tmp_path / "out.jsonl"
    assert first.to_jsonl(path) == len(first.examples)
    assert path.read_bytes() == first.jsonl()
    assert len({build_dataset(store, "ada", seed=seed).version for seed in range(6)}) > 1  # other paraphrases
    store.add("ada", "The user speaks French.", source="api")
    assert build_dataset(store, "ada").version != first.version


def test_the_same_memories_in_another_store_train_in_the_same_order(store, tmp_path):
    """Memory ids are random per store; the questions chosen and the order of the examples (what
    a training run sees, step by step) depend only on what the memories and the log say."""
    fill(store)
    with MemoryStore.open(tmp_path / "other.duckdb", embedder=HashEmbedder(), clock=Clock()) as other:
        fill(other)
        ours, theirs = build_dataset(store, "ada", paraphrases=4), build_dataset(other, "ada", paraphrases=4)
    assert {e.memory_id for e in ours.examples if e.memory_id}.isdisjoint(
        {e.memory_id for e in theirs.examples if e.memory_id})  # different ids ...
    assert [e.messages for e in ours.examples] == [e.messages for e in theirs.examples]  # ... same run


def test_each_memory_gives_several_paraphrased_questions_in_both_formats(store):
    fill(store)
    dataset = build_dataset(store, "ada", paraphrases=3)
    by_answer: dict[str, list] = {}
    for e in dataset.examples:
        if e.source == "memory":
            by_answer.setdefault(e.output, []).append(e)
    assert set(by_answer) == {"You live in Paris.", "Your dog is called Biscuit.", "You are allergic to peanuts.",
                              "You ran a marathon in October."}  # bob's memory is not here
    for examples in by_answer.values():
        assert len({e.instruction for e in examples}) == 3
        for e in examples:
            assert e.messages[-2] == {"role": "user", "content": e.instruction}
            assert e.messages[-1] == {"role": "assistant", "content": e.output}
    assert "Where do I live?" in {e.instruction for e in build_dataset(store, "ada", paraphrases=9).examples}
    assert all("allerg" in e.instruction.lower() for e in by_answer["You are allergic to peanuts."])


def test_weights_follow_confidence_type_and_feedback(store):
    fill(store)
    logged(store, "req_x", completion("Noted."), text="I'm allergic to peanuts.")
    weights = {e.output: e.weight for e in build_dataset(store, "ada").examples if e.source == "memory"}
    assert weights["You live in Paris."] == pytest.approx(0.9)  # user-written fact: 0.9 x 1.0
    assert weights["You are allergic to peanuts."] == pytest.approx(0.6)  # extracted: 0.6 x 1.0
    assert weights["You ran a marathon in October."] == pytest.approx(0.6 * 0.4)  # an event weighs less
    give_feedback(store, "ada", "req_x", rating="good")
    weights = {e.output: e.weight for e in build_dataset(store, "ada").examples if e.source == "memory"}
    assert weights["You are allergic to peanuts."] == pytest.approx(0.6 * 1.5)  # its interaction was rated good


def test_teacher_answers_carry_the_logged_top_logprobs(store):
    fill(store)
    sse = b"".join(
        b"data: " + json.dumps({"id": "chatcmpl-2", "choices": [{"index": 0, "delta": {"content": tok},
                                "logprobs": {"content": [{"token": tok, "logprob": -0.2, "top_logprobs": []}]}}]}).encode()
        + b"\n\n" for tok in ("Hi", " there")
    ) + b"data: [DONE]\n\n"
    logged(store, "req_2", sse, stream=True, text="Say hi")
    logged(store, "req_3", completion("No logprobs here."), text="Anything")
    logged(store, "req_4", completion("I am the local model."), provider="local", text="Who are you?")
    teacher = {e.request_id: e for e in build_dataset(store, "ada").examples if e.source == "teacher"}
    assert set(teacher) == {"req_1", "req_2", "req_3"}  # the local model is not a teacher
    first = teacher["req_1"]
    assert first.instruction == "What is a monad?" and first.output == "A monad is a box."
    assert first.messages[1] == {"role": "system", "content": "Be brief."}  # the client's own system prompt
    assert first.teacher_logprobs == ({"token": "A", "logprob": -0.1, "top": [["A", -0.1], ["The", -2.5]]},
                                      {"token": " box", "logprob": -0.3, "top": [[" box", -0.3]]})
    assert [p["token"] for p in teacher["req_2"].teacher_logprobs] == ["Hi", " there"]
    assert teacher["req_3"].teacher_logprobs is None
    assert store.interaction_for_response("chatcmpl-2")["request_id"] == "req_2"  # the stream's id was kept


def test_cli_exports_the_dataset(tmp_path):
    db = tmp_path / "cli.duckdb"
    with MemoryStore.open(db, embedder=HashEmbedder()) as s:
        s.add("default", "The user lives in Paris.", source="api")
        expected = build_dataset(s, "default")
    from proxy.cli import app

    out = tmp_path / "data.jsonl"
    result = CliRunner().invoke(app, ["datasets", "export", str(out), "--db", str(db)],
                                env={"MEMLANE_EMBEDDER": "hash"})
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == expected.jsonl() and expected.version in result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and {r["output"] for r in rows} == {"You live in Paris."}


def test_questions_use_the_users_own_spelling_of_favourite(store):
    store.add("ada", "The user's favourite colour is teal.", source="api")
    store.add("ada", "The user's favorite sport is judo.", source="api")
    questions = {e.instruction: e.output for e in build_dataset(store, "ada", paraphrases=20).examples if e.source == "memory"}
    colour = [q for q, a in questions.items() if "teal" in a]
    sport = [q for q, a in questions.items() if "judo" in a]
    assert any("favourite colour" in q for q in colour) and not any("favorite" in q for q in colour)
    assert any("favorite sport" in q for q in sport)
