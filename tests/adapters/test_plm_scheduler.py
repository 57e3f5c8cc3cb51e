"""The server's update thread, in process on a tiny random Llama: requests are served one at a
time in the background, a user is updated at most once per gap without holding up others, and
a request a killed process left running is taken up again."""

from __future__ import annotations

import time
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
    UpdateScheduler,
)
from memory import HashEmbedder, MemoryStore
from tests.adapters.plm_helpers import tiny_llama_folder

CONFIG = UpdateConfig(train=TrainConfig(max_steps=2, replay_tokens=32), replay_windows=2,
                      gate=GateConfig(min_fact_recall=0.0, max_ppl_drift=100.0, heldout_windows=2,
                                      heldout_tokens=32, max_new_tokens=4))


@pytest.fixture(scope="module")
def runtime(tmp_path_factory, model_cache_dir) -> PLMRuntime:
    torch.set_num_threads(1)
    folder = tiny_llama_folder(tmp_path_factory.mktemp("tiny"), Path(model_cache_dir))
    return PLMRuntime.load(BaseSpec(cache_dir=Path(model_cache_dir), model_dir=folder, name="tiny"))


def state(store: MemoryStore, request_id: str) -> str:
    return store.training_requests(request_id=request_id)[0].state


def wait(condition, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_user_is_updated_at_most_once_per_gap_and_others_are_not_held_up(runtime, tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    finished: list[str] = []

    class Observer:
        def started(self) -> None: ...

        def finished(self, outcome: str, seconds: float) -> None:
            finished.append(outcome)

    with MemoryStore.open(tmp_path / "m.duckdb", embedder=HashEmbedder()) as store:
        store.add("ann", "The user lives in Tromso.")
        store.add("bob", "The user lives in Lima.")
        first = store.request_training("ann", "interactions")
        stale = store.request_training("bob", "request")
        store.set_training_state(stale.id, "running")  # as a killed server left it
        scheduler = UpdateScheduler(store, registry, lambda: runtime, config=CONFIG, min_gap_s=3600, poll_s=0.05,
                                    observer=Observer())
        scheduler.start()
        try:
            wait(lambda: state(store, first.id) == "done" and state(store, stale.id) == "done")
            again = store.request_training("ann", "interactions")  # ann keeps chatting
            time.sleep(1.0)
            assert state(store, again.id) == "pending"  # waits out the gap
            assert [v.version for v in registry.versions("ann")] == [1]
            assert registry.live("bob").version == 1  # the request left running was taken up again
            assert finished == ["accepted", "accepted"]
        finally:
            scheduler.stop()
        assert not scheduler.running
