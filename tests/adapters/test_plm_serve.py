"""Serving the personal model through the proxy: each user is answered by their own adapter,
adapters swap per request without a restart, rollback and wipe take effect on the next request.

A tiny random Llama stands in for SmolLM2 (tests/adapters/plm_helpers.py); its adapters are
random LoRA weights, so every adapter answers differently, and "answered by its own adapter"
is checked exactly: the proxied answer equals that adapter's greedy answer computed offline.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.plm import (
    AdapterRegistry,
    AdapterVersion,
    PersonalModel,
    PLMRuntime,
)
from adapters.plm.gate import answers
from memory import HashEmbedder, MemoryStore
from proxy import Settings, create_app
from tests.proxy.conftest import running

QUESTION = "What is my cat's name?"
TOKENS = 8


def random_adapter(runtime: PLMRuntime, seed: int) -> dict[str, torch.Tensor]:
    model = runtime.fresh_adapter("made", seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and ".made." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    weights = runtime.adapter_weights("made")
    runtime.drop_adapter("made")
    return weights


def expected(runtime: PLMRuntime, weights: dict[str, torch.Tensor] | None) -> str:
    if weights is None:
        return answers(runtime, None, [QUESTION], max_new_tokens=TOKENS)[0]
    runtime.load_adapter("check", weights)
    try:
        return answers(runtime, "check", [QUESTION], max_new_tokens=TOKENS)[0]
    finally:
        runtime.drop_adapter("check")


@pytest.fixture
async def proxy(tmp_path, tiny, model_cache_dir):
    registry = AdapterRegistry(tmp_path / "adapters")
    personal = PersonalModel(registry=registry, cache_dir=Path(model_cache_dir), model_dir=tiny, name="tiny")
    settings = Settings.from_env({}, database=tmp_path / "m.duckdb", embedder="hash", memory=False,
                                 preload_local_model=False, plm=True)
    with MemoryStore.open(tmp_path / "m.duckdb", embedder=HashEmbedder()) as store:
        app = create_app(settings, store=store, embedder=HashEmbedder(), personal_model=personal)
        async with running(app) as client:
            client.registry = registry  # type: ignore[attr-defined]
            yield client
    personal.close()


async def ask(client, user: str) -> str:
    response = await client.post(
        "/v1/chat/completions", headers={"x-memlane-user": user},
        json={"model": "plm/tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": TOKENS},
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"].strip()


def add(registry: AdapterRegistry, user: str, weights) -> None:
    registry.add(user, AdapterVersion(version=0, created_at="", status="accepted", base="tiny",
                                      memory_ids=[f"{user}-m"]), weights)


async def test_two_users_are_answered_by_their_own_adapters_and_swap_per_request(proxy, runtime):
    ann, bob = random_adapter(runtime, 1), random_adapter(runtime, 2)
    add(proxy.registry, "ann", ann)
    add(proxy.registry, "bob", bob)
    want = {"ann": expected(runtime, ann), "bob": expected(runtime, bob), "cy": expected(runtime, None)}
    assert len(set(want.values())) == 3  # three different answers: the check below can fail
    for user in ("ann", "bob", "ann", "cy", "bob", "cy", "ann"):
        assert await ask(proxy, user) == want[user], user
    models = (await proxy.get("/v1/models")).json()["data"]
    assert "plm/tiny" in [m["id"] for m in models]


async def test_a_new_version_a_rollback_and_a_wipe_are_served_without_a_restart(proxy, runtime):
    first, second = random_adapter(runtime, 3), random_adapter(runtime, 4)
    add(proxy.registry, "ann", first)
    assert await ask(proxy, "ann") == expected(runtime, first)
    add(proxy.registry, "ann", second)  # a newly accepted version goes live
    assert await ask(proxy, "ann") == expected(runtime, second)
    proxy.registry.rollback("ann")
    assert await ask(proxy, "ann") == expected(runtime, first)
    wiped = await proxy.post("/v1/memories/wipe", headers={"x-memlane-user": "ann"}, json={"confirm": True})
    assert wiped.status_code == 200, wiped.text
    assert proxy.registry.versions("ann") == []
    assert await ask(proxy, "ann") == expected(runtime, None)
