"""``POST /v1/embeddings`` and the legacy ``POST /v1/completions``: forwarded by model route as bytes."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest

from memory import HashEmbedder
from tests.proxy.conftest import (
    KEYS,
    OLLAMA,
    PROXY_KEY,
    ROUTES,
    UPSTREAM,
    learner_of,
    running,
)
from tests.proxy.test_errors import assert_openai_error

EMBEDDING = {"object": "list", "model": "text-embedding-3-small",
             "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2, 0.3]}],
             "usage": {"prompt_tokens": 2, "total_tokens": 2}}
COMPLETION = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "gpt-3.5-turbo-instruct",
              "choices": [{"text": "turn 42;", "index": 0, "logprobs": None, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
COMPLETION_SSE = (
    b'data: {"id":"cmpl-2","object":"text_completion","created":1,"choices":[{"text":"ret","index":0,'
    b'"logprobs":null,"finish_reason":null}],"model":"gpt-3.5-turbo-instruct"}\n\n'
    b'data: {"id":"cmpl-2","object":"text_completion","created":1,"choices":[{"text":"urn x","index":0,'
    b'"logprobs":null,"finish_reason":"stop"}],"model":"gpt-3.5-turbo-instruct"}\n\n'
    b"data: [DONE]\n\n"
)
WITH_LOCAL = [*ROUTES, {"match": "local/*", "provider": "local", "strip_prefix": "local/"}]
FIM = {"model": "gpt-3.5-turbo-instruct", "prompt": "def f(x):\n    ", "suffix": "\n", "max_tokens": 16,
       "temperature": 0}


@pytest.mark.respx(assert_all_called=True)
async def test_embeddings_are_forwarded_byte_for_byte_with_memlanes_key(client, respx_mock, store):
    store.add("default", "The user lives in Paris.", source="test")
    answer = json.dumps(EMBEDDING, separators=(",", ":")).encode()
    route = respx_mock.post(f"{UPSTREAM}/embeddings").mock(return_value=httpx.Response(
        200, content=answer, headers={"content-type": "application/json", "x-ratelimit-remaining-tokens": "999"}))
    raw = json.dumps({"model": "gpt-embed-small", "input": "Paris cafes", "encoding_format": "float"}).encode()
    r = await client.post("/v1/embeddings", content=raw, headers={"content-type": "application/json",
                                                                   "authorization": "Bearer sk-client"})
    assert r.status_code == 200
    assert r.content == answer
    assert r.headers["x-ratelimit-remaining-tokens"] == "999"
    sent = route.calls.last.request
    assert sent.content == raw  # no memory on embeddings: the request is untouched
    assert sent.headers["authorization"] == "Bearer sk-upstream-openai"
    assert learner_of(client).drain(5)
    assert store.interactions(limit=5) == []  # nothing to learn from an embedding


@pytest.mark.respx(assert_all_called=True)
async def test_completions_non_streaming_and_streaming(client, respx_mock):
    route = respx_mock.post(f"{UPSTREAM}/completions").mock(side_effect=[
        httpx.Response(200, json=COMPLETION),
        httpx.Response(200, content=COMPLETION_SSE, headers={"content-type": "text/event-stream"}),
    ])
    r = await client.post("/v1/completions", json=FIM)
    assert r.json() == COMPLETION
    assert json.loads(route.calls.last.request.content) == FIM  # suffix and all: no memory injected
    async with client.stream("POST", "/v1/completions", json={**FIM, "stream": True}) as r:
        received = b"".join([c async for c in r.aiter_raw()])
    assert r.headers["content-type"].startswith("text/event-stream")
    assert received == COMPLETION_SSE


@pytest.mark.respx(assert_all_called=True)
async def test_ollama_routes_go_to_ollamas_openai_api_with_the_prefix_stripped(client, respx_mock):
    route = respx_mock.post(f"{OLLAMA}/v1/completions").mock(return_value=httpx.Response(200, json=COMPLETION))
    r = await client.post("/v1/completions", json={**FIM, "model": "ollama/qwen2.5-coder:1.5b"})
    assert r.status_code == 200
    assert json.loads(route.calls.last.request.content)["model"] == "qwen2.5-coder:1.5b"
    assert "authorization" not in route.calls.last.request.headers


@pytest.mark.respx(assert_all_called=True)
async def test_mid_stream_failure_ends_with_an_openai_error_event(client, respx_mock):
    first = COMPLETION_SSE.split(b"\n\n")[0] + b"\n\n"

    async def breaks():
        yield first
        raise httpx.ReadError("connection reset")

    respx_mock.post(f"{UPSTREAM}/completions").mock(return_value=httpx.Response(
        200, content=breaks(), headers={"content-type": "text/event-stream"}))
    r = await client.post("/v1/completions", json={**FIM, "stream": True})
    assert r.status_code == 200
    assert r.content.startswith(first)
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["error"]["type"] == "upstream_error"
    assert r.text.endswith("data: [DONE]\n\n")


@pytest.mark.respx(assert_all_called=True)
@pytest.mark.parametrize(("upstream", "status", "code"), [
    (httpx.Response(429, json={"error": {"message": "Rate limit", "type": "requests", "code": "rate_limit_exceeded"}},
                    headers={"retry-after": "3"}), 429, "rate_limit_exceeded"),
    (httpx.Response(400, json={"error": {"message": "bad prompt", "type": "invalid_request_error",
                                         "param": "prompt", "code": None}}), 400, "upstream_rejected"),
    (httpx.Response(401, json={"error": {"message": "bad key"}}), 502, "upstream_auth_failed"),
    (httpx.Response(503, text="down"), 502, "upstream_error"),
])
async def test_upstream_errors_are_mapped_like_chat(client, respx_mock, upstream, status, code):
    respx_mock.post(f"{UPSTREAM}/embeddings").mock(return_value=upstream)
    r = await client.post("/v1/embeddings", json={"model": "gpt-embed", "input": "x"})
    assert_openai_error(r, status, code=code)
    if status == 429:
        assert r.headers["retry-after"] == "3"


@pytest.mark.respx(assert_all_called=True)
async def test_upstream_timeout_is_a_504(client, respx_mock):
    respx_mock.post(f"{UPSTREAM}/completions").mock(side_effect=httpx.ConnectTimeout("slow"))
    assert_openai_error(await client.post("/v1/completions", json=FIM), 504, code="upstream_timeout")


@pytest.mark.parametrize(("path", "request_body", "status", "param"), [
    ("/v1/embeddings", {"input": "x"}, 400, "model"),
    ("/v1/embeddings", {"model": "gpt-embed"}, 400, "input"),
    ("/v1/completions", {"model": "gpt-3.5-turbo-instruct"}, 400, "prompt"),
    ("/v1/completions", {**FIM, "stream": "yes"}, 400, "stream"),
    ("/v1/embeddings", {"model": "mystery-model", "input": "x"}, 404, "model"),
    ("/v1/embeddings", {"model": "claude-sonnet-4-5", "input": "x"}, 404, "model"),
    ("/v1/completions", {**FIM, "model": "local/smollm2-135m-instruct"}, 400, "model"),
])
async def test_bad_requests(app_factory, path, request_body, status, param):
    async with running(app_factory(routes=WITH_LOCAL)) as c:
        assert_openai_error(await c.post(path, json=request_body), status, param=param)


async def test_keys_are_required_when_configured(app_factory):
    async with running(app_factory(keys=KEYS)) as c:
        for path in ("/v1/embeddings", "/v1/completions"):
            assert_openai_error(await c.post(path, json={"model": "gpt-x", "input": "x", "prompt": "x"}), 401)


async def test_local_embeddings_come_from_memlanes_embedder(app_factory):
    async with running(app_factory(keys=KEYS, routes=WITH_LOCAL)) as c:
        headers = {"authorization": f"Bearer {PROXY_KEY}"}
        model = "local/all-minilm-l6-v2"
        r = await c.post("/v1/embeddings", json={"model": model, "input": ["I like tea", "tabs"]}, headers=headers)
        assert r.status_code == 200, r.text
        doc = r.json()
        expected = HashEmbedder().embed(["I like tea", "tabs"])
        assert doc["model"] == model and [d["index"] for d in doc["data"]] == [0, 1]
        assert np.allclose([d["embedding"] for d in doc["data"]], expected, atol=1e-6)
        assert doc["usage"]["prompt_tokens"] > 0
        # the openai SDK asks for base64 by default: little-endian float32
        r = await c.post("/v1/embeddings", json={"model": model, "input": "tabs", "encoding_format": "base64"},
                         headers=headers)
        vector = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
        assert np.allclose(vector, expected[1], atol=1e-6)
        for bad in ({"input": [1, 2, 3]}, {"input": ""}, {"input": "x", "dimensions": 8}):
            assert_openai_error(await c.post("/v1/embeddings", json={"model": model, **bad}, headers=headers), 400)
        assert_openai_error(await c.post("/v1/embeddings", json={"model": "local/other", "input": "x"},
                                         headers=headers), 404, code="model_not_found")
