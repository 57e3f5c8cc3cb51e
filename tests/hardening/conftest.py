"""Shared pieces of the hardening tests: memlane on a real loopback socket, in a thread of the
test process (fast to start, and its store stays reachable for fault injection) or as a child
process (for signals: SIGKILL, SIGTERM)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from memory import HashEmbedder, MemoryStore
from proxy import Settings, create_app
from tests.e2e.fake_upstream import free_port

MODEL = "gpt-4o-mini"


def route(api_base: str) -> dict:
    return {"match": "gpt-*", "provider": "openai", "api_base": api_base, "api_key_env": "OPENAI_API_KEY",
            "models": [MODEL]}


def settings_for(tmp_path: Path, api_base: str, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
    data: dict[str, Any] = {"database": tmp_path / "memlane.duckdb", "embedder": "hash",
                            "routes": [route(api_base)], "preload_local_model": False, "memory_min_score": 0.1}
    data.update(overrides)
    return Settings.from_env(env or {"OPENAI_API_KEY": "sk-upstream-hardening"}, **data)


class ThreadServer:
    """memlane served by uvicorn in a thread, on 127.0.0.1:<free port>."""

    def __init__(self, app: Any, **uvicorn_options: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, access_log=False,
                                lifespan="on", **uvicorn_options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="memlane-under-test")
        self.app = app

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self) -> Any:
        return self.app.state.memlane

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("memlane did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@contextmanager
def serving(settings: Settings, store: MemoryStore | None = None) -> Iterator[ThreadServer]:
    app = create_app(settings, store=store, embedder=HashEmbedder())
    with ThreadServer(app) as server:
        yield server


def chat(text: str, *, stream: bool = False, **extra: Any) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": stream, **extra}


def assert_openai_error(response: httpx.Response) -> dict:
    """The body is OpenAI's error shape, and nothing like a stack trace."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body["error"]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MemoryStore]:
    s = MemoryStore.open(tmp_path / "memlane.duckdb", embedder=HashEmbedder())
    yield s
    s.close()


# Error events that mean a request, its log row or the shutdown went wrong (other components'
# errors, such as a failed consolidation pass, have their own tests).
BROKEN = ("unhandled_error", "teacher_log_write_failed", "teacher_log_dropped", "learner_stop_timeout",
          "journal_write_failed", "journal_replay_failed", "memory_store_unavailable")


def broken_events(log_text: str) -> list[str]:
    return [line for line in log_text.splitlines() if any(f'"event": "{e}"' in line for e in BROKEN)]
