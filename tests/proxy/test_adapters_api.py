"""GET /v1/adapters: the caller's own adapter versions from the registry, metadata only."""

from __future__ import annotations

import torch

from adapters.plm import AdapterRegistry, AdapterVersion
from tests.proxy.conftest import KEYS, PROXY_KEY, TEAM_KEY, running

ALICE = {"authorization": f"Bearer {PROXY_KEY}"}
BOB = {"authorization": f"Bearer {TEAM_KEY}", "x-memlane-user": "bob"}


def version(status: str, **extra) -> AdapterVersion:
    return AdapterVersion(version=0, created_at="", status=status, base="smollm2-135m-instruct",
                          memory_ids=["m1", "m2"], **extra)


async def test_lists_the_callers_versions_newest_first_and_nobody_elses(app_factory, tmp_path):
    registry = AdapterRegistry(tmp_path / "plm")
    registry.add("alice", version("accepted", report={"fact_recall": 1.0, "ppl_drift": -0.01}),
                 {"lora.weight": torch.zeros(2, 2)})
    registry.add("alice", version("rejected", parent=1, reasons=["knows 1 of 2 facts (50%); needs 90%"]), None)
    registry.add("team/carol", version("accepted"), {"lora.weight": torch.ones(2, 2)})

    async with running(app_factory(keys=KEYS, plm_dir=tmp_path / "plm")) as api:
        alice = (await api.get("/v1/adapters", headers=ALICE)).json()
        bob = (await api.get("/v1/adapters?user=team/carol", headers=BOB)).json()
        anonymous = await api.get("/v1/adapters")

    assert alice["object"] == "list"
    assert [(a["version"], a["status"], a["live"]) for a in alice["data"]] == [(2, "rejected", False), (1, "accepted", True)]
    assert alice["data"][0]["reasons"].startswith("knows 1 of 2") and alice["data"][1]["fact_recall"] == 1.0
    assert alice["data"][1]["memories"] == 2 and alice["data"][1]["bytes"] > 0
    assert "memory_ids" not in alice["data"][0]
    assert bob["data"] == []  # team/bob has none; carol's are not reachable by naming her
    assert anonymous.status_code == 401


async def test_no_registry_yet_is_an_empty_list(app_factory, tmp_path):
    async with running(app_factory(keys=KEYS, plm_dir=tmp_path / "nothing-here")) as api:
        response = await api.get("/v1/adapters", headers=ALICE)
    assert response.status_code == 200 and response.json() == {"object": "list", "data": []}
