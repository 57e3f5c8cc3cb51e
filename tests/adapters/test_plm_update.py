"""Update mechanics on a tiny random Llama: the learner's training requests are consumed, an
incremental update starts from the live adapter, training takes the learner's dataset (teacher
answers with soft targets, memory QA pairs with their weights, the gate's probes held out).
What the adapter learns is tested on the real model (test_plm_gate.py) and measured by
tests/benchmarks/bench_plm.py."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
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
    run_request,
    run_requested_updates,
    run_update,
)
from adapters.plm.data import LocalTeacher, dataset_examples, logged_soft_targets
from adapters.plm.update import select_examples
from learner.datasets import build_dataset
from memory import HashEmbedder, InteractionRecord, MemoryStore
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


def log_answer(store: MemoryStore, request_id: str, question: str, answer: str, *, provider: str = "openai",
               status: int = 200, logprobs: dict | None = None) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": question}]}
    store.log_interactions([InteractionRecord(
        request_id=request_id, user_id="ann", created_at=datetime(2026, 3, 1), model="gpt-4o", provider=provider,
        stream=False, status_code=status, error=None, request_received=body, request_sent=body,
        response={"content": answer, "logprobs": logprobs} if status == 200 else None, usage=None,
        latency_ms=1.0, ttft_ms=None,
    )])


def test_teacher_answers_from_the_learners_dataset_carry_soft_targets(runtime, store):
    tok = runtime.tokenizer
    answer = "Paris is the capital of France."
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    logprobs = {"content": [{"token": tok.decode([i]), "logprob": -0.1,
                             "top_logprobs": [{"token": tok.decode([i]), "logprob": -0.1}]} for i in ids]}
    log_answer(store, "req_1", "Capital of France?", answer, logprobs=logprobs)
    log_answer(store, "req_2", "Sky colour?", "Blue.")
    log_answer(store, "req_3", "Hi", "Not a teacher.", provider="local")
    log_answer(store, "req_4", "Hi", "", status=502)
    dataset = build_dataset(store, "ann")
    by_request = {e.request_id: e for e in dataset.examples if e.source == "teacher"}
    assert set(by_request) == {"req_1", "req_2"}  # the local model's own answer and the failed call are not taught
    logged, scored = dataset_examples(tok, [by_request["req_1"], by_request["req_2"]], max_tokens=64,
                                      scorer=LocalTeacher(runtime.base))
    assert logged.soft is not None and [row[0] for row in logged.soft.ids[:-1]] == ids  # from the log
    assert scored.soft is not None and len(scored.soft.ids[0]) == 8  # from the local scorer, top-8
    assert logged_soft_targets(tok, by_request["req_1"].teacher_logprobs[:-1], [*ids, tok.eos_token_id]) is None

    from adapters.plm.data import collate
    from adapters.plm.train import answer_loss

    batch = collate([logged, scored], tok.pad_token_id, runtime.device)
    with torch.no_grad():
        logits = runtime.base(input_ids=batch.input_ids).logits
    total, parts = answer_loss(logits, batch, temperature=2.0, alpha=0.5)
    assert set(parts) == {"hard", "soft"} and torch.isfinite(total)


def test_memory_examples_keep_the_datasets_weight_and_the_gates_probes_stay_held_out(runtime, store, tmp_path):
    from adapters.plm.facts import fact_of, probes

    cat, _ = store.add("ann", "The user's cat is named Biscuit.")
    dataset = build_dataset(store, "ann", paraphrases=6)
    probe = probes(fact_of(cat))[0]
    leaked = replace(dataset.examples[0], id="leak", instruction=probe,
                     messages=(dataset.examples[0].messages[0], {"role": "user", "content": probe},
                               dataset.examples[0].messages[-1]))
    poisoned = replace(dataset, examples=(*dataset.examples, leaked))
    chosen = select_examples(poisoned, set(), UpdateConfig(paraphrases=6), {probe})
    assert len(chosen) == 6 and probe not in {e.instruction for e in chosen}
    examples = dataset_examples(runtime.tokenizer, chosen, max_tokens=64)
    assert {e.weight for e in examples} == {chosen[0].weight} and chosen[0].weight != 1.0
    # the question is the user's turn, as a client asks it: no dataset system prompt
    assert runtime.tokenizer.decode(examples[0].input_ids).count(chosen[0].instruction) == 1
    assert "personal assistant" not in runtime.tokenizer.decode(examples[0].input_ids)


def test_an_incremental_update_starts_from_the_live_adapter_and_records_what_it_saw(runtime, store, tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    first, _ = store.add("ann", "The user lives in Tromso.")
    log_answer(store, "req_t", "Capital of France?", "Paris.")  # a teacher answer it distils
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
    # the conversations it distilled, for the egress policy; the child's weights carry the parent's
    assert registry.get("ann", 1).teacher_requests == ["req_t"] and two.version.teacher_requests == ["req_t"]
    store.forget("ann", second.id)  # nothing listens here: the next update reconciles first
    three = run_update(store, "ann", runtime=runtime, registry=registry, config=config)
    assert registry.get("ann", 2).stale
    assert three.version.parent == 1 and three.version.memory_ids == [first.id]


def test_a_memory_deleted_while_the_update_trains_is_never_served(runtime, store, tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    cat, _ = store.add("ann", "The user's cat is named Biscuit.")
    request = store.request_training("ann", "request")
    config = UpdateConfig(train=TrainConfig(max_steps=2, replay_tokens=32), replay_windows=2,
                          gate=GateConfig(min_fact_recall=0.0, max_ppl_drift=100.0, heldout_windows=2,
                                          heldout_tokens=32, max_new_tokens=4))

    def user_deletes_it() -> bool:  # polled between steps: the user deletes the memory meanwhile
        store.forget("ann", cat.id)
        return False

    result = run_request(store, request, runtime=runtime, registry=registry, config=config,
                         should_stop=user_deletes_it)
    assert result.outcome == "failed" and "deleted" in result.error
    assert registry.versions("ann") == [] and registry.live("ann") is None
    (row,) = store.training_requests(request_id=request.id)
    assert row.state == "failed" and "deleted" in row.error
