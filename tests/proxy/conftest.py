"""In-process app fixtures: the real app, a real DuckDB file, upstreams mocked with respx."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from memory import HashEmbedder, MemoryStore
from proxy import Settings, create_app

UPSTREAM = "http://upstream.test/v1"
ANTHROPIC = "http://anthropic.test"
OLLAMA = "http://ollama.test:11434"
PROXY_KEY = "sk-memlane-alice"
TEAM_KEY = "sk-memlane-team"

ROUTES = [
    {"match": "gpt-*", "provider": "openai", "api_base": UPSTREAM, "api_key_env": "OPENAI_API_KEY",
     "models": ["gpt-4o-mini"]},
    {"match": "claude-*", "provider": "anthropic", "api_base": ANTHROPIC, "api_key_env": "ANTHROPIC_API_KEY"},
    {"match": "ollama/*", "provider": "ollama", "api_base": OLLAMA, "strip_prefix": "ollama/"},
]
ENV = {"OPENAI_API_KEY": "sk-upstream-openai", "ANTHROPIC_API_KEY": "sk-ant-upstream"}


def make_settings(tmp_path, **overrides: Any) -> Settings:
    data: dict[str, Any] = {
        "database": tmp_path / "memlane.duckdb",
        "embedder": "hash",
        "routes": ROUTES,
        "preload_local_model": False,
        "memory_min_score": 0.1,
    }
    data.update(overrides)
    return Settings.from_env(ENV, **data)


KEYS = [
    {"user": "alice", "key": PROXY_KEY},
    {"user": "team", "key": TEAM_KEY, "sub_users": True},
]


@pytest.fixture
def store(tmp_path) -> MemoryStore:
    s = MemoryStore.open(tmp_path / "memlane.duckdb", embedder=HashEmbedder())
    yield s
    s.close()


@asynccontextmanager
async def running(app) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://memlane.test") as client:
            yield client


@pytest.fixture
def app_factory(tmp_path, store) -> Callable[..., Any]:
    def build(**overrides: Any):
        settings = make_settings(tmp_path, **overrides)
        return create_app(settings, store=store, embedder=HashEmbedder())

    return build


@pytest.fixture
async def client(app_factory) -> AsyncIterator[httpx.AsyncClient]:
    app = app_factory()
    async with running(app) as c:
        c.app = app  # type: ignore[attr-defined]
        yield c


def learner_of(client: httpx.AsyncClient):
    return client.app.state.memlane.learner  # type: ignore[attr-defined]


def chat_body(text: str = "Hello", **extra: Any) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def completion_json(content: str = "Hi there!", **extra: Any) -> dict:
    return {
        "id": "chatcmpl-upstream-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
        **extra,
    }
