"""Sensitivity labels and the egress policy: a health memory reaches local models and never an
OpenAI or Anthropic upstream, asserted on the bytes the fake upstreams received."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from datetime import datetime

import pytest
from typer.testing import CliRunner

from adapters.plm.context import ContextRequest, PLMContext
from adapters.plm.registry import AdapterRegistry, AdapterVersion
from memory import HashEmbedder, MemoryStore, Sensitivity, connect
from memory.entry import MemorySource
from memory.interactions import InteractionRecord
from proxy.cli import app as cli_app
from proxy.egress import EgressPolicy, EgressPolicyError
from proxy.settings import Settings, SettingsError
from tests.hardening.test_injection import proxy_with
from tests.proxy.conftest import ENV

HEALTH = "The user kiwi has type 1 diabetes and takes insulin."
FINANCE = "The user kiwi banks at Nordbank with account 12345."
PLAIN = "The user kiwi lives in Oslo."
CREDENTIALS = "The user kiwi wifi password is hunter2."
QUERY = "kiwi diabetes insulin Nordbank account Oslo wifi password"


@pytest.fixture
def store(tmp_path):
    s = MemoryStore.open(tmp_path / "memlane.duckdb", embedder=HashEmbedder())
    yield s
    s.close()


def _labelled(store: MemoryStore) -> None:
    for content, label in ((HEALTH, "health"), (FINANCE, "finance"), (PLAIN, "none"), (CREDENTIALS, "credentials")):
        memory, _ = store.add("default", content, source="api")
        store.update_entry("default", memory.id, sensitivity=label)


def _chat(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": QUERY}]}


def _sent(recorder) -> str:
    """What memlane added to the last request an upstream received (the user's own turn aside)."""
    body = recorder.bodies[-1]
    if "system" in body:  # /v1/messages
        return json.dumps(body["system"])
    return json.dumps([m for m in body["messages"] if m["role"] == "system"])


async def test_health_and_finance_reach_local_models_only(tmp_path, store):
    _labelled(store)
    async with proxy_with(tmp_path, store, egress_policy="health,finance:local") as (client, seen):
        for model in ("local/smollm2-135m-instruct", "gpt-4o-mini", "claude-3-5-haiku", "ollama/llama3"):
            r = await client.post("/v1/chat/completions", json=_chat(model))
            assert r.status_code == 200, r.text
        r = await client.post("/v1/messages", json={**_chat("claude-3-5-haiku"), "max_tokens": 5})
        assert r.status_code == 200, r.text
        assert r.headers["x-memlane-memories"] == "1"
    local = _sent(seen["local"])
    assert "diabetes" in local and "Nordbank" in local and "Oslo" in local
    for upstream in ("openai", "anthropic", "ollama", "messages"):
        sent = _sent(seen[upstream])
        assert "Oslo" in sent, upstream  # unlabelled memories still go everywhere
        assert "diabetes" not in sent and "insulin" not in sent and "Nordbank" not in sent, upstream
    # credentials go nowhere, local included, unless a rule names them
    assert all("hunter2" not in _sent(seen[u]) for u in ("local", "openai", "anthropic", "ollama", "messages"))


async def test_a_rule_can_let_a_label_reach_named_providers(tmp_path, store):
    _labelled(store)
    policy = "health:local,ollama; credentials:local"
    async with proxy_with(tmp_path, store, egress_policy=policy) as (client, seen):
        for model in ("local/smollm2-135m-instruct", "gpt-4o-mini", "ollama/llama3"):
            assert (await client.post("/v1/chat/completions", json=_chat(model))).status_code == 200
    assert "diabetes" in _sent(seen["ollama"]) and "hunter2" not in _sent(seen["ollama"])
    assert "hunter2" in _sent(seen["local"])
    assert "diabetes" not in _sent(seen["openai"]) and "Nordbank" in _sent(seen["openai"])  # finance: no rule


async def test_the_memories_api_sets_and_changes_the_label(tmp_path, store):
    async with proxy_with(tmp_path, store, egress_policy="health:local") as (client, seen):
        r = await client.post("/v1/memories", json={"content": HEALTH, "sensitivity": "health"})
        assert r.status_code == 201 and r.json()["sensitivity"] == "health"
        memory_id = r.json()["id"]
        assert (await client.get(f"/v1/memories/{memory_id}")).json()["sensitivity"] == "health"
        assert "diabetes" not in await _ask(client, seen, "gpt-4o-mini")
        r = await client.patch(f"/v1/memories/{memory_id}", json={"sensitivity": "none"})
        assert r.status_code == 200 and r.json()["sensitivity"] == "none"
        assert "diabetes" in await _ask(client, seen, "gpt-4o-mini")
        r = await client.patch(f"/v1/memories/{memory_id}", json={"sensitivity": "secret"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "sensitivity"
        r = await client.post("/v1/memories", json={"content": PLAIN})
        assert r.json()["sensitivity"] == "none"
        export = (await client.get("/v1/memories/export")).text
        assert {json.loads(line)["sensitivity"] for line in export.splitlines()} == {"none"}


async def _ask(client, seen, model: str) -> str:
    assert (await client.post("/v1/chat/completions", json=_chat(model))).status_code == 200
    return _sent(seen["openai"])


class LearnedContext:
    """The worst case of a personal adapter: it writes back, word for word, every memory its live
    version was trained on and every user turn of the logged conversations it distilled, whatever
    the request retrieved (weights are not filtered per request). It stands in for generation
    with real LoRA weights, which takes seconds a line on a CPU."""

    def __init__(self, store: MemoryStore, registry: AdapterRegistry) -> None:
        self.store, self.registry = store, registry

    async def __call__(self, request: ContextRequest) -> str:
        live = self.registry.live(request.user_id)
        if live is None:
            return ""
        learned = [m.content for m in self.store.get_many(request.user_id, live.memory_ids, relations=False)]
        for row in self.store.interactions(user_id=request.user_id, limit=1000):
            if row["request_id"] in live.teacher_requests:
                learned += [m["content"] for m in row["request_received"]["messages"] if m["role"] == "user"]
        return "\n".join(f"- learned: {text}" for text in learned)


def _train(registry: AdapterRegistry, memory_ids: list[str], teacher_requests: tuple[str, ...] = ()) -> None:
    """A new accepted version, trained on these memories and logged answers, goes live."""
    import torch

    registry.add("default", AdapterVersion(version=0, created_at="", status="accepted", base="test",
                                           memory_ids=memory_ids, teacher_requests=list(teacher_requests)),
                 {"lora_A": torch.zeros(2, 2)})


def _log_turns(store: MemoryStore, conversation: str, turns: list[tuple[str, str]]) -> None:
    """A logged conversation answered by OpenAI: each (request id, user turn) with its history."""
    history: list[dict] = []
    for request_id, text in turns:
        history = [*history, {"role": "user", "content": text}]
        body = {"model": "gpt-4o-mini", "messages": history}
        store.log_interactions([InteractionRecord(
            request_id=request_id, user_id="default", created_at=datetime(2026, 3, 1), model="gpt-4o-mini",
            provider="openai", stream=False, status_code=200, error=None, request_received=body,
            request_sent=body, response={"content": "Noted."}, usage=None, latency_ms=1.0, ttft_ms=None,
            conversation_id=conversation,
        )])
        history = [*history, {"role": "assistant", "content": "Noted."}]


@contextlib.asynccontextmanager
async def personal_proxy(tmp_path, store: MemoryStore, registry: AdapterRegistry) -> AsyncIterator[Callable]:
    """memlane with `health:local` and the personal model's context written by `LearnedContext`:
    yields ask(model, provider) -> (x-memlane-plm, the body that provider received)."""
    question = {"messages": [{"role": "user", "content": "Where does kiwi live?"}]}
    async with proxy_with(tmp_path, store, egress_policy="health:local", plm_context="on", plm=True,
                          plm_dir=tmp_path / "plm", plm_auto_update=False) as (client, seen):
        client.app.state.memlane.recaller.plm = PLMContext(LearnedContext(store, registry), budget_s=5.0)

        async def ask(model: str, provider: str) -> tuple[str, str]:
            r = await client.post("/v1/chat/completions", json={"model": model, **question})
            assert r.status_code == 200, r.text
            return r.headers["x-memlane-plm"], json.dumps(seen[provider].bodies[-1])

        yield ask


async def test_the_personal_models_context_reaches_a_provider_only_if_all_it_learned_may(tmp_path, store):
    health, _ = store.add("default", HEALTH, source="api")
    store.update_entry("default", health.id, sensitivity="health")
    plain, _ = store.add("default", PLAIN, source="api")
    registry = AdapterRegistry(tmp_path / "plm")
    _train(registry, [health.id, plain.id])
    async with personal_proxy(tmp_path, store, registry) as ask:
        plm, sent = await ask("local/smollm2-135m-instruct", "local")
        assert plm == "context" and "learned: " + HEALTH in sent  # health may stay on this machine
        for model, provider in (("gpt-4o-mini", "openai"), ("claude-3-5-haiku", "anthropic"), ("ollama/llama3", "ollama")):
            plm, sent = await ask(model, provider)
            assert plm == "fallback", provider  # plain retrieval instead
            assert "learned:" not in sent and "diabetes" not in sent and "insulin" not in sent, provider
            assert "Oslo" in sent, provider  # the unlabelled memory itself still goes
        _train(registry, [plain.id])  # control: a version that never saw the health memory
        plm, sent = await ask("gpt-4o-mini", "openai")
        assert plm == "context" and "learned: " + PLAIN in sent and "diabetes" not in sent
        _train(registry, [health.id, plain.id])
        store.update_entry("default", health.id, sensitivity="none")  # the label as it is now counts
        plm, sent = await ask("gpt-4o-mini", "openai")
        assert plm == "context" and "learned: " + HEALTH in sent


async def test_an_adapter_that_distilled_a_chat_holding_a_health_fact_keeps_it_local(tmp_path, store):
    """The adapter never trained on the health memory itself, only on a later turn of the chat
    where it was said: its context is still held back from providers health may not reach."""
    _log_turns(store, "conv-health", [("req-said", "I have type 1 diabetes and take insulin."),
                                      ("req-later", "What should I cook tonight?")])
    _log_turns(store, "conv-plain", [("req-plain", "Any tips for a trip to Bergen?")])
    health, _ = store.add("default", HEALTH, source=MemorySource("interaction", "req-said", "rules", "conv-health"))
    store.update_entry("default", health.id, sensitivity="health")
    plain, _ = store.add("default", PLAIN, source=MemorySource("interaction", "req-plain", "rules", "conv-plain"))
    registry = AdapterRegistry(tmp_path / "plm")
    async with personal_proxy(tmp_path, store, registry) as ask:
        _train(registry, [plain.id], teacher_requests=("req-later",))
        plm, sent = await ask("local/smollm2-135m-instruct", "local")
        assert plm == "context" and "diabetes" in sent  # it may stay on this machine
        plm, sent = await ask("gpt-4o-mini", "openai")
        assert plm == "fallback" and "diabetes" not in sent and "insulin" not in sent
        assert "Oslo" in sent  # plain retrieval still goes
        _train(registry, [plain.id], teacher_requests=("req-plain",))  # control: an unrelated chat
        plm, sent = await ask("gpt-4o-mini", "openai")
        assert plm == "context" and "Bergen" in sent and "diabetes" not in sent
        _train(registry, [plain.id], teacher_requests=("req-said",))  # the turn that said it
        plm, sent = await ask("gpt-4o-mini", "openai")
        assert plm == "fallback" and "diabetes" not in sent


def test_the_cli_sets_the_label(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLANE_EMBEDDER", "hash")
    database = tmp_path / "cli.duckdb"
    r = CliRunner().invoke(cli_app, ["memories", "add", HEALTH, "--sensitivity", "health", "--db", str(database)])
    assert r.exit_code == 0, r.output
    memory_id = re.search(r"added: ([0-9a-f]{32})", r.output).group(1)
    r = CliRunner().invoke(cli_app, ["memories", "patch", memory_id, "--sensitivity", "finance", "--db", str(database)])
    assert r.exit_code == 0, r.output
    with MemoryStore.open(database, embedder=HashEmbedder()) as s:
        assert s.get("default", memory_id).sensitivity == Sensitivity.FINANCE
    r = CliRunner().invoke(cli_app, ["memories", "add", PLAIN, "--sensitivity", "secret", "--db", str(database)])
    assert r.exit_code != 0


def test_a_database_from_before_the_label_opens_with_every_memory_unlabelled(tmp_path):
    path = tmp_path / "old.duckdb"
    with MemoryStore.open(path, embedder=HashEmbedder()) as s:
        s.add("default", PLAIN, source="api")
    conn = connect(path)  # take the database back to before m006
    conn.execute("DROP INDEX memories_user")  # DuckDB alters no table an index depends on
    conn.execute("ALTER TABLE memories DROP COLUMN sensitivity")
    conn.execute("CREATE INDEX memories_user ON memories (user_id)")
    conn.execute("DELETE FROM schema_migrations WHERE version = 6")
    conn.close()
    with MemoryStore.open(path, embedder=HashEmbedder()) as s:
        (memory,) = s.list("default")
        assert memory.content == PLAIN and memory.sensitivity == Sensitivity.NONE


@pytest.mark.parametrize("policy", ["health", "health:mars", "secrets:local", "health:local;health:none",
                                    "health:none,local"])
def test_a_bad_policy_fails_at_start_up_naming_the_setting(policy):
    with pytest.raises(EgressPolicyError):
        EgressPolicy.parse(policy)
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({**ENV, "MEMLANE_EGRESS_POLICY": policy})
    assert "egress_policy" in str(caught.value)
