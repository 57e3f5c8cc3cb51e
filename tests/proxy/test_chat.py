"""Chat completions through OpenAI-compatible upstreams (respx on the far side)."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.proxy.conftest import UPSTREAM, chat_body, completion_json, learner_of

SSE = (
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{"content":"lo!"},"finish_reason":"stop"}]}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
    b'"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}\n\n'
    b"data: [DONE]\n\n"
)


def sent_json(route) -> dict:
    return json.loads(route.calls.last.request.content)


@pytest.mark.respx(assert_all_called=True)
async def test_non_streaming_answer_is_the_upstream_bytes(client, respx_mock):
    upstream_body = json.dumps(completion_json(), separators=(",", ":")).encode()
    route = respx_mock.post(f"{UPSTREAM}/chat/completions").mock(
        return_value=httpx.Response(200, content=upstream_body, headers={"content-type": "application/json",
                                                                         "x-ratelimit-remaining-requests": "99"})
    )
    r = await client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200
    assert r.content == upstream_body
    assert r.headers["x-ratelimit-remaining-requests"] == "99"
    assert r.headers["x-request-id"].startswith("req_")
    # memlane's own upstream key, never the client's
    assert route.calls.last.request.headers["authorization"] == "Bearer sk-upstream-openai"


@pytest.mark.respx(assert_all_called=True)
async def test_tools_response_format_and_unknown_fields_pass_through_untouched(client, respx_mock):
    route = respx_mock.post(f"{UPSTREAM}/chat/completions").mock(
        return_value=httpx.Response(200, json=completion_json())
    )
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    extra = {
        "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "x_vendor_extension": {"nested": [1, 2, 3]},
        "parallel_tool_calls": False,
        "seed": 7,
    }
    r = await client.post("/v1/chat/completions", json=chat_body("weather in Paris?", **extra))
    assert r.status_code == 200
    sent = sent_json(route)
    for key, value in extra.items():
        assert sent[key] == value
    assert sent["model"] == "gpt-4o-mini"


@pytest.mark.respx(assert_all_called=True)
async def test_streaming_relays_sse_bytes_and_logs_reassembled_answer(client, respx_mock):
    async def stream():
        for part in SSE.split(b"\n\n")[:-1]:
            yield part + b"\n\n"

    route = respx_mock.post(f"{UPSTREAM}/chat/completions").mock(
        return_value=httpx.Response(200, content=stream(), headers={"content-type": "text/event-stream"})
    )
    body = chat_body(stream=True, stream_options={"include_usage": True})
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        received = b"".join([c async for c in r.aiter_raw()])
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert received == SSE
    assert sent_json(route)["stream_options"] == {"include_usage": True}

    learner = learner_of(client)
    assert learner.drain(5)
    row = client.app.state.memlane.store.interactions(limit=1)[0]
    assert row["response"]["content"] == "Hello!"
    assert row["usage"]["total_tokens"] == 7
    assert row["stream"] is True and row["ttft_ms"] is not None


@pytest.mark.respx(assert_all_called=True)
async def test_streamed_tool_calls_are_reassembled_in_the_teacher_log(client, respx_mock):
    chunks = [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"city":'}},
        {"index": 0, "function": {"arguments": '"Paris"}'}},
    ]
    sse = b"".join(
        b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [c]}, "finish_reason": None}]}).encode()
        + b"\n\n" for c in chunks
    ) + b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}\n\ndata: [DONE]\n\n'
    respx_mock.post(f"{UPSTREAM}/chat/completions").mock(
        return_value=httpx.Response(200, content=sse, headers={"content-type": "text/event-stream"})
    )
    r = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert r.content == sse
    assert learner_of(client).drain(5)
    answer = client.app.state.memlane.store.interactions(limit=1)[0]["response"]
    assert answer["finish_reason"] == "tool_calls"
    assert answer["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    ]


@pytest.mark.respx(assert_all_called=True)
async def test_teacher_log_has_request_as_received_and_as_sent_without_secrets(client, respx_mock, store):
    store.add("default", "The user is allergic to peanuts.", source="test")
    respx_mock.post(f"{UPSTREAM}/chat/completions").mock(return_value=httpx.Response(200, json=completion_json()))
    r = await client.post("/v1/chat/completions", json=chat_body("Any snack ideas with peanuts?"),
                          headers={"authorization": "Bearer sk-client-secret"})
    assert r.headers["x-memlane-memories"] == "1"
    assert learner_of(client).drain(5)
    row = store.interactions(limit=1)[0]
    assert row["request_id"] == r.headers["x-request-id"]
    assert len(row["request_received"]["messages"]) == 1
    assert "peanuts" in row["request_sent"]["messages"][0]["content"]
    assert row["response"]["content"] == "Hi there!"
    assert row["usage"]["total_tokens"] == 12
    assert row["provider"] == "openai" and row["model"] == "gpt-4o-mini"
    dumped = json.dumps(row, default=str)
    assert "sk-client-secret" not in dumped and "sk-upstream-openai" not in dumped


@pytest.mark.respx(assert_all_called=True)
async def test_memory_goes_in_a_system_message_after_the_clients_own(client, respx_mock, store):
    store.add("default", "The user prefers tabs over spaces.", source="test")
    route = respx_mock.post(f"{UPSTREAM}/chat/completions").mock(
        return_value=httpx.Response(200, json=completion_json())
    )
    body = {"model": "gpt-4o-mini", "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "How should I indent with tabs or spaces?"},
    ]}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.headers["x-memlane-memory"] == "on"
    messages = sent_json(route)["messages"]
    assert [m["role"] for m in messages] == ["system", "system", "user"]
    assert messages[0]["content"] == "You are terse."
    assert "<memlane_memories>" in messages[1]["content"]
    assert "The user prefers tabs over spaces." in messages[1]["content"]


@pytest.mark.respx(assert_all_called=True)
async def test_memory_off_sends_the_request_unchanged(app_factory, respx_mock, store):
    from tests.proxy.conftest import running

    store.add("default", "The user prefers tabs over spaces.", source="test")
    route = respx_mock.post(f"{UPSTREAM}/chat/completions").mock(
        return_value=httpx.Response(200, json=completion_json())
    )
    async with running(app_factory(memory=False)) as c:
        body = chat_body("tabs or spaces?")
        r = await c.post("/v1/chat/completions", json=body)
    assert r.headers["x-memlane-memory"] == "off"
    assert sent_json(route) == body


async def test_broken_store_still_answers_and_says_so(client, respx_mock, store):
    respx_mock.post(f"{UPSTREAM}/chat/completions").mock(return_value=httpx.Response(200, json=completion_json()))

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    store.search = broken  # the store object the app holds
    r = await client.post("/v1/chat/completions", json=chat_body("hello"))
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "Hi there!"
    assert r.headers["x-memlane-memory"] == "degraded"
    metrics = (await client.get("/metrics")).text
    assert "memlane_memory_failures_total 1.0" in metrics


async def test_metrics_show_the_process_and_the_stores_memory_and_survive_a_broken_store(client, respx_mock, store):
    respx_mock.post(f"{UPSTREAM}/chat/completions").mock(return_value=httpx.Response(200, json=completion_json()))
    await client.post("/v1/chat/completions", json=chat_body("I live in Oslo."))
    assert learner_of(client).drain(5)
    families = {f.name: f for f in text_string_to_metric_families((await client.get("/metrics")).text)}
    assert families["process_resident_memory_bytes"].samples[0].value > 10 * 2**20
    held = {s.labels["tag"]: s.value for s in families["memlane_store_memory_bytes"].samples}
    assert {"base_table", "art_index", "in_memory_table"} <= set(held) and sum(held.values()) > 0

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    store.memory_usage = broken
    r = await client.get("/metrics")
    assert r.status_code == 200 and "memlane_store_memory_bytes" in r.text  # the last reading stays


async def test_extracted_fact_reaches_a_later_conversation(client, respx_mock, store):
    route = respx_mock.post(f"{UPSTREAM}/chat/completions").mock(
        return_value=httpx.Response(200, json=completion_json("Noted."))
    )
    await client.post("/v1/chat/completions", json=chat_body("I'm allergic to peanuts. Can you remember that?"))
    assert learner_of(client).drain(5)
    assert [m.content for m in store.list("default")] == ["The user is allergic to peanuts."]
    await client.post("/v1/chat/completions", json=chat_body("Suggest a snack, I'm allergic to anything?"))
    injected = sent_json(route)["messages"][0]["content"]
    assert "The user is allergic to peanuts." in injected


@pytest.mark.respx(assert_all_called=True)
async def test_retrieval_slower_than_the_budget_answers_without_memory(app_factory, respx_mock, store):
    import time as _time

    from tests.proxy.conftest import running

    store.add("default", "The user is allergic to peanuts.", source="test")
    real_search = store.search

    def slow_search(*a, **k):
        _time.sleep(0.3)
        return real_search(*a, **k)

    store.search = slow_search
    respx_mock.post(f"{UPSTREAM}/chat/completions").mock(return_value=httpx.Response(200, json=completion_json()))
    async with running(app_factory(memory_budget_ms=50)) as c:
        r = await c.post("/v1/chat/completions", json=chat_body("what am I allergic to, peanuts?"))
    assert r.status_code == 200 and r.headers["x-memlane-memory"] == "degraded"
