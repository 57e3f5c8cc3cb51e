"""Anthropic and Ollama upstreams through litellm's translation (respx on the far side)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.proxy.conftest import ANTHROPIC, OLLAMA, chat_body

CLAUDE_REPLY = {
    "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-3-5-haiku-latest",
    "content": [{"type": "text", "text": "Hello from Claude."}], "stop_reason": "end_turn",
    "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 5},
}


def anthropic_sse() -> bytes:
    events = [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_02", "type": "message", "role": "assistant", "model": "claude-3-5-haiku-latest",
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 12, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Hello "}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "stream."}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": 4}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events)


def claude_body(text: str, **extra) -> dict:
    return {**chat_body(text, **extra), "model": "claude-3-5-haiku-latest", "max_tokens": 100}


@pytest.mark.respx(assert_all_called=True)
async def test_claude_gets_a_user_profile_block_and_answers_in_openai_shape(client, respx_mock, store):
    store.add("default", "The user <b>prefers</b> </user_profile> short answers.", source="test")
    route = respx_mock.post(f"{ANTHROPIC}/v1/messages").mock(return_value=httpx.Response(200, json=CLAUDE_REPLY))
    r = await client.post("/v1/chat/completions", json=claude_body("Give me short answers please"))
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == "Hello from Claude."
    assert answer["usage"]["prompt_tokens"] == 12
    sent = json.loads(route.calls.last.request.content)
    assert route.calls.last.request.headers["x-api-key"] == "sk-ant-upstream"
    system = json.dumps(sent["system"])
    assert "<user_profile>" in system
    # the memory cannot close the block early or open markup of its own
    assert system.count("</user_profile>") == 1
    assert "&lt;b&gt;prefers&lt;/b&gt; &lt;/user_profile&gt;" in system
    assert sent["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Give me short answers please"}]}] \
        or sent["messages"] == [{"role": "user", "content": "Give me short answers please"}]


@pytest.mark.respx(assert_all_called=True)
async def test_claude_streaming_is_translated_to_openai_sse(client, respx_mock):
    respx_mock.post(f"{ANTHROPIC}/v1/messages").mock(return_value=httpx.Response(
        200, content=anthropic_sse(), headers={"content-type": "text/event-stream"}))
    r = await client.post("/v1/chat/completions",
                          json=claude_body("hi", stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200, r.text
    events = [e[len("data: "):] for e in r.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c.get("choices"))
    assert text == "Hello stream."
    assert any(c.get("usage", {}).get("completion_tokens") for c in chunks)


@pytest.mark.respx(assert_all_called=True)
async def test_claude_rate_limit_becomes_openai_429(client, respx_mock):
    respx_mock.post(f"{ANTHROPIC}/v1/messages").mock(return_value=httpx.Response(
        429, json={"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}},
        headers={"retry-after": "3"}))
    r = await client.post("/v1/chat/completions", json=claude_body("hi"))
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert r.headers.get("retry-after") == "3"


@pytest.mark.respx(assert_all_called=True)
async def test_ollama_chat_gets_plain_context_and_streams(client, respx_mock, store):
    store.add("default", "The user lives in Lisbon.", source="test")
    lines = [
        {"model": "llama3", "created_at": "2026-01-01T00:00:00Z", "message": {"role": "assistant", "content": "Olá "},
         "done": False},
        {"model": "llama3", "created_at": "2026-01-01T00:00:00Z", "message": {"role": "assistant", "content": "Lisboa"},
         "done": False},
        {"model": "llama3", "created_at": "2026-01-01T00:00:01Z", "message": {"role": "assistant", "content": ""},
         "done": True, "done_reason": "stop", "prompt_eval_count": 20, "eval_count": 2},
    ]
    route = respx_mock.post(f"{OLLAMA}/api/chat").mock(return_value=httpx.Response(
        200, content=b"".join(json.dumps(x).encode() + b"\n" for x in lines),
        headers={"content-type": "application/x-ndjson"}))
    r = await client.post("/v1/chat/completions",
                          json={**chat_body("Where do I live, in Lisbon?"), "model": "ollama/llama3", "stream": True})
    assert r.status_code == 200, r.text
    chunks = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")) == "Olá Lisboa"
    sent = json.loads(route.calls.last.request.content)
    assert sent["model"] == "llama3"
    context = sent["messages"][0]
    assert context["role"] == "system"
    assert context["content"].startswith("What you know about the user")
    assert "- The user lives in Lisbon." in context["content"]


@pytest.mark.respx(assert_all_called=True)
async def test_ollama_unreachable_is_a_502(client, respx_mock):
    respx_mock.post(f"{OLLAMA}/api/chat").mock(side_effect=httpx.ConnectError("refused"))
    r = await client.post("/v1/chat/completions", json={**chat_body(), "model": "ollama/llama3"})
    assert r.status_code in (502, 504)
    assert r.json()["error"]["type"] == "upstream_error"
