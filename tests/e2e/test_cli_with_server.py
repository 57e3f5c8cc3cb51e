"""While a server holds the DuckDB file, the memory commands go through its API."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.e2e.conftest import Server


def cli(server: Server, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEMLANE_EMBEDDER": "hash", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "memories", *args, "--db", str(server.db), "--url", server.url],
        capture_output=True, text=True, env=env, timeout=120,
    )


def test_memories_commands_use_the_running_server(proxied: Server):
    added = cli(proxied, "add", "The user is learning Rust.", "--user", "cli-user")
    assert added.returncode == 0, added.stdout + added.stderr
    assert "held by a running server" in added.stdout
    memory_id = re.search(r"added: ([0-9a-f]{32})", added.stdout).group(1)
    assert "already known" in cli(proxied, "add", "The user is learning Rust.", "--user", "cli-user").stdout

    listed = cli(proxied, "list", "--user", "cli-user")
    assert "learning Rust" in listed.stdout
    assert "learning Rust" not in cli(proxied, "list", "--user", "someone-else").stdout
    assert "learning Rust" in cli(proxied, "search", "rust programming", "--user", "cli-user").stdout

    assert cli(proxied, "forget", memory_id, "--user", "someone-else").returncode == 1
    assert cli(proxied, "forget", memory_id, "--user", "cli-user").returncode == 0
    assert "learning Rust" not in cli(proxied, "list", "--user", "cli-user").stdout
