"""Update mechanics on a tiny random Llama: the learner's training requests are consumed, an
incremental update starts from the live adapter, teacher answers from the log become
distillation examples with soft targets. What the adapter learns is tested on the real model
(test_plm_gate.py) and measured by tests/benchmarks/bench_plm.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.plm import (
    AdapterRegistry,
    BaseSpec,
    GateConfig,
    PLMRuntime,
    TrainConfig,
    UpdateConfig,
    run_requested_updates,
    run_update,
)
from adapters.plm.data import LocalTeacher, logged_soft_targets, teacher_examples
from memory import HashEmbedder, MemoryStore
from tests.adapters.plm_helpers import tiny_llama_folder


@pytest.fixture(scope="module")
def runtime(tmp_path_factory, model_cache_dir) -> PLMRuntime:
    torch.set_num_threads(1)
    folder = tiny_llama_folder(tmp_path_factory.mktemp("tiny"), Path(model_cache_dir))
    return PLMRuntime.load(BaseSpec(cache_dir=Path(model_cache_dir), model_dir=folder, name="tiny"))


@pytest.fixture
def store(tmp_path):
    with MemoryStore.open(tmp_path / "m.duckdb", embedder=HashEmbedder()) as s:
        yield s


def test_training_requests_from_the_learner_are_consumed(runtime, store, tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    store.add("ann", "The user lives in Tromso.")
    request = store.request_training("ann", "request")
    config = UpdateConfig(train=TrainConfig(max_steps=2, replay_tokens=32), replay_windows=2,
                          gate=GateConfig(heldout_windows=2, heldout_tokens=32, max_new_tokens=4))
    results = run_requested_updates(store, runtime=runtime, registry=registry, config=config)
    assert [r.user_id for r in results] == ["ann"] and results[0].version.version == 1
    (done,) = store.training_requests(request_id=request.id)
    assert done.state == "done"
    assert (done.error is None) == results[0].accepted  # a rejection is recorded on the request too
    assert store.training_requests(state="pending") == []


def test_teacher_answers_in_the_log_become_distillation_examples_with_soft_targets(runtime, store):
    tok = runtime.tokenizer
    answer = "Paris is the capital of France."
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    logprobs = {"content": [{"token": tok.decode([i]), "logprob": -0.1,
                             "top_logprobs": [{"token": tok.decode([i]), "logprob": -0.1}]} for i in ids]}
    rows = [
        {"status_code": 200, "provider": "openai", "response": {"content": answer, "logprobs": logprobs},
         "request_received": {"messages": [{"role": "user", "content": "Capital of France?"}]}},
        {"status_code": 200, "provider": "openai", "response": {"content": "Blue."},
         "request_received": {"messages": [{"role": "user", "content": "Sky colour?"}]}},
        {"status_code": 200, "provider": "local", "response": {"content": "Not a teacher."},
         "request_received": {"messages": [{"role": "user", "content": "Hi"}]}},
        {"status_code": 502, "provider": "openai", "response": None,
         "request_received": {"messages": [{"role": "user", "content": "Hi"}]}},
    ]
    examples = teacher_examples(tok, rows, max_tokens=64, scorer=LocalTeacher(runtime.base))
    assert len(examples) == 2  # the local model's own answer and the failed call are not taught
    logged, scored = examples
    assert logged.soft is not None and [row[0] for row in logged.soft.ids[:-1]] == ids  # from the log
    assert scored.soft is not None and len(scored.soft.ids[0]) == 8  # from the local scorer, top-8
    assert logged_soft_targets(tok, {"content": logprobs["content"][:-1]}, [*ids, tok.eos_token_id]) is None

    from adapters.plm.data import collate
    from adapters.plm.train import answer_loss

    batch = collate(examples, tok.pad_token_id, runtime.device)
    with torch.no_grad():
        logits = runtime.base(input_ids=batch.input_ids).logits
    total, parts = answer_loss(logits, batch, temperature=2.0, alpha=0.5)
    assert set(parts) == {"hard", "soft"} and torch.isfinite(total)


def test_an_incremental_update_starts_from_the_live_adapter_and_records_what_it_saw(runtime, store, tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    first, _ = store.add("ann", "The user lives in Tromso.")
    lenient = GateConfig(min_fact_recall=0.0, max_ppl_drift=10.0, heldout_windows=2, heldout_tokens=32,
                         max_new_tokens=4)
    config = UpdateConfig(train=TrainConfig(max_steps=2, replay_tokens=32), replay_windows=2, gate=lenient)
    steps: list[tuple[int, int]] = []
    one = run_update(store, "ann", runtime=runtime, registry=registry, config=config,
                     on_step=lambda done, total: steps.append((done, total)))
    assert steps == [(1, 2), (2, 2)]  # what the CLI's progress bar draws
    second, _ = store.add("ann", "The user's cat is named Biscuit.")
    two = run_update(store, "ann", runtime=runtime, registry=registry, config=config)
    assert one.accepted and two.accepted
    assert two.version.parent == 1 and registry.live("ann").version == 2
    assert registry.get("ann", 1).memory_ids == [first.id]
    assert sorted(two.version.memory_ids) == sorted([first.id, second.id])
    store.forget("ann", second.id)  # nothing listens here: the next update reconciles first
    three = run_update(store, "ann", runtime=runtime, registry=registry, config=config)
    assert registry.get("ann", 2).stale
    assert three.version.parent == 1 and three.version.memory_ids == [first.id]
