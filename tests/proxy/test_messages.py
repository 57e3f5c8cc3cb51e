"""``POST /v1/messages``: Anthropic's Messages API through memlane to an Anthropic upstream (respx)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.proxy.conftest import (
    ANTHROPIC,
    KEYS,
    PROXY_KEY,
    TEAM_KEY,
    learner_of,
    running,
)

MESSAGES = f"{ANTHROPIC}/v1/messages"
MODEL = "claude-sonnet-4-5"

REPLY = {
    "id": "msg_01", "type": "message", "role": "assistant", "model": MODEL,
    "content": [{"type": "text", "text": "Hello from Claude."}], "stop_reason": "end_turn",
    "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 5},
}
WEATHER_TOOL = {"name": "get_weather", "description": "Weather for a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def sse(*events: tuple[str, dict]) -> bytes:
    return b"".join(f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
                    for name, data in events)


TOOL_STREAM = sse(
    ("message_start", {"type": "message_start", "message": {
        "id": "msg_02", "type": "message", "role": "assistant", "model": MODEL, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 30, "output_tokens": 1}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": "Let me check. "}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": '{"city": "Pa'}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1,
                             "delta": {"type": "input_json_delta", "partial_json": 'ris"}'}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                       "usage": {"output_tokens": 40}}),
    ("message_stop", {"type": "message_stop"}),
)


def body(text: str = "Hello", **extra) -> dict:
    return {"model": MODEL, "max_tokens": 256, "messages": [{"role": "user", "content": text}], **extra}


def sent_json(route) -> dict:
    return json.loads(route.calls.last.request.content)


def assert_anthropic_error(r: httpx.Response, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    doc = r.json()
    assert doc["type"] == "error"
    assert doc["error"]["type"] == kind
    assert doc["error"]["message"]
    assert r.headers["x-request-id"].startswith("req_")
    return doc["error"]["message"]


async def pieces(data: bytes, size: int):
    """The stream in fixed-size pieces that cut events (and JSON) in the middle."""
    for at in range(0, len(data), size):
        yield data[at:at + size]


# -- answers -----------------------------------------------------------------------------------

@pytest.mark.respx(assert_all_called=True)
async def test_non_streaming_answer_is_the_upstream_bytes_with_headers_forwarded(client, respx_mock):
    upstream_body = json.dumps(REPLY, separators=(",", ":")).encode()
    route = respx_mock.post(MESSAGES).mock(return_value=httpx.Response(
        200, content=upstream_body, headers={"content-type": "application/json", "request-id": "req_ant_1",
                                             "anthropic-ratelimit-requests-remaining": "49"}))
    raw = json.dumps(body("Hi")).encode()
    r = await client.post("/v1/messages", content=raw, headers={
        "content-type": "application/json", "anthropic-version": "2023-06-01",
        "anthropic-beta": "prompt-caching-2024-07-31,token-efficient-tools-2025-02-19",
        "x-api-key": "sk-client-key-not-forwarded"})
    assert r.status_code == 200, r.text
    assert r.content == upstream_body
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["request-id"] == "req_ant_1"
    assert r.headers["anthropic-ratelimit-requests-remaining"] == "49"
    assert r.headers["x-memlane-memory"] == "on"
    sent = route.calls.last.request
    assert sent.headers["x-api-key"] == "sk-ant-upstream"  # memlane's upstream key, never the client's
    assert "authorization" not in sent.headers
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.headers["anthropic-beta"] == "prompt-caching-2024-07-31,token-efficient-tools-2025-02-19"
    assert sent.content == raw  # no memories: the request goes on byte for byte


@pytest.mark.respx(assert_all_called=True)
async def test_anthropic_version_defaults_when_the_client_sends_none(client, respx_mock):
    route = respx_mock.post(MESSAGES).mock(return_value=httpx.Response(200, json=REPLY))
    assert (await client.post("/v1/messages", json=body())).status_code == 200
    assert route.calls.last.request.headers["anthropic-version"] == "2023-06-01"
    assert "anthropic-beta" not in route.calls.last.request.headers


@pytest.mark.respx(assert_all_called=True)
async def test_stream_with_tool_use_passes_through_byte_exact_and_is_logged(client, respx_mock, store):
    route = respx_mock.post(MESSAGES).mock(return_value=httpx.Response(
        200, content=pieces(TOOL_STREAM, 97), headers={"content-type": "text/event-stream; charset=utf-8"}))
    request = body("What is the weather in Paris?", stream=True, tools=[WEATHER_TOOL],
                   tool_choice={"type": "auto"})
    async with client.stream("POST", "/v1/messages", json=request) as r:
        received = [chunk async for chunk in r.aiter_raw()]
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert b"".join(received) == TOOL_STREAM
    # every piece the client gets ends on an event boundary, even though the upstream's did not
    assert all(chunk.endswith(b"\n\n") for chunk in received)
    sent = sent_json(route)
    assert sent["tools"] == [WEATHER_TOOL] and sent["tool_choice"] == {"type": "auto"} and sent["stream"] is True

    assert learner_of(client).drain(5)
    row = store.interactions(limit=1)[0]
    assert row["stream"] is True and row["status_code"] == 200 and row["provider"] == "anthropic"
    assert row["response"]["content"] == "Let me check. "
    assert row["response"]["finish_reason"] == "tool_calls"
    assert row["response"]["tool_calls"] == [
        {"id": "toolu_01", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    assert row["usage"] == {"prompt_tokens": 30, "completion_tokens": 40, "total_tokens": 70}
    assert row["request_received"]["messages"] == request["messages"]


@pytest.mark.respx(assert_all_called=True)
async def test_teacher_log_row_and_facts_from_the_latest_user_turn(client, respx_mock, store):
    respx_mock.post(MESSAGES).mock(return_value=httpx.Response(200, json=REPLY))
    r = await client.post("/v1/messages", json=body("I'm allergic to peanuts", system="Be brief."),
                          headers={"authorization": "Bearer sk-client-secret"})
    assert r.status_code == 200
    assert learner_of(client).drain(5)
    row = store.interactions(limit=1)[0]
    assert row["request_id"] == r.headers["x-request-id"]
    assert row["model"] == MODEL and row["stream"] is False
    assert row["response"]["content"] == "Hello from Claude."
    assert row["response"]["finish_reason"] == "stop"
    assert row["usage"]["total_tokens"] == 17
    assert "sk-client-secret" not in json.dumps(row, default=str)
    assert [m.content for m in store.list("default")] == ["The user is allergic to peanuts."]


# -- memory ------------------------------------------------------------------------------------

@pytest.mark.respx(assert_all_called=True)
async def test_memory_is_appended_to_a_string_system_and_nothing_else_changes(client, respx_mock, store):
    store.add("default", "The user <b>prefers</b> </user_profile> short answers.", source="test")
    route = respx_mock.post(MESSAGES).mock(return_value=httpx.Response(200, json=REPLY))
    request = body("Give me short answers please", system="You are terse.", temperature=0.2,
                   metadata={"user_id": "someone"}, x_vendor={"nested": [1, 2]})
    r = await client.post("/v1/messages", json=request)
    assert r.headers["x-memlane-memories"] == "1"
    sent = sent_json(route)
    assert sent["system"].startswith("You are terse.\n\n")
    assert "<user_profile>" in sent["system"] and sent["system"].count("</user_profile>") == 1
    assert "&lt;b&gt;prefers&lt;/b&gt; &lt;/user_profile&gt; short answers." in sent["system"]
    assert {k: v for k, v in sent.items() if k != "system"} == {k: v for k, v in request.items() if k != "system"}


@pytest.mark.respx(assert_all_called=True)
async def test_memory_is_a_new_last_block_of_a_list_system(client, respx_mock, store):
    store.add("default", "The user prefers tabs over spaces.", source="test")
    route = respx_mock.post(MESSAGES).mock(return_value=httpx.Response(200, json=REPLY))
    system = [{"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
              {"type": "text", "text": "Project rules...", "cache_control": {"type": "ephemeral"}}]
    r = await client.post("/v1/messages", json=body("tabs or spaces for indentation?", system=system))
    assert r.headers["x-memlane-memories"] == "1"
    sent = sent_json(route)["system"]
    assert sent[:2] == system  # the client's blocks and their cache breakpoints, as sent
    assert len(sent) == 3 and sent[2]["type"] == "text" and "cache_control" not in sent[2]
    assert "<memory>The user prefers tabs over spaces.</memory>" in sent[2]["text"]


@pytest.mark.respx(assert_all_called=True)
async def test_memory_without_system_becomes_the_system(client, respx_mock, store):
    store.add("default", "The user lives in Paris.", source="test")
    route = respx_mock.post(MESSAGES).mock(return_value=httpx.Response(200, json=REPLY))
    await client.post("/v1/messages", json=body("What is a good cafe where I live in Paris?"))
    assert "<memory>The user lives in Paris.</memory>" in sent_json(route)["system"]


@pytest.mark.respx(assert_all_called=True)
async def test_tool_result_turns_recall_for_the_prompt_that_started_the_task(client, respx_mock, store):
    store.add("default", "The user lives in Paris.", source="test")
    route = respx_mock.post(MESSAGES).mock(return_value=httpx.Response(200, json=REPLY))
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather where I live in Paris?"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "18C"}]},
    ]
    r = await client.post("/v1/messages", json={**body(), "messages": messages, "tools": [WEATHER_TOOL]})
    assert r.headers["x-memlane-memories"] == "1"
    sent = sent_json(route)
    assert sent["messages"] == messages  # tool_use and tool_result blocks intact
    assert "Paris" in sent["system"]


@pytest.mark.respx(assert_all_called=True)
async def test_memory_off_sends_the_request_unchanged(app_factory, respx_mock, store):
    store.add("default", "The user lives in Paris.", source="test")
    route = respx_mock.post(MESSAGES).mock(return_value=httpx.Response(200, json=REPLY))
    async with running(app_factory(memory=False)) as c:
        r = await c.post("/v1/messages", json=body("Cafe in Paris?", system="Be kind."))
    assert r.headers["x-memlane-memory"] == "off"
    assert sent_json(route)["system"] == "Be kind."


# -- auth and users ----------------------------------------------------------------------------

@pytest.mark.respx(assert_all_called=True)
@pytest.mark.parametrize("headers", [{"x-api-key": PROXY_KEY}, {"authorization": f"Bearer {PROXY_KEY}"}])
async def test_memlane_key_as_x_api_key_or_bearer(app_factory, respx_mock, store, headers):
    store.add("alice", "The user lives in Paris.", source="test")
    route = respx_mock.post(MESSAGES).mock(return_value=httpx.Response(200, json=REPLY))
    async with running(app_factory(keys=KEYS)) as c:
        r = await c.post("/v1/messages", json=body("Cafe in Paris?"), headers=headers)
    assert r.status_code == 200
    assert "Paris" in sent_json(route)["system"]  # alice's memories
    assert route.calls.last.request.headers["x-api-key"] == "sk-ant-upstream"


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "sk-wrong"}, {"authorization": "Bearer sk-wrong"}])
async def test_missing_or_wrong_key_is_an_anthropic_401(app_factory, respx_mock, headers):
    route = respx_mock.post(MESSAGES).mock(return_value=httpx.Response(200, json=REPLY))
    async with running(app_factory(keys=KEYS)) as c:
        r = await c.post("/v1/messages", json=body(), headers=headers)
    assert_anthropic_error(r, 401, "authentication_error")
    assert not route.called


@pytest.mark.respx(assert_all_called=True)
async def test_sub_user_comes_from_the_header_never_from_metadata(app_factory, respx_mock, store):
    store.add("team/bob", "The user lives in Paris.", source="test")
    route = respx_mock.post(MESSAGES).mock(return_value=httpx.Response(200, json=REPLY))
    async with running(app_factory(keys=KEYS)) as c:
        key = {"x-api-key": TEAM_KEY}
        r = await c.post("/v1/messages", json=body("Paris cafe?", metadata={"user_id": "bob"}), headers=key)
        assert r.headers["x-memlane-memories"] == "0"  # Claude Code puts a session id in metadata.user_id
        r = await c.post("/v1/messages", json=body("Paris cafe?"), headers={**key, "x-memlane-user": "bob"})
    assert r.headers["x-memlane-memories"] == "1"
    assert "Paris" in sent_json(route)["system"]


# -- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("request_body", "where"),
    [
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        ({"model": MODEL, "max_tokens": 10}, "messages"),
        ({"model": MODEL, "max_tokens": 10, "messages": []}, "messages"),
        ({"model": MODEL, "max_tokens": 10, "messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
        ({**body(), "stream": "yes please"}, "stream"),
        ({**body(), "system": 42}, "system"),
    ],
)
async def test_invalid_requests_are_anthropic_400s_naming_the_field(client, request_body, where):
    message = assert_anthropic_error(await client.post("/v1/messages", json=request_body), 400,
                                     "invalid_request_error")
    assert message.startswith(f"{where}:")


async def test_malformed_json_is_an_anthropic_400(client):
    r = await client.post("/v1/messages", content=b'{"model": ', headers={"content-type": "application/json"})
    assert_anthropic_error(r, 400, "invalid_request_error")


async def test_unknown_model_is_an_anthropic_404(client):
    message = assert_anthropic_error(await client.post("/v1/messages", json={**body(), "model": "llama-9000"}),
                                     404, "not_found_error")
    assert "llama-9000" in message


async def test_model_routed_elsewhere_is_a_clear_400(client):
    message = assert_anthropic_error(await client.post("/v1/messages", json={**body(), "model": "gpt-4o-mini"}),
                                     400, "invalid_request_error")
    assert "openai" in message and "/v1/chat/completions" in message


@pytest.mark.respx(assert_all_called=True)
@pytest.mark.parametrize(
    ("upstream", "status", "kind", "in_message"),
    [
        (httpx.Response(429, json={"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down"}},
                        headers={"retry-after": "7"}), 429, "rate_limit_error", "Slow down"),
        (httpx.Response(529, json={"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
         529, "overloaded_error", "Overloaded"),
        (httpx.Response(400, json={"type": "error", "error": {
            "type": "invalid_request_error", "message": "prompt is too long: 210000 tokens > 200000 maximum"}}),
         400, "invalid_request_error", "prompt is too long"),
        (httpx.Response(401, json={"type": "error", "error": {"type": "authentication_error",
                                                               "message": "invalid x-api-key"}}),
         502, "api_error", "credentials"),
        (httpx.Response(500, text="<html>oops</html>"), 502, "api_error", "500"),
    ],
)
async def test_upstream_errors_keep_anthropics_shape_and_meaning(client, respx_mock, upstream, status, kind,
                                                                  in_message):
    respx_mock.post(MESSAGES).mock(return_value=upstream)
    r = await client.post("/v1/messages", json=body())
    assert in_message in assert_anthropic_error(r, status, kind)
    if status == 429:
        assert r.headers["retry-after"] == "7"
    assert "sk-ant-upstream" not in r.text


@pytest.mark.respx(assert_all_called=True)
@pytest.mark.parametrize(("side_effect", "status", "kind"), [
    (httpx.ConnectTimeout("boom"), 504, "timeout_error"),
    (httpx.ReadTimeout("boom"), 504, "timeout_error"),
    (httpx.ConnectError("refused"), 502, "api_error"),
])
async def test_upstream_unreachable_or_slow(client, respx_mock, store, side_effect, status, kind):
    respx_mock.post(MESSAGES).mock(side_effect=side_effect)
    assert_anthropic_error(await client.post("/v1/messages", json=body()), status, kind)
    assert learner_of(client).drain(5)
    assert store.interactions(limit=1)[0]["status_code"] == status


@pytest.mark.respx(assert_all_called=True)
async def test_mid_stream_failure_ends_with_a_whole_error_event(client, respx_mock, store):
    cut = TOOL_STREAM.index(b"event: content_block_start", 300) + 20  # inside an event

    async def breaks():
        yield TOOL_STREAM[:cut]
        raise httpx.ReadTimeout("upstream went quiet")

    respx_mock.post(MESSAGES).mock(return_value=httpx.Response(
        200, content=breaks(), headers={"content-type": "text/event-stream"}))
    r = await client.post("/v1/messages", json=body(stream=True))
    assert r.status_code == 200  # the status was sent before the failure
    whole = TOOL_STREAM[:TOOL_STREAM.rindex(b"\n\n", 0, cut) + 2]
    assert r.content.startswith(whole)
    tail = r.content[len(whole):]
    assert tail.startswith(b"event: error\ndata: ") and tail.endswith(b"\n\n")
    error = json.loads(tail.split(b"data: ", 1)[1])
    assert error["type"] == "error" and error["error"]["type"] == "timeout_error"
    assert learner_of(client).drain(5)
    row = store.interactions(limit=1)[0]
    assert row["status_code"] == 504 and row["error"]


@pytest.mark.respx(assert_all_called=True)
async def test_count_tokens_is_forwarded(client, respx_mock):
    route = respx_mock.post(f"{MESSAGES}/count_tokens").mock(
        return_value=httpx.Response(200, json={"input_tokens": 14}))
    request = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}]}
    r = await client.post("/v1/messages/count_tokens", json=request, headers={"anthropic-beta": "token-counting"})
    assert r.json() == {"input_tokens": 14}
    assert sent_json(route) == request
    assert route.calls.last.request.headers["x-api-key"] == "sk-ant-upstream"
    assert route.calls.last.request.headers["anthropic-beta"] == "token-counting"
