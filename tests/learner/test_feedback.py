"""Feedback on answers: each weight, corrections of the memories involved, the API and the CLI."""

from __future__ import annotations

from datetime import datetime

import httpx
import pytest
from typer.testing import CliRunner

from learner.datasets import build_dataset
from learner.feedback import WEIGHTS, UnknownResponse, give_feedback, injected_memories
from memory import HashEmbedder, InteractionRecord, MemoryStore
from proxy import create_app
from proxy.enrich import inject
from tests.proxy.conftest import (
    KEYS,
    PROXY_KEY,
    TEAM_KEY,
    UPSTREAM,
    chat_body,
    completion_json,
    learner_of,
    make_settings,
    running,
)


@pytest.fixture
def store(tmp_path):
    with MemoryStore.open(tmp_path / "memlane.duckdb", embedder=HashEmbedder()) as opened:
        yield opened


def log_exchange(store: MemoryStore, request_id: str, text: str, *, user: str = "ada",
                 injected: list[str] = (), provider: str = "openai", answer: str = "Sure.") -> None:
    received = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    sent, _ = inject(received, list(injected), provider, token_cap=400)
    store.log_interactions([InteractionRecord(
        request_id=request_id, user_id=user, created_at=datetime(2026, 1, 1), model="gpt-4o-mini",
        provider=provider, stream=False, status_code=200, error=None, request_received=received,
        request_sent=sent, response={"role": "assistant", "content": answer, "id": f"chatcmpl-{request_id}"},
        usage=None, latency_ms=5.0, ttft_ms=None,
    )])


@pytest.mark.parametrize(("rating", "correction", "weight"), [
    ("good", None, 1.5), ("bad", None, 0.5), (None, "Paris is the capital of France.", 3.0),
    ("bad", "Paris is the capital of France.", 3.0),
])
def test_each_feedback_weighs_the_interaction_in_the_dataset(store, rating, correction, weight):
    log_exchange(store, "req_1", "What is the capital of France?", answer="Lyon.")
    log_exchange(store, "req_2", "What is the capital of Italy?", answer="Rome.")
    result = give_feedback(store, "ada", "req_1", rating=rating, correction=correction)
    assert result.weight == weight
    examples = {e.request_id: e for e in build_dataset(store, "ada").examples if e.source == "teacher"}
    assert examples["req_1"].weight == weight and examples["req_2"].weight == 1.0
    assert examples["req_1"].output == (correction or "Lyon.")  # a correction is the new target
    assert examples["req_1"].corrected is (correction is not None)
    assert WEIGHTS == {"good": 1.5, "bad": 0.5, "correction": 3.0}


def test_feedback_by_the_completion_id_and_sent_again_replaces_the_first(store):
    log_exchange(store, "req_1", "Hi")
    give_feedback(store, "ada", "chatcmpl-req_1", rating="good")
    give_feedback(store, "ada", "req_1", rating="bad")
    (record,) = store.feedback_of("ada").values()
    assert (record.request_id, record.rating, record.weight) == ("req_1", "bad", 0.5)


def test_a_correction_supersedes_the_injected_memory_it_contradicts(store):
    peanuts, _ = store.add("ada", "The user is allergic to peanuts.", source="api")
    oslo, _ = store.add("ada", "The user lives in Oslo.", source="api")
    log_exchange(store, "req_1", "Suggest a snack.", injected=[peanuts.content, oslo.content])
    assert injected_memories(store, "ada", store.interaction_for_response("req_1")["request_sent"]) == [
        peanuts.id, oslo.id]
    result = give_feedback(store, "ada", "req_1", correction="I'm allergic to cashews, not peanuts.")
    assert result.superseded == (peanuts.id,)
    current = [m.content for m in store.list("ada")]
    assert "The user is allergic to peanuts." not in current and "The user lives in Oslo." in current
    (new,) = [store.get("ada", i) for i in result.created]
    assert "cashews" in new.content and new.validated
    old = store.get("ada", peanuts.id)
    assert old.superseded_by == new.id and not old.is_current  # kept as history


def test_a_correction_fixes_a_memory_extracted_from_that_request(store):
    rome, _ = store.add("ada", "The user lives in Rome.", source="extractor:rules", source_ref="req_1")
    log_exchange(store, "req_1", "I live in Rome.")
    result = give_feedback(store, "ada", "req_1", correction="I live in Milan.")
    assert rome.id in result.involved and result.superseded == (rome.id,)
    assert [m.content for m in store.list("ada")] == ["The user lives in Milan."]
    # the dataset teaches the corrected fact, not the old one
    outputs = {e.output for e in build_dataset(store, "ada").examples if e.source == "memory"}
    assert outputs == {"You live in Milan."}


def test_unknown_or_another_users_response_is_refused(store):
    log_exchange(store, "req_bob", "Hi", user="bob")
    with pytest.raises(UnknownResponse):
        give_feedback(store, "ada", "req_nope", rating="good")
    with pytest.raises(UnknownResponse):
        give_feedback(store, "ada", "req_bob", rating="good")
    assert store.feedback_of("bob") == {}


def test_feedback_needs_a_rating_or_a_correction(store):
    log_exchange(store, "req_1", "Hi")
    with pytest.raises(ValueError):
        give_feedback(store, "ada", "req_1")


# -- over HTTP -------------------------------------------------------------------------


@pytest.fixture
async def client(tmp_path, store):
    app = create_app(make_settings(tmp_path, keys=KEYS), store=store, embedder=HashEmbedder())
    async with running(app) as c:
        c.app = app  # type: ignore[attr-defined]
        yield c


def _auth(key: str = PROXY_KEY) -> dict:
    return {"authorization": f"Bearer {key}"}


@pytest.mark.respx(assert_all_called=True)
async def test_feedback_on_a_chat_answer_by_its_request_id_corrects_the_memory(client, respx_mock, store):
    respx_mock.post(f"{UPSTREAM}/chat/completions").mock(return_value=httpx.Response(200, json=completion_json()))
    chat = await client.post("/v1/chat/completions", json=chat_body("I live in Rome."), headers=_auth())
    assert learner_of(client).drain(5)
    request_id = chat.headers["x-request-id"]
    assert [m.content for m in store.list("alice")] == ["The user lives in Rome."]
    r = await client.post("/v1/feedback", headers=_auth(),
                          json={"response_id": request_id, "correction": "Actually I live in Milan."})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["weight"] == 3.0 and body["request_id"] == request_id and len(body["memories"]["superseded"]) == 1
    assert [m.content for m in store.list("alice")] == ["The user lives in Milan."]


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    ({"response_id": "req_missing", "rating": "good"}, 404, "response_not_found", "response_id"),
    ({"response_id": "req_team", "rating": "good"}, 404, "response_not_found", "response_id"),
    ({"response_id": "req_alice", "rating": "meh"}, 400, "invalid_value", "rating"),
    ({"response_id": "req_alice"}, 400, "missing_required_parameter", "rating"),
    ({"rating": "good"}, 400, "missing_required_parameter", "response_id"),
    ({"response_id": "req_alice", "rating": "good", "stars": 5}, 400, "unknown_parameter", "stars"),
])
async def test_bad_feedback_gets_an_openai_shaped_error(client, store, body, status, code, param):
    log_exchange(store, "req_alice", "Hi", user="alice")
    log_exchange(store, "req_team", "Hi", user="team")
    r = await client.post("/v1/feedback", headers=_auth(), json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert (error["code"], error["param"]) == (code, param) and error["type"] == "invalid_request_error"
    assert store.feedback_of("alice") == {}


async def test_feedback_needs_a_key(client, store):
    r = await client.post("/v1/feedback", json={"response_id": "x", "rating": "good"})
    assert r.status_code == 401 and "error" in r.json()
    r = await client.post("/v1/feedback", headers=_auth(TEAM_KEY), json={"response_id": "x", "rating": "good"})
    assert r.status_code == 404


def test_cli_feedback_on_the_database_file(tmp_path):
    db = tmp_path / "cli.duckdb"
    with MemoryStore.open(db, embedder=HashEmbedder()) as s:
        log_exchange(s, "req_1", "Hi", user="default")
    from proxy.cli import app

    env = {"MEMLANE_EMBEDDER": "hash"}
    runner = CliRunner()
    result = runner.invoke(app, ["feedback", "req_1", "--good", "--db", str(db)], env=env)
    assert result.exit_code == 0, result.output
    assert "x1.5" in result.output
    result = runner.invoke(app, ["feedback", "req_2", "--bad", "--db", str(db)], env=env)
    assert result.exit_code == 1 and "no response req_2" in result.output
    with MemoryStore.open(db, embedder=HashEmbedder()) as s:
        assert s.feedback_of("default")["req_1"].weight == 1.5
