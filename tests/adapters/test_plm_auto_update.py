"""The server keeps the personal model up to date by itself: `memlane serve` with the PLM on
trains, gates and serves new adapter versions as the learner asks, without the CLI.

A real server runs on loopback (`memlane serve` in a child process, the openai SDK as client)
on the tiny random Llama of plm_helpers.py, so an update takes seconds. Its answers are
checked exactly: the proxied `plm/tiny` answer equals the live adapter's greedy answer computed
here from the registry's file.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI

from adapters.plm import (
    AdapterRegistry,
    GateConfig,
    PLMRuntime,
    TrainConfig,
    UpdateConfig,
    run_update,
)
from adapters.plm.gate import answers
from memory import HashEmbedder, MemoryStore
from tests.e2e.conftest import Server, start_server

QUESTION = "What is my cat's name?"
TOKENS = 8
STATEMENTS = ("My cat is named Biscuit.", "I live in Tromso.", "My favourite colour is teal.")
FAST = """
learn_every = 3
learn_min_gap_s = 0
plm_update_min_gap_s = 0
plm_update_poll_s = 0.2
[plm_training]
replay_windows = 2
[plm_training.train]
{train}
replay_tokens = 32
[plm_training.gate]
{gate}
heldout_windows = 2
heldout_tokens = 32
max_new_tokens = 4
"""
LENIENT_GATE = "min_fact_recall = 0.0\nmax_ppl_drift = 100.0"
QUICK_TRAINING = "max_steps = 6\nlr = 0.05"


def serve(tmp_path: Path, tiny: Path, model_cache_dir: Any, *, train: str, gate: str) -> Server:
    return start_server(tmp_path, config=FAST.format(train=train, gate=gate), env={
        "MEMLANE_PLM": "true", "MEMLANE_PLM_DIR": str(tmp_path / "adapters"),
        "MEMLANE_MODEL_CACHE": str(model_cache_dir), "MEMLANE_LOCAL_MODEL_DIR": str(tiny),
        "MEMLANE_LOCAL_MODEL_NAME": "tiny", "MEMLANE_EMBEDDER": "hash", "MEMLANE_MEMORY": "false",
        "MEMLANE_PRELOAD_LOCAL_MODEL": "false", "MEMLANE_TORCH_THREADS": "1",
    })


def chat(server: Server, model: str, text: str) -> str:
    client = OpenAI(base_url=server.base_url, api_key="unused", timeout=120)
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                           max_tokens=TOKENS, temperature=0)
    return (reply.choices[0].message.content or "").strip()  # as `answers` gives them


def adapters(server: Server) -> list[dict]:
    return httpx.get(f"{server.url}/v1/adapters", timeout=30).json()["data"]


def memories(server: Server) -> list[dict]:
    return httpx.get(f"{server.url}/v1/memories", timeout=30).json()["data"]


def wait_for(what: Callable[[], Any], timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError("timed out")


def expected(runtime: PLMRuntime, registry: AdapterRegistry, version: int | None) -> str:
    if version is None:
        return answers(runtime, None, [QUESTION], max_new_tokens=TOKENS)[0]
    runtime.load_adapter("check", registry.load_weights("default", version))
    try:
        return answers(runtime, "check", [QUESTION], max_new_tokens=TOKENS)[0]
    finally:
        runtime.drop_adapter("check")


def requests_in(db: Path) -> list[Any]:
    with MemoryStore.open(db, embedder=HashEmbedder()) as store:
        return store.training_requests(user_id="default")


def stop(server: Server) -> None:
    """SIGTERM; the server ends its lifespan cleanly (uvicorn then re-raises the signal)."""
    assert server.terminate() in (0, -signal.SIGTERM)
    assert '"memlane_stopped"' in server.logs()


def metric(server: Server, line_start: str) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=30).text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_chatting_enough_makes_the_server_train_gate_and_serve_a_new_adapter(tmp_path, tiny, runtime,
                                                                              model_cache_dir):
    server = serve(tmp_path, tiny, model_cache_dir, train=QUICK_TRAINING, gate=LENIENT_GATE)
    try:
        base_answer = expected(runtime, AdapterRegistry(tmp_path / "adapters"), None)
        for statement in STATEMENTS:  # learn_every = 3: the learner asks for an update
            chat(server, "local/tiny", statement)
        (live,) = wait_for(lambda: [a for a in adapters(server) if a["live"]])
        assert live["version"] == 1 and live["status"] == "accepted" and live["memories"] == 3
        registry = AdapterRegistry(tmp_path / "adapters")
        assert registry.get("default", 1).training["dataset"].startswith("ds-")  # the learner's dataset
        now = chat(server, "plm/tiny", QUESTION)
        assert now == expected(runtime, registry, 1) and now != base_answer  # served with the new adapter
        assert metric(server, 'memlane_plm_updates_total{outcome="accepted"}') == 1
        assert metric(server, "memlane_plm_updates_started_total") == 1
        assert metric(server, "memlane_plm_update_seconds_count") == 1
    finally:
        stop(server)
    logs = server.logs()
    assert "plm_update_started" in logs and "plm_update_finished" in logs
    assert "Biscuit" not in logs and "Tromso" not in logs  # no message content in the logs
    assert [(r.reason, r.state, r.error) for r in requests_in(server.db)] == [("interactions", "done", None)]


def seed_live_adapter(tmp_path: Path, runtime: PLMRuntime) -> None:
    """Version 1, accepted, trained on a memory no probe asks about."""
    lenient = UpdateConfig(train=TrainConfig(max_steps=4, lr=0.05, replay_tokens=32), replay_windows=2,
                           gate=GateConfig(min_fact_recall=0.0, max_ppl_drift=100.0, heldout_windows=2,
                                           heldout_tokens=32, max_new_tokens=4))
    with MemoryStore.open(tmp_path / "memlane.duckdb", embedder=HashEmbedder()) as store:
        store.add("default", "The user enjoys chess.")
        first = run_update(store, "default", runtime=runtime, registry=AdapterRegistry(tmp_path / "adapters"),
                           config=lenient)
    assert first.accepted


def test_a_gate_rejection_keeps_the_previous_adapter_live_and_records_why(tmp_path, tiny, runtime, model_cache_dir):
    seed_live_adapter(tmp_path, runtime)
    registry = AdapterRegistry(tmp_path / "adapters")
    before = expected(runtime, registry, 1)
    # the default fact bar (90%): two training steps cannot teach the tiny model a fact
    server = serve(tmp_path, tiny, model_cache_dir, train="max_steps = 2", gate="")
    try:
        chat(server, "local/tiny", STATEMENTS[0])
        wait_for(lambda: len(memories(server)) == 2)
        httpx.post(f"{server.url}/v1/learn", timeout=60).raise_for_status()  # on request
        rejected = wait_for(lambda: [a for a in adapters(server) if a["version"] == 2])[0]
        assert rejected["status"] == "rejected" and not rejected["live"]
        assert "facts" in rejected["reasons"]
        assert [a["version"] for a in adapters(server) if a["live"]] == [1]
        assert chat(server, "plm/tiny", QUESTION) == before  # version 1 keeps answering
        assert metric(server, 'memlane_plm_updates_total{outcome="rejected"}') == 1
    finally:
        stop(server)
    (request,) = requests_in(server.db)
    assert request.state == "done" and "facts" in request.error
    assert registry.get("default", 2).reasons and registry.get("default", 2).bytes == 0


def test_stopping_the_server_mid_update_registers_nothing_and_keeps_the_request(tmp_path, tiny, runtime,
                                                                               model_cache_dir):
    seed_live_adapter(tmp_path, runtime)
    folder = AdapterRegistry(tmp_path / "adapters").user_dir("default")
    files = sorted(p.name for p in folder.iterdir())
    server = serve(tmp_path, tiny, model_cache_dir, train="epochs = 100000", gate=LENIENT_GATE)  # a long one
    chat(server, "local/tiny", STATEMENTS[0])
    wait_for(lambda: len(memories(server)) == 2)
    httpx.post(f"{server.url}/v1/learn", timeout=60).raise_for_status()
    wait_for(lambda: "plm_train_step" in server.logs())
    started = time.monotonic()
    stop(server)
    assert time.monotonic() - started < 30  # stopped at the next step, not at the end of training
    assert "plm_update_cancelled" in server.logs()
    assert sorted(p.name for p in folder.iterdir()) == files  # no new or half-written adapter file
    registry = AdapterRegistry(tmp_path / "adapters")
    assert [v.version for v in registry.versions("default")] == [1] and registry.live("default").version == 1
    (request,) = requests_in(server.db)
    assert (request.reason, request.state) == ("request", "pending")  # the next start trains it
