"""The gate on the real SmolLM2-135M-Instruct: an update trained on the user's facts goes live;
a poisoned update (trained on answers that contradict the user's memories) is rejected, the
reason is recorded and the previous adapter keeps answering.

The adapters train on the learner's dataset (never on the gate's probe phrasings), a few
epochs of two facts; the benchmark, tests/benchmarks/bench_plm.py, measures recall of twenty."""

from __future__ import annotations

from dataclasses import replace
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
    fact_of,
    run_update,
)
from adapters.plm.facts import probes
from adapters.plm.gate import answers
from learner.datasets import Dataset, build_dataset
from memory import HashEmbedder, MemoryStore

pytestmark = pytest.mark.slow

CONFIG = UpdateConfig(
    # lr 1e-3 measured -0.8% drift with both facts known; 2e-3 drifted +1-4% with the examples
    # in random order (before datasets were ordered by content), too close to the 3% bar.
    train=TrainConfig(epochs=10, lr=1e-3, replay_tokens=48, kl_weight=6.0),
    gate=GateConfig(heldout_windows=8, heldout_tokens=96, max_new_tokens=12),
    replay_windows=16,
)


@pytest.fixture(scope="module")
def runtime(model_cache_dir) -> PLMRuntime:
    torch.set_num_threads(2)
    return PLMRuntime.load(BaseSpec(cache_dir=Path(model_cache_dir)))


def dataset_for(store: MemoryStore, swap: dict[str, str] | None = None) -> Dataset:
    """The learner's dataset for ann, its answers' values swapped (a poisoned one) when asked."""
    dataset = build_dataset(store, "ann", paraphrases=6)

    def swapped(example):  # type: ignore[no-untyped-def]
        output = example.output
        for old, new in (swap or {}).items():
            output = output.replace(old, new)
        return replace(example, output=output,
                       messages=(*example.messages[:-1], {"role": "assistant", "content": output}))

    return replace(dataset, examples=tuple(swapped(e) for e in dataset.examples))


def test_a_poisoned_update_is_rejected_and_the_old_adapter_keeps_answering(runtime, tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    with MemoryStore.open(tmp_path / "m.duckdb", embedder=HashEmbedder()) as store:
        cat, _ = store.add("ann", "The user's cat is named Biscuit.")
        store.add("ann", "The user lives in Tromso.")
        question = probes(fact_of(cat))[0]
        assert "Biscuit" not in answers(runtime, None, [question])[0]  # the base does not know

        good = run_update(store, "ann", runtime=runtime, registry=registry, config=CONFIG, dataset=dataset_for(store))
        assert good.accepted, good.reasons
        assert good.report.ppl_drift <= 0.03

        poison = dataset_for(store, {"Biscuit": "Waffles", "Tromso": "Lima"})
        bad = run_update(store, "ann", runtime=runtime, registry=registry, config=CONFIG, dataset=poison)
    assert not bad.accepted
    assert any("facts" in reason for reason in bad.reasons), bad.reasons
    assert registry.get("ann", 2).status == "rejected" and registry.get("ann", 2).reasons == bad.reasons
    assert registry.live("ann").version == 1
    runtime.load_adapter("live", registry.load_weights("ann", 1))
    try:
        assert "Biscuit" in answers(runtime, "live", [question])[0]
    finally:
        runtime.drop_adapter("live")
