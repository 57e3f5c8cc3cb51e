"""`memlane memories ...` on a real DuckDB file, and through a server when another process holds it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import uvicorn
from typer.testing import CliRunner

from proxy.cli import app

runner = CliRunner()


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLANE_EMBEDDER", "hash")
    monkeypatch.setenv("MEMLANE_DATABASE", str(tmp_path / "cli.duckdb"))
    monkeypatch.setenv("COLUMNS", "200")


def run(*args: str, input: str | None = None):
    result = runner.invoke(app, list(args), input=input)
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


def added_id(output: str) -> str:
    return re.search(r"added: ([0-9a-f]{32})", output).group(1)


def test_search_explain_shows_the_score_parts(env):
    run("memories", "add", "The user drinks green tea every morning.", "--user", "ada")
    plain = run("memories", "search", "green tea", "--user", "ada").output
    assert "score" in plain and "vector" not in plain
    explained = run("memories", "search", "green tea", "--user", "ada", "--explain").output
    header = explained.splitlines()[1]
    for part in ("score", "vector", "text", "recency", "importance", "confidence", "frequency", "tier", "link"):
        assert part in header


def test_add_with_fields_get_patch_and_list_history(env):
    r = run("memories", "add", "The user lives in Paris.", "--user", "ada", "--tag", "home", "--domain", "life",
            "--importance", "0.9", "--type", "fact")
    paris = added_id(r.output)
    r = run("memories", "add", "The user lives in Berlin.", "--user", "ada")
    assert f"(supersedes {paris})" in r.output
    berlin = added_id(r.output)

    shown = json.loads(run("memories", "get", paris, "--user", "ada").output)
    assert shown["tags"] == ["home"] and shown["domains"] == ["life"] and shown["superseded_by"] == berlin
    assert run("memories", "get", paris, "--user", "bob").exit_code == 1

    assert "Paris" not in run("memories", "list", "--user", "ada").output
    assert "Paris" in run("memories", "list", "--user", "ada", "--history").output

    r = run("memories", "patch", berlin, "--user", "ada", "--content", "The user lives in Lisbon.",
            "--tier", "persistent", "--not-validated", "--tag", "city")
    assert r.exit_code == 0 and f"updated: {berlin}" in r.output
    shown = json.loads(run("memories", "get", berlin, "--user", "ada").output)
    assert (shown["content"], shown["tier"], shown["validated"], shown["tags"]) == (
        "The user lives in Lisbon.", "PERSISTENT", False, ["city"])
    bad = run("memories", "patch", berlin, "--user", "ada", "--importance", "3")
    assert bad.exit_code == 1 and "importance" in bad.output
    assert run("memories", "patch", berlin, "--user", "bob", "--importance", "1").exit_code == 1


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_export_import_into_another_user_and_wipe(env, tmp_path, suffix):
    run("memories", "add", "The user is allergic to peanuts.", "--user", "ada")
    run("memories", "add", "The user lives in Oslo.", "--user", "ada")
    path = tmp_path / f"ada.{suffix}"
    r = run("memories", "export", str(path), "--user", "ada")
    assert r.exit_code == 0 and "exported 2 memories" in r.output and path.exists()

    assert "imported 2 memories, skipped 0" in run("memories", "import", str(path), "--user", "bob").output
    assert "imported 0 memories, skipped 2" in run("memories", "import", str(path), "--user", "bob").output
    assert "peanuts" in run("memories", "list", "--user", "bob").output

    assert run("memories", "wipe", "--user", "bob", input="n\n").exit_code == 1  # said no
    assert "peanuts" in run("memories", "list", "--user", "bob").output
    r = run("memories", "wipe", "--user", "bob", "--yes")
    assert r.exit_code == 0 and "wiped bob: 2 memories" in r.output
    assert "peanuts" not in run("memories", "list", "--user", "bob").output
    assert "peanuts" in run("memories", "list", "--user", "ada").output


def test_forget_lists_the_memories_derived_from_it(env, tmp_path):
    from memory import HashEmbedder, MemoryStore

    r = run("memories", "add", "The user drinks green tea.", "--user", "ada")
    tea = added_id(r.output)
    with MemoryStore.open(tmp_path / "cli.duckdb", embedder=HashEmbedder()) as store:
        derived, _ = store.add("ada", "The user likes hot drinks.", derived_from=[tea])
    r = run("memories", "forget", tea, "--user", "ada")
    assert r.exit_code == 0 and f"forgotten (derived from it): {derived.id}" in r.output
    assert "hot drinks" not in run("memories", "list", "--user", "ada").output


HOLD = "import duckdb, sys, time; db = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep(600)"


@pytest.fixture
def server(env, tmp_path):
    """A server on its own file, and the CLI's file held by another process: the CLI must use the API."""
    from memory import HashEmbedder, MemoryStore
    from proxy import create_app
    from tests.e2e.fake_upstream import free_port
    from tests.proxy.conftest import make_settings

    held = tmp_path / "cli.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(held)], stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    store = MemoryStore.open(tmp_path / "server.duckdb", embedder=HashEmbedder())
    port = free_port()
    app = create_app(make_settings(tmp_path, database=tmp_path / "server.duckdb"), store=store,
                     embedder=HashEmbedder())
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", store
    uv.should_exit = True
    thread.join(30)
    store.close()
    holder.kill()
    holder.wait()


def test_every_memories_command_works_through_a_server(server, tmp_path):
    url, store = server

    def cli(*args: str, user: str = "ada"):
        r = run("memories", *args, "--user", user, "--url", url)
        assert "held by a running server" in r.output
        return r

    tea = added_id(cli("add", "The user drinks green tea every morning.", "--domain", "food").output)
    assert "already known" in cli("add", "The user drinks green tea every morning.").output
    paris = added_id(cli("add", "The user lives in Paris.").output)
    assert f"(supersedes {paris})" in cli("add", "The user lives in Berlin.").output
    assert [m.content for m in store.list("ada")][-1] == "The user drinks green tea every morning."

    assert "Paris" in cli("list", "--history").output and "Paris" not in cli("list").output
    found = cli("search", "green tea", "-k", "1", "--explain").output
    assert "green tea" in found and "vector" in found
    assert "green tea" not in cli("search", "green tea", user="bob").output

    shown = re.search(r"^\{$.*^\}$", cli("get", tea).output, re.DOTALL | re.MULTILINE).group(0)  # past the log lines
    assert json.loads(shown)["domains"] == ["food"]
    assert cli("get", tea, user="bob").exit_code == 1
    assert cli("patch", tea, "--importance", "0.1").exit_code == 0
    assert store.get("ada", tea).importance == 0.1
    assert cli("patch", tea, "--importance", "5").exit_code == 1

    path = tmp_path / "ada.parquet"
    assert cli("export", str(path)).exit_code == 0
    assert "imported 3 memories" in cli("import", str(path), user="bob").output
    assert store.count("bob") == 3

    assert cli("forget", tea, user="bob").exit_code == 1
    assert "forgotten" in cli("forget", tea).output and store.get("ada", tea) is None
    assert "wiped bob: 3 memories" in cli("wipe", "--yes", user="bob").output
    assert store.count("bob") == 0 and store.count("ada") == 2


@pytest.mark.parametrize(("configured", "backend"), [(None, "system"), ("mimalloc", "mimalloc")])
def test_serve_gives_arrow_the_system_allocator_unless_one_is_configured(configured, backend):
    """pyarrow's own default (mimalloc) kept memory the store's threads freed: `memlane serve`
    hands Arrow glibc's malloc, unless ARROW_DEFAULT_MEMORY_POOL asks for another."""
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if configured:
        env["ARROW_DEFAULT_MEMORY_POOL"] = configured
    script = ("import pyarrow; from proxy.cli import _arrow_system_pool; _arrow_system_pool(); "
              "print(pyarrow.default_memory_pool().backend_name)")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [backend]
