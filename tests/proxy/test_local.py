"""The local upstream's OpenAI shape, with a scripted model in place of SmolLM2.

The real model is exercised end to end in tests/e2e/test_memory_roundtrip.py; here a model that
yields scripted deltas makes the protocol details fast and exact.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from adapters import ContextLengthError
from tests.proxy.conftest import running

MODEL = "local/scripted"


class ScriptedGeneration:
    def __init__(self, deltas, *, fail_after: int | None = None, delay: float = 0.0) -> None:
        self.deltas = list(deltas)
        self.prompt_tokens = 7
        self.completion_tokens = 0
        self.finish_reason = None
        self.closed = False
        self.fail_after = fail_after
        self.delay = delay

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for i, d in enumerate(self.deltas):
            if self.fail_after is not None and i == self.fail_after:
                from adapters import LocalModelError

                raise LocalModelError("worker crashed")
            await asyncio.sleep(self.delay)
            self.completion_tokens += 1
            yield d
        self.finish_reason = "length"

    async def aclose(self):
        self.closed = True

    async def text(self):
        return "".join([d async for d in self])


class ScriptedModel:
    name = "scripted"
    loaded = True

    def __init__(self) -> None:
        self.calls: list[tuple[list, object]] = []
        self.next: ScriptedGeneration | Exception = ScriptedGeneration(["Hel", "lo", "!"])

    def loadable(self):
        return True, "scripted"

    def load(self):
        pass

    def generate(self, messages, params):
        self.calls.append((messages, params))
        if isinstance(self.next, Exception):
            raise self.next
        return self.next


@pytest.fixture
async def local(tmp_path, store):
    from memory import HashEmbedder
    from proxy import create_app
    from tests.proxy.conftest import make_settings

    model = ScriptedModel()
    settings = make_settings(tmp_path, routes=[{"match": "local/*", "provider": "local", "strip_prefix": "local/"}])
    app = create_app(settings, store=store, embedder=HashEmbedder(), local_model=model)
    async with running(app) as c:
        c.model = model
        yield c


async def test_non_streaming_answer(local):
    r = await local.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello!"}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


async def test_streaming_with_usage_and_greedy_by_default(local, store):
    store.add("default", "The user is allergic to peanuts.", source="test")
    r = await local.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "what am I allergic to, peanuts?"}], "stream": True,
        "stream_options": {"include_usage": True}, "max_tokens": 9, "stop": "END"})
    events = [e[6:] for e in r.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hello!"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    messages, params = local.model.calls[-1]
    assert messages[0]["role"] == "system" and "- The user is allergic to peanuts." in messages[0]["content"]
    assert (params.temperature, params.max_new_tokens, params.stop) == (0.0, 9, ("END",))


async def test_unknown_local_model_and_unsupported_n(local):
    r = await local.post("/v1/chat/completions", json={"model": "local/other", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and "local/scripted" in r.json()["error"]["message"]
    r = await local.post("/v1/chat/completions", json={"model": MODEL, "n": 2, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


async def test_prompt_too_long_is_a_400(local):
    local.model.next = ContextLengthError("the prompt has 9000 tokens; scripted reads at most 8192")
    r = await local.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


async def test_a_generation_that_fails_midstream_ends_with_an_error_event(local):
    local.model.next = ScriptedGeneration(["a", "b", "c"], fail_after=2)
    r = await local.post("/v1/chat/completions", json={"model": MODEL, "stream": True,
                                                       "messages": [{"role": "user", "content": "x"}]})
    events = [e for e in r.text.split("\n\n") if e]
    assert '"upstream_error"' in events[-2] and events[-1] == "data: [DONE]"
    assert local.model.next.closed


async def test_models_lists_the_local_model(local):
    data = (await local.get("/v1/models")).json()
    assert data["object"] == "list"
    assert {"id": MODEL, "object": "model", "created": 0, "owned_by": "local"} in data["data"]


async def test_readyz_reports_store_embedder_and_model(local):
    r = await local.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "checks": {"store": "ok", "embedder": "loaded", "local_model": "loaded"}}


async def test_readyz_fails_when_the_store_cannot_be_opened(tmp_path):
    from proxy import create_app
    from tests.proxy.conftest import make_settings

    (tmp_path / "not-a-db").write_text("this is not a duckdb file")
    app = create_app(make_settings(tmp_path, database=tmp_path / "not-a-db"))
    async with running(app) as c:
        r = await c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["store"] == "unavailable"
        assert (await c.get("/healthz")).status_code == 200
