"""Real sockets: memlane runs as `memlane serve` in a child process on a free loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.fake_upstream import FakeUpstream, free_port


@dataclass
class Server:
    url: str
    db: Path
    process: subprocess.Popen
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def start_server(tmp_path: Path, *, config: str, env: dict[str, str], ready_timeout: float = 180) -> Server:
    port = free_port()
    cfg = tmp_path / "memlane.toml"
    cfg.write_text(config)
    db = tmp_path / "memlane.duckdb"
    log_path = tmp_path / "server.log"
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMLANE_", "OPENAI_", "ANTHROPIC_", "OLLAMA_"))}
    child_env.update({"HF_HUB_OFFLINE": "1", "MEMLANE_LOG_FORMAT": "json"}, **env)
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--port", str(port), "--db", str(db), "--config", str(cfg)],
        env=child_env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[2],
    )
    server = Server(f"http://127.0.0.1:{port}", db, process, log_path)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"memlane exited with {process.returncode}:\n{server.logs()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.terminate()
    raise RuntimeError(f"memlane not ready in {ready_timeout}s:\n{server.logs()}")


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


def upstream_config(fake: FakeUpstream) -> str:
    return (
        "memory_min_score = 0.1\n"
        "[[routes]]\n"
        'match = "gpt-*"\nprovider = "openai"\n'
        f'api_base = "{fake.base_url}"\napi_key_env = "OPENAI_API_KEY"\nmodels = ["gpt-4o-mini"]\n'
    )


@pytest.fixture(scope="session")
def proxied(tmp_path_factory: pytest.TempPathFactory, fake_upstream: FakeUpstream) -> Iterator[Server]:
    """memlane in front of the fake upstream, lexical embedder (fast), no local model."""
    server = start_server(
        tmp_path_factory.mktemp("proxied"), config=upstream_config(fake_upstream),
        env={"OPENAI_API_KEY": "sk-upstream-test", "MEMLANE_EMBEDDER": "hash", "MEMLANE_PRELOAD_LOCAL_MODEL": "false"},
    )
    yield server
    server.terminate()
