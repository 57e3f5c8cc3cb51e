"""`memlane memories ...` on a real DuckDB file."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from proxy.cli import app

runner = CliRunner()


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLANE_EMBEDDER", "hash")
    monkeypatch.setenv("MEMLANE_DATABASE", str(tmp_path / "cli.duckdb"))
    monkeypatch.setenv("COLUMNS", "200")


def run(*args: str):
    result = runner.invoke(app, list(args))
    return result


def test_add_list_search_forget(env):
    r = run("memories", "add", "The user is allergic to peanuts.", "--user", "ada")
    assert r.exit_code == 0, r.output
    memory_id = re.search(r"added: ([0-9a-f]{32})", r.output).group(1)
    assert run("memories", "add", "The user is allergic to peanuts.", "--user", "ada").output.startswith("already known")
    run("memories", "add", "The user's dog is called Biscuit.", "--user", "ada")
    run("memories", "add", "The user lives in Oslo.", "--user", "other")

    listed = run("memories", "list", "--user", "ada").output
    assert "peanuts" in listed and "Biscuit" in listed and "Oslo" not in listed

    found = run("memories", "search", "peanuts allergy", "--user", "ada", "-k", "1").output
    assert "peanuts" in found and "Biscuit" not in found

    assert run("memories", "forget", memory_id, "--user", "other").exit_code == 1  # not theirs
    assert run("memories", "forget", memory_id, "--user", "ada").exit_code == 0
    assert "peanuts" not in run("memories", "list", "--user", "ada").output


def test_bad_configuration_names_the_key(env, monkeypatch):
    monkeypatch.setenv("MEMLANE_MEMORY_TOP_K", "lots")
    r = run("memories", "list", "--user", "ada")
    assert r.exit_code == 2
    assert "MEMLANE_MEMORY_TOP_K" in r.output


def test_reading_a_missing_database_says_so_instead_of_creating_one(env, tmp_path):
    r = run("memories", "list", "--db", str(tmp_path / "nowhere.duckdb"))
    assert r.exit_code == 1 and "no database" in r.output
    assert not (tmp_path / "nowhere.duckdb").exists()
