"""`memlane adapters list | rollback` on a registry folder, as a user at a terminal runs them."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from adapters.plm import AdapterRegistry, AdapterVersion
from proxy.cli import app


def add(registry: AdapterRegistry, status: str, reasons: list[str] | None = None) -> None:
    weights = {"x.lora_A.weight": torch.ones(2, 2)} if status == "accepted" else None
    registry.add("ann", AdapterVersion(version=0, created_at="", status=status, base="tiny", memory_ids=["m"],
                                       reasons=reasons or [], report={"fact_recall": 0.95, "ppl_drift": 0.004}),
                 weights)


def test_list_shows_versions_and_rollback_changes_what_is_served(tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    add(registry, "accepted")
    add(registry, "accepted")
    add(registry, "rejected", ["knows 1 of 20 facts (5%); needs 90%"])
    runner = CliRunner()
    env = {"MEMLANE_PLM_DIR": str(tmp_path / "adapters")}

    listed = runner.invoke(app, ["adapters", "list", "--user", "ann", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    data = json.loads(listed.output)
    assert data["live"] == 2
    assert [(v["version"], v["status"]) for v in data["versions"]] == [(1, "accepted"), (2, "accepted"), (3, "rejected")]
    assert data["versions"][2]["reasons"] == ["knows 1 of 20 facts (5%); needs 90%"]

    rolled = runner.invoke(app, ["adapters", "rollback", "--user", "ann"], env=env)
    assert rolled.exit_code == 0 and "version 1" in rolled.output
    assert registry.live("ann").version == 1
    refused = runner.invoke(app, ["adapters", "rollback", "--user", "ann", "--to", "3"], env=env)
    assert refused.exit_code == 1 and "not a usable adapter" in refused.output
    table = runner.invoke(app, ["adapters", "list", "--user", "ann"], env=env)
    assert table.exit_code == 0 and "┃" in table.output  # the table (its width follows the terminal)
    nobody = runner.invoke(app, ["adapters", "list", "--user", "bob"], env=env)
    assert "the base model answers" in nobody.output
