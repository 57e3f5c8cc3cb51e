"""The official openai SDK against a running memlane in front of an OpenAI-compatible upstream."""

from __future__ import annotations

import json
import signal

import httpx
import openai
import pytest

from tests.e2e.conftest import Server, start_server, upstream_config

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_sync_sdk_non_streaming(proxied: Server, fake_upstream):
    client = openai.OpenAI(base_url=proxied.base_url, api_key="anything", max_retries=0)
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "ping"}])
    assert answer.choices[0].message.content == "You said: ping"
    assert answer.usage.total_tokens == 15
    assert fake_upstream.state.headers[-1]["authorization"] == "Bearer sk-upstream-test"


def test_sync_sdk_streaming(proxied: Server):
    client = openai.OpenAI(base_url=proxied.base_url, api_key="anything", max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}], stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == "You said: hello there"
    assert chunks[-1].usage.total_tokens == 15


async def test_async_sdk_streaming_and_non_streaming(proxied: Server):
    client = openai.AsyncOpenAI(base_url=proxied.base_url, api_key="anything", max_retries=0)
    answer = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "a"}])
    assert answer.choices[0].message.content == "You said: a"
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "b c"}], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.strip() == "You said: b c"
    await client.close()


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_pass_through(proxied: Server, fake_upstream, stream: bool):
    client = openai.OpenAI(base_url=proxied.base_url, api_key="anything", max_retries=0)
    kwargs = dict(model="gpt-4o-mini", messages=[{"role": "user", "content": "weather in Paris?"}],
                  tools=[WEATHER_TOOL], tool_choice="auto")
    if stream:
        calls: dict[int, dict] = {}
        for c in client.chat.completions.create(stream=True, **kwargs):
            for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
                call = calls.setdefault(d.index, {"name": "", "arguments": ""})
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
        assert calls == {0: {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    else:
        message = client.chat.completions.create(**kwargs).choices[0].message
        assert message.tool_calls[0].function.name == "get_weather"
        assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert fake_upstream.state.requests[-1]["tools"] == [WEATHER_TOOL]
    assert fake_upstream.state.requests[-1]["tool_choice"] == "auto"


def test_sse_bytes_reach_the_client_unchanged(proxied: Server, fake_upstream):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "same bytes please"}],
            "stream": True, "stream_options": {"include_usage": True}}
    direct = httpx.post(f"{fake_upstream.base_url}/chat/completions", json=body).content
    via = httpx.post(f"{proxied.base_url}/chat/completions", json=body)
    assert via.headers["content-type"].startswith("text/event-stream")
    assert via.content == direct
    assert via.content.endswith(b"data: [DONE]\n\n")


def test_errors_are_openai_shaped_through_the_sdk(proxied: Server):
    client = openai.OpenAI(base_url=proxied.base_url, api_key="anything", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=[])
    assert info.value.param == "messages"


def test_client_disconnect_cancels_the_upstream_stream(proxied: Server, fake_upstream):
    state = fake_upstream.state
    state.slow_started.clear()
    state.slow_closed.clear()
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "slow please"}], "stream": True}
    with httpx.stream("POST", f"{proxied.base_url}/chat/completions", json=body, timeout=10) as r:
        first = next(r.iter_raw())
        assert first.startswith(b"data: ")
    assert state.slow_started.is_set()
    # The proxy must close its upstream connection, which ends the fake's generator.
    assert state.slow_closed.wait(5), "upstream stream still running after the client left"
    assert state.slow_chunks_sent < 100


def test_client_disconnect_cancels_a_non_streaming_upstream_call(proxied: Server, fake_upstream):
    state = fake_upstream.state
    state.slow_started.clear()
    state.slow_closed.clear()
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "slow please"}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{proxied.base_url}/chat/completions", json=body, timeout=httpx.Timeout(10, read=1.0))
    assert state.slow_started.is_set()
    assert state.slow_closed.wait(5), "upstream call still running after the client left"


def test_metrics_expose_latency_overhead_and_ttft(proxied: Server):
    httpx.post(f"{proxied.base_url}/chat/completions", json={
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "m"}], "stream": True})
    text = httpx.get(f"{proxied.url}/metrics").text
    for name in ("memlane_requests_total", "memlane_request_seconds_bucket", "memlane_overhead_seconds_bucket",
                 "memlane_time_to_first_token_seconds_bucket", "memlane_log_queue_depth",
                 "memlane_log_rows_dropped_total"):
        assert name in text, name


def test_sigterm_loses_no_teacher_log_rows(tmp_path, fake_upstream):
    server = start_server(tmp_path, config=upstream_config(fake_upstream), env={
        "OPENAI_API_KEY": "sk-upstream-test", "MEMLANE_EMBEDDER": "hash", "MEMLANE_PRELOAD_LOCAL_MODEL": "false"})
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="anything", max_retries=0)
        for i in range(40):
            client.chat.completions.create(model="gpt-4o-mini",
                                           messages=[{"role": "user", "content": f"I use editor number {i}."}])
        # one stream still in flight when the signal arrives
        with httpx.stream("POST", f"{server.base_url}/chat/completions", json={
            "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "steady stream"}], "stream": True},
        ) as r:
            chunks = r.iter_raw()
            next(chunks)
            server.process.send_signal(signal.SIGTERM)
            rest = b"".join(chunks)
        assert rest.endswith(b"data: [DONE]\n\n")  # the in-flight stream was allowed to finish
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown
        assert server.process.wait(60) in (0, -signal.SIGTERM)
        assert '"memlane_stopped"' in server.logs()
    finally:
        server.terminate()
    from memory import HashEmbedder, MemoryStore

    store = MemoryStore.open(server.db, embedder=HashEmbedder())
    try:
        rows = store.interactions(limit=1000)
        assert len(rows) == 41
        assert all(r["response"] for r in rows)
        assert store.count("default") >= 1  # "I use editor number N." became memories
    finally:
        store.close()
    assert "sk-upstream-test" not in server.logs()
    assert "editor number" not in server.logs()
