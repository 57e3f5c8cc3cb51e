"""The adapter registry: versions and the live pointer, rollback, staleness when a memory is
deleted through the store, wiping a user, encryption at rest. No model needed: adapters here
are small tensors."""

from __future__ import annotations

import pytest
import torch

from adapters.plm import (
    AdapterRegistry,
    AdapterVersion,
    DecryptionError,
    RegistryError,
    follow_store,
    reconcile,
)
from adapters.plm.registry import ACCEPTED, REJECTED
from memory import HashEmbedder, MemoryStore


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(4, 8, generator=g)}


def record(memory_ids: list[str], status: str = ACCEPTED, reasons: list[str] | None = None) -> AdapterVersion:
    return AdapterVersion(version=0, created_at="", status=status, base="tiny", memory_ids=memory_ids,
                          reasons=reasons or [])


@pytest.fixture
def registry(tmp_path) -> AdapterRegistry:
    return AdapterRegistry(tmp_path / "adapters")


@pytest.fixture
def store(tmp_path):
    with MemoryStore.open(tmp_path / "m.duckdb", embedder=HashEmbedder()) as s:
        yield s


def test_accepted_versions_go_live_and_rejected_ones_keep_the_previous(registry):
    v1 = registry.add("ann", record(["a"]), weights(1))
    v2 = registry.add("ann", record(["a", "b"], REJECTED, ["knows 0 of 2 facts"]), None)
    assert (v1.version, v2.version) == (1, 2)
    assert registry.live("ann").version == 1
    assert registry.get("ann", 2).reasons == ["knows 0 of 2 facts"] and registry.get("ann", 2).bytes == 0
    assert torch.equal(registry.load_weights("ann", 1)["base_model.model.layers.0.q_proj.lora_A.weight"],
                       weights(1)["base_model.model.layers.0.q_proj.lora_A.weight"])
    with pytest.raises(RegistryError):
        registry.load_weights("ann", 2)
    assert registry.live("bob") is None and registry.versions("bob") == []


def test_rollback_to_the_previous_version_and_to_the_base(registry):
    registry.add("ann", record(["a"]), weights(1))
    registry.add("ann", record(["a", "b"]), weights(2))
    assert registry.rollback("ann").version == 1
    assert registry.live("ann").version == 1
    assert registry.rollback("ann", to=2).version == 2
    assert registry.rollback("ann", to=0) is None and registry.live("ann") is None
    with pytest.raises(RegistryError):
        registry.rollback("ann", to=7)


def test_adapter_files_are_sealed_with_the_users_key(registry, tmp_path):
    registry.add("ann", record(["a"]), weights(1))
    (path,) = registry.user_dir("ann").glob("v0001.adapter")
    assert b"lora_A" not in path.read_bytes()  # safetensors headers name the tensors: not visible
    other = AdapterRegistry(tmp_path / "adapters")
    other.keyring = AdapterRegistry(tmp_path / "elsewhere").keyring  # a keyring without ann's key
    other.keyring.key_for("ann")  # ...which makes a different key for her
    with pytest.raises(DecryptionError):
        other.load_weights("ann", 1)


def test_deleting_a_memory_marks_the_adapters_trained_on_it_stale_and_rolls_back(registry, store):
    follow_store(store, registry)
    keep, _ = store.add("ann", "The user lives in Oslo.")
    gone, _ = store.add("ann", "The user's cat is named Biscuit.")
    registry.add("ann", record([keep.id]), weights(1))
    registry.add("ann", record([keep.id, gone.id]), weights(2))
    assert registry.live("ann").version == 2
    store.forget("ann", gone.id)
    assert [v.stale for v in registry.versions("ann")] == [False, True]
    assert registry.live("ann").version == 1  # the newest version that never saw it
    with pytest.raises(RegistryError):
        registry.load_weights("ann", 2)
    assert not (registry.user_dir("ann") / "v0002.adapter").exists()


def test_a_memory_deleted_while_nobody_listened_is_caught_by_reconcile(registry, store):
    memory, _ = store.add("ann", "The user lives in Oslo.")
    registry.add("ann", record([memory.id]), weights(1))
    store.forget("ann", memory.id)  # no hook registered: e.g. the CLI on the database file
    assert registry.live("ann").version == 1
    assert reconcile(store, registry, "ann") == [1]
    assert registry.live("ann") is None


def test_wiping_a_user_deletes_their_adapters_and_key(registry, store):
    follow_store(store, registry)
    registry.add("ann", record(["a"]), weights(1))
    registry.add("bob", record(["b"]), weights(2))
    store.add("ann", "The user lives in Oslo.")
    store.wipe_user("ann")
    assert registry.versions("ann") == [] and not registry.user_dir("ann").exists()
    assert not registry.keyring.has_key("ann")
    assert registry.live("bob").version == 1 and registry.users() == ["bob"]
