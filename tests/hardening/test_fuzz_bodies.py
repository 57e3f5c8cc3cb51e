"""Fuzzing request bodies through the real app in process (httpx.ASGITransport), with fake
upstreams: chat completions, messages, the memories API. memlane itself never answers 5xx; a 502
or 504 is allowed only when the fake upstream was told to fail, and every error body is OpenAI's
shape (Anthropic's on /v1/messages).

``MEMLANE_FUZZ_EXAMPLES`` sets the examples per test (default: a CI-sized 60)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from memory import (
    HashEmbedder,
    MemoryStore,
    MemoryType,
    Sensitivity,
    Tier,
    TruthCategory,
)
from proxy import create_app
from proxy.errors import UpstreamError, UpstreamTimeout
from tests.hardening.test_injection import RecordingUpstream
from tests.proxy.conftest import ROUTES, make_settings, running

EXAMPLES = int(os.environ.get("MEMLANE_FUZZ_EXAMPLES", "60"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
ALL_ROUTES = [*ROUTES, {"match": "local/*", "provider": "local", "strip_prefix": "local/"}]
MODELS = ["gpt-4o-mini", "claude-3-5-haiku", "ollama/llama3", "local/smollm2-135m-instruct", "no-such-model",
          "local/all-minilm-l6-v2"]


class FarSide:
    """The byte-passthrough upstreams (/v1/messages, embeddings, completions): answers well, or fails
    the way it was told to."""

    def __init__(self) -> None:
        self.fail: str | None = None
        self.garbage: object = None  # a 200 answer of any JSON shape, when set

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.garbage is not None:
            return httpx.Response(200, json=self.garbage)
        if self.fail == "connect":
            raise httpx.ConnectError("refused", request=request)
        if self.fail == "timeout":
            raise httpx.ReadTimeout("slow", request=request)
        if self.fail == "500":
            return httpx.Response(500, json={"error": {"message": "boom"}})
        body = json.loads(request.content or b"{}")
        path = request.url.path
        if path.endswith("/count_tokens"):
            return httpx.Response(200, json={"input_tokens": 3})
        if path.endswith("/messages"):
            if body.get("stream"):
                events = [("message_start", {"type": "message_start", "message": {"id": "m", "content": [],
                                                                                 "usage": {"input_tokens": 1}}}),
                          ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "text_delta", "text": "ok"}}),
                          ("message_stop", {"type": "message_stop"})]
                raw = "".join(f"event: {n}\ndata: {json.dumps(e)}\n\n" for n, e in events)
                return _sse(raw.encode())
            return httpx.Response(200, json={"id": "msg_1", "type": "message", "role": "assistant",
                                             "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                                             "usage": {"input_tokens": 1, "output_tokens": 1}})
        if path.endswith("/embeddings"):
            return httpx.Response(200, json={"object": "list", "data": [{"index": 0, "embedding": [0.1]}]})
        if body.get("stream"):
            return _sse(b'data: {"choices":[{"text":"ok"}]}\n\ndata: [DONE]\n\n')
        return httpx.Response(200, json={"object": "text_completion", "choices": [{"text": "ok"}]})


def _sse(raw: bytes) -> httpx.Response:
    """A streamed answer (a response built from bytes counts as already read and cannot stream)."""
    return httpx.Response(200, stream=httpx.ByteStream(raw), headers={"content-type": "text/event-stream"})


class Upstreams:
    """Every fake upstream of one app, and whether any was told to fail for the current request."""

    def __init__(self) -> None:
        self.chat = {p: RecordingUpstream(p) for p in ("openai", "anthropic", "ollama", "local")}
        self.far_side = FarSide()

    def set_failure(self, failure: str | None) -> None:
        error = {"502": UpstreamError("fake upstream failed"), "504": UpstreamTimeout("fake upstream timed out")}
        for upstream in self.chat.values():
            upstream.fail = error.get(failure or "")
        self.far_side.fail = {"502": "500", "504": "timeout"}.get(failure or "") or (
            "connect" if failure == "connect" else None)


@pytest.fixture
def store(tmp_path):
    s = MemoryStore.open(tmp_path / "memlane.duckdb", embedder=HashEmbedder())
    s.add("default", "The user lives in Oslo and likes tea.", source="api")
    yield s
    s.close()


@pytest.fixture
async def fuzzed(tmp_path, store) -> AsyncIterator[tuple[httpx.AsyncClient, Upstreams]]:
    fakes = Upstreams()
    settings_ = make_settings(tmp_path, routes=ALL_ROUTES, memory_min_score=0.0)
    async with httpx.AsyncClient(transport=httpx.MockTransport(fakes.far_side)) as far_side:
        app = create_app(settings_, store=store, embedder=HashEmbedder(), upstreams=fakes.chat,
                         http_client=far_side)
        async with running(app) as client:
            yield client, fakes


# -- strategies --------------------------------------------------------------------------

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
key = st.sampled_from(["model", "messages", "role", "content", "type", "text", "stream", "user", "n", "tools",
                       "system", "max_tokens", "index", "id", "input", "prompt", "tags", "confirm"]) | text
scalar = (st.none() | st.booleans() | st.integers(-(2**63), 2**64) | st.floats() | text)
json_value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(key, inner, max_size=4),
                          max_leaves=12)
def mostly(valid: st.SearchStrategy, junk: st.SearchStrategy = json_value) -> st.SearchStrategy:
    """``valid`` nine times in ten, ``junk`` otherwise: most requests get past validation."""
    return st.integers(0, 9).flatmap(lambda i: junk if i == 0 else valid)


part = mostly(st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": mostly(text)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": text})}),
    st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": text, "content": mostly(text)}),
), st.dictionaries(key, json_value, max_size=3))
content = mostly(text | st.lists(part, max_size=3))


@st.composite
def chat_body(draw) -> object:
    message = st.fixed_dictionaries(
        {"role": mostly(st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"]), text)},
        optional={"content": content, "name": text, "tool_calls": json_value, "tool_call_id": text})
    return draw(mostly(st.fixed_dictionaries(
        {"model": mostly(st.sampled_from(MODELS), text), "messages": mostly(st.lists(message, min_size=1, max_size=4))},
        optional={"stream": mostly(st.booleans()), "user": mostly(text), "n": mostly(st.integers(1, 4)),
                  "temperature": mostly(st.floats(0, 2)), "max_tokens": mostly(st.integers(1, 100)),
                  "tools": json_value, "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()})),
                  "response_format": json_value, "x_vendor": json_value})))


@st.composite
def messages_body(draw) -> object:
    block = st.one_of(part, st.fixed_dictionaries({"type": st.just("tool_use"), "id": text, "name": text,
                                                   "input": json_value}))
    message = st.fixed_dictionaries({"role": mostly(st.sampled_from(["user", "assistant"]), text),
                                     "content": mostly(text | st.lists(block, min_size=1, max_size=3))})
    return draw(mostly(st.fixed_dictionaries(
        {"model": mostly(st.sampled_from(["claude-3-5-haiku", "claude-3-5-haiku", "gpt-4o-mini", "nope"]), text),
         "messages": mostly(st.lists(message, min_size=1, max_size=3)), "max_tokens": mostly(st.integers(1, 4096))},
        optional={"system": mostly(text | st.lists(block, max_size=2)), "stream": mostly(st.booleans()),
                  "metadata": json_value, "tools": json_value})))


def enum_or_junk(kind) -> st.SearchStrategy:
    return mostly(st.sampled_from([m.value for m in kind]))


memory_fields = {"content": mostly(text), "tags": mostly(st.lists(text, max_size=3)),
                 "domains": mostly(st.lists(text, max_size=3)), "importance": mostly(st.floats(0, 1)),
                 "memory_type": enum_or_junk(MemoryType), "truth_category": enum_or_junk(TruthCategory),
                 "sensitivity": enum_or_junk(Sensitivity), "tier": enum_or_junk(Tier),
                 "validated": mostly(st.booleans())}
memory_body = mostly(st.fixed_dictionaries({}, optional=memory_fields)
                     | st.fixed_dictionaries({"content": text},
                                            optional={k: v for k, v in memory_fields.items() if k != "content"})
                     | st.fixed_dictionaries({"confirm": st.booleans()}))
query = st.dictionaries(st.sampled_from(["q", "limit", "offset", "tier", "domain", "include_history", "min_score",
                                         "format", "user"]), text, max_size=4)
headers = st.fixed_dictionaries({}, optional={
    "x-memlane-user": st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=20),
    "anthropic-version": st.sampled_from(["2023-06-01", "x"])})
failure = st.sampled_from([None, None, None, "502", "504", "connect"])


def _encode(body: object) -> bytes:
    return json.dumps(body, allow_nan=True).encode()


async def check(response: httpx.Response, *, failed: str | None, anthropic: bool = False) -> None:
    """No 5xx of memlane's own; OpenAI- (or Anthropic-) shaped errors; streams read to the end."""
    await response.aread()
    status = response.status_code
    event(f"status {status}")  # --hypothesis-show-statistics: how many requests got through
    if status >= 500:
        assert failed is not None and status in (502, 504), (status, response.text)
    if status >= 400 and status != 499:
        err = response.json()
        if anthropic:
            assert err["type"] == "error" and set(err["error"]) >= {"type", "message"}, err
        else:
            assert set(err["error"]) == {"message", "type", "param", "code"}, err
            assert isinstance(err["error"]["message"], str)
    if status == 200 and response.headers.get("content-type", "").startswith("text/event-stream"):
        text_ = response.text
        if failed is None and not anthropic:
            assert text_.rstrip().endswith("data: [DONE]"), text_
        if failed is None:
            assert '"error"' not in text_, text_


# -- the tests ---------------------------------------------------------------------------


@fuzz
@given(body=chat_body(), extra=headers, fail=failure)
async def test_chat_completions_never_fail_on_their_own(fuzzed, body, extra, fail):
    client, fakes = fuzzed
    fakes.set_failure(fail)
    r = await client.post("/v1/chat/completions", content=_encode(body),
                          headers={"content-type": "application/json", **extra})
    await check(r, failed=fail)


@fuzz
@given(body=messages_body(), extra=headers, fail=failure, count=st.booleans(),
       garbage=st.none() | st.none() | json_value.filter(lambda v: v is not None))
async def test_messages_never_fail_on_their_own(fuzzed, body, extra, fail, count, garbage):
    """``garbage``: the upstream answers 200 with JSON of any shape; memlane passes it on."""
    client, fakes = fuzzed
    fakes.set_failure(fail)
    fakes.far_side.garbage = garbage
    path = "/v1/messages/count_tokens" if count else "/v1/messages"
    r = await client.post(path, content=_encode(body), headers={"content-type": "application/json", **extra})
    await check(r, failed=fail, anthropic=True)


@fuzz
@given(body=st.fixed_dictionaries({"model": st.sampled_from(MODELS) | text},
                                  optional={"input": json_value, "prompt": json_value, "stream": json_value,
                                            "encoding_format": text | json_value, "dimensions": json_value})
       | json_value, endpoint=st.sampled_from(["/v1/embeddings", "/v1/completions"]), fail=failure)
async def test_passthrough_endpoints_never_fail_on_their_own(fuzzed, body, endpoint, fail):
    client, fakes = fuzzed
    fakes.set_failure(fail)
    r = await client.post(endpoint, content=_encode(body), headers={"content-type": "application/json"})
    await check(r, failed=fail)


@fuzz
@given(method=st.sampled_from(["GET", "POST", "PATCH", "DELETE"]), body=memory_body, params=query, extra=headers,
       target=st.sampled_from(["", "/export", "/import", "/wipe", "/{id}", "/{id}", "/nope", "/%00"]),
       raw=st.binary(max_size=200) | st.lists(json_value, max_size=3).map(
           lambda rows: "\n".join(json.dumps(r) for r in rows).encode()))
async def test_memories_api_never_fails_on_its_own(fuzzed, store, method, body, params, extra, target, raw):
    client, _ = fuzzed
    (existing,) = store.list("default", limit=1) or [None]
    path = "/v1/memories" + target.replace("{id}", existing.id if existing else "x")
    content = raw if target == "/import" else _encode(body)
    r = await client.request(method, path, params=params, content=content, headers=extra)
    await check(r, failed=None)


@fuzz
@given(raw=st.binary(max_size=300), path=st.sampled_from(["/v1/chat/completions", "/v1/messages",
                                                          "/v1/memories", "/v1/embeddings"]))
async def test_bytes_that_are_not_json_are_a_400(fuzzed, raw, path):
    client, _ = fuzzed
    r = await client.post(path, content=raw, headers={"content-type": "application/json"})
    await check(r, failed=None, anthropic=path == "/v1/messages")
    try:
        json.loads(raw)
    except ValueError:
        assert r.status_code == 400
