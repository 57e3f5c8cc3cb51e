"""The official anthropic SDK against a running memlane whose Claude route points at a fake
Anthropic API: answers, streams, tool use, memory in ``system``, auth and errors as a user sees them."""

from __future__ import annotations

import time
from collections.abc import Iterator

import anthropic
import httpx
import pytest

from tests.e2e.conftest import Server, start_server
from tests.e2e.fake_anthropic import FakeAnthropic

KEY = "sk-memlane-e2e"
MODEL = "claude-sonnet-4-5"
WEATHER_TOOL = {"name": "get_weather", "description": "Weather for a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def fake_anthropic() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as fake:
        yield fake


@pytest.fixture(scope="module")
def claude_proxy(tmp_path_factory: pytest.TempPathFactory, fake_anthropic: FakeAnthropic) -> Iterator[Server]:
    config = (
        "memory_min_score = 0.1\n"
        f'[[keys]]\nuser = "alice"\nkey = "{KEY}"\n'
        f'[[routes]]\nmatch = "claude-*"\nprovider = "anthropic"\napi_base = "{fake_anthropic.base_url}"\n'
        'api_key_env = "ANTHROPIC_API_KEY"\n'
    )
    server = start_server(tmp_path_factory.mktemp("claude"), config=config, env={
        "ANTHROPIC_API_KEY": "sk-ant-upstream-test", "MEMLANE_EMBEDDER": "hash", "MEMLANE_PRELOAD_LOCAL_MODEL": "false"})
    yield server
    server.terminate()


def sync_client(server: Server, **options) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=options.pop("api_key", KEY), max_retries=0, **options)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_sync_non_streaming(claude_proxy: Server, fake_anthropic: FakeAnthropic):
    client = sync_client(claude_proxy)
    answer = client.messages.create(model=MODEL, max_tokens=64, messages=ask("ping"))
    assert answer.content[0].text == "You said: ping"
    assert answer.stop_reason == "end_turn"
    assert answer.usage.input_tokens == 21 and answer.usage.output_tokens == 7
    assert answer._request_id == "req_fake"  # Anthropic's request id reaches the SDK
    seen = fake_anthropic.state.headers[-1]
    assert seen["x-api-key"] == "sk-ant-upstream-test"  # memlane's upstream key, not the client's
    assert KEY not in str(seen)
    assert seen["anthropic-version"] == client.default_headers["anthropic-version"]  # the SDK's, forwarded


def test_sync_streaming_text(claude_proxy: Server):
    with sync_client(claude_proxy).messages.stream(model=MODEL, max_tokens=64,
                                                   messages=ask("hello there friend")) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "You said: hello there friend"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 7


@pytest.mark.parametrize("stream", [False, True])
def test_tool_use_passes_through(claude_proxy: Server, fake_anthropic: FakeAnthropic, stream: bool):
    client = sync_client(claude_proxy)
    kwargs = {"model": MODEL, "max_tokens": 64, "messages": ask("Weather in Paris?"), "tools": [WEATHER_TOOL],
              "tool_choice": {"type": "auto"}}
    if stream:
        with client.messages.stream(**kwargs) as s:
            partial = "".join(e.partial_json for e in s if e.type == "input_json")
            final = s.get_final_message()
        assert partial == '{"city": "Paris"}'
    else:
        final = client.messages.create(**kwargs)
    tool = final.content[1]
    assert final.stop_reason == "tool_use"
    assert (tool.type, tool.name, tool.input) == ("tool_use", "get_weather", {"city": "Paris"})
    assert fake_anthropic.state.requests[-1]["tools"] == [WEATHER_TOOL]


async def test_async_sdk_streaming_and_non_streaming(claude_proxy: Server):
    client = anthropic.AsyncAnthropic(base_url=claude_proxy.url, api_key=KEY, max_retries=0)
    answer = await client.messages.create(model=MODEL, max_tokens=64, messages=ask("a b"))
    assert answer.content[0].text == "You said: a b"
    events = await client.messages.create(model=MODEL, max_tokens=64, messages=ask("c d"), stream=True)
    kinds = [e.type async for e in events]
    # "You said: c d" in four deltas; the SDK hides the ping that came after message_start
    assert kinds == ["message_start", "content_block_start", *["content_block_delta"] * 4, "content_block_stop",
                     "message_delta", "message_stop"]
    await client.close()


def test_told_fact_comes_back_in_the_system_of_a_later_conversation(claude_proxy: Server,
                                                                   fake_anthropic: FakeAnthropic):
    client = sync_client(claude_proxy)
    client.messages.create(model=MODEL, max_tokens=64, messages=ask("I'm allergic to peanuts"))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the learner works in the background
        memories = httpx.get(f"{claude_proxy.base_url}/memories", headers={"x-api-key": KEY}).json()["data"]
        if any("peanuts" in m["content"] for m in memories):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the fact was not learned")
    system = [{"type": "text", "text": "You are a cook.", "cache_control": {"type": "ephemeral"}}]
    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=64, system=system,
                                                   messages=ask("Snack ideas with peanuts?"))
    assert raw.parse().content[0].text == "You said: Snack ideas with peanuts?"
    assert raw.headers["x-memlane-memories"] == "1"
    sent = fake_anthropic.state.requests[-1]["system"]
    assert sent[0] == system[0]
    assert "<user_profile>" in sent[1]["text"] and "The user is allergic to peanuts." in sent[1]["text"]


def test_beta_header_and_claude_codes_query_string(claude_proxy: Server, fake_anthropic: FakeAnthropic):
    beta = "interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14"
    r = httpx.post(f"{claude_proxy.url}/v1/messages?beta=true", headers={
        "x-api-key": KEY, "anthropic-version": "2023-06-01", "anthropic-beta": beta},
        json={"model": MODEL, "max_tokens": 16, "messages": ask("beta")})
    assert r.status_code == 200 and r.json()["content"][0]["text"] == "You said: beta"
    assert fake_anthropic.state.headers[-1]["anthropic-beta"] == beta
    tokens = httpx.post(f"{claude_proxy.url}/v1/messages/count_tokens", headers={"x-api-key": KEY},
                        json={"model": MODEL, "messages": ask("count me")})
    assert tokens.json()["input_tokens"] > 0


def test_keys_via_x_api_key_or_bearer_and_wrong_keys(claude_proxy: Server):
    by_header = anthropic.Anthropic(base_url=claude_proxy.url, api_key=None, auth_token=None, max_retries=0,
                                    default_headers={"x-api-key": KEY})
    assert by_header.messages.create(model=MODEL, max_tokens=8, messages=ask("x")).content[0].text == "You said: x"
    bearer = anthropic.Anthropic(base_url=claude_proxy.url, auth_token=KEY, max_retries=0)
    assert bearer.messages.create(model=MODEL, max_tokens=8, messages=ask("y")).content[0].text == "You said: y"
    with pytest.raises(anthropic.AuthenticationError) as info:
        sync_client(claude_proxy, api_key="sk-wrong").messages.create(model=MODEL, max_tokens=8, messages=ask("z"))
    assert info.value.body["error"]["type"] == "authentication_error"


def test_errors_are_anthropic_shaped_through_the_sdk(claude_proxy: Server):
    client = sync_client(claude_proxy)
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="no-such-model", max_tokens=8, messages=ask("x"))
    assert info.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=MODEL, max_tokens=8, messages=[])
    assert info.value.body["error"]["message"].startswith("messages:")
    with pytest.raises(anthropic.APIStatusError) as info:
        client.messages.create(model=MODEL, max_tokens=8, messages=ask("are you overloaded?"))
    assert info.value.status_code == 529 and info.value.body["error"]["type"] == "overloaded_error"


@pytest.mark.parametrize("use_async", [False, True])
async def test_mid_stream_error_event_reaches_the_sdk(claude_proxy: Server, use_async: bool):
    kwargs = {"model": MODEL, "max_tokens": 64, "messages": ask("please break now")}
    with pytest.raises(anthropic.APIStatusError) as info:
        if use_async:
            client = anthropic.AsyncAnthropic(base_url=claude_proxy.url, api_key=KEY, max_retries=0)
            async with client.messages.stream(**kwargs) as stream:
                [_ async for _ in stream.text_stream]
        else:
            with sync_client(claude_proxy).messages.stream(**kwargs) as stream:
                list(stream.text_stream)
    assert "overloaded_error" in str(info.value)
