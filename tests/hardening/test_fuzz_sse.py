"""Fuzzing the stream code: SSE parsing and tool-call reassembly (``learner.teacher``), the
``/v1/messages`` relay's re-chunking and its teacher view (``proxy/anthropic_wire.py``).

Valid streams, split anywhere and in any line-ending style, reassemble to the same answer; garbage
of any shape returns (None or the raw bytes, as documented) and never raises."""

from __future__ import annotations

import itertools
import json
import os
from types import SimpleNamespace

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from learner.teacher import assemble
from memory import HashEmbedder, MemoryStore
from proxy import create_app
from proxy.anthropic_wire import teacher_view
from proxy.messages import _event_end
from tests.proxy.conftest import make_settings

EXAMPLES = int(os.environ.get("MEMLANE_FUZZ_SSE_EXAMPLES", "200"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
json_scalar = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | text
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(text, inner, max_size=3), max_leaves=8)


@st.composite
def tool_call(draw, index: int) -> dict:
    arguments = draw(st.dictionaries(st.text("abcxyz", min_size=1, max_size=4), json_scalar, max_size=3))
    return {"index": index, "id": f"call_{index}_{draw(st.integers(0, 999))}",
            "name": draw(st.sampled_from(["get_weather", "search", "run"])), "arguments": json.dumps(arguments)}


def pieces(draw, whole: str) -> list[str]:
    """``whole`` cut at drawn places (every piece non-empty, or one empty piece for '')."""
    if not whole:
        return [""]
    cuts = sorted(draw(st.sets(st.integers(1, len(whole) - 1), max_size=6))) if len(whole) > 1 else []
    bounds = [0, *cuts, len(whole)]
    return [whole[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def openai_stream(draw) -> tuple[bytes, dict]:
    """An OpenAI chat-completion SSE stream and the answer it carries."""
    content = draw(st.lists(text, max_size=5))
    calls = [draw(tool_call(i)) for i in range(draw(st.integers(0, 3)))]
    finish = "tool_calls" if calls else draw(st.sampled_from(["stop", "length"]))
    usage = {"prompt_tokens": draw(st.integers(1, 99)), "completion_tokens": 3, "total_tokens": 0}
    events: list[dict] = [{"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
    events += [{"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": c}}]} for c in content]
    for call in calls:
        args = pieces(draw, call["arguments"])
        events.append({"choices": [{"index": 0, "delta": {"tool_calls": [{
            "index": call["index"], "id": call["id"], "type": "function",
            "function": {"name": call["name"], "arguments": args[0]}}]}}]})
        events += [{"choices": [{"index": 0, "delta": {"tool_calls": [{
            "index": call["index"], "function": {"arguments": a}}]}}]} for a in args[1:]]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    events.append({"choices": [], "usage": usage})
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    raw = "".join(f"data: {json.dumps(e)}{newline}{newline}" for e in events) + f"data: [DONE]{newline}{newline}"
    answer = {"role": "assistant", "content": "".join(content) or None, "finish_reason": finish}
    if calls:
        answer["tool_calls"] = [{"id": c["id"], "type": "function",
                                 "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]
    return raw.encode(), {"answer": answer, "usage": usage}


@st.composite
def anthropic_stream(draw) -> tuple[bytes, dict]:
    """A Messages SSE stream (text and tool_use blocks) and its OpenAI-shaped answer."""
    texts = draw(st.lists(text, min_size=1, max_size=4))
    calls = [draw(tool_call(i + 1)) for i in range(draw(st.integers(0, 2)))]
    events: list[tuple[str, dict]] = [("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
        "usage": {"input_tokens": 7, "output_tokens": 1}}})]
    events.append(("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}}))
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": t}}) for t in texts]
    events.append(("ping", {"type": "ping"}))
    for call in calls:
        events.append(("content_block_start", {"type": "content_block_start", "index": call["index"], "content_block": {
            "type": "tool_use", "id": call["id"], "name": call["name"], "input": {}}}))
        events += [("content_block_delta", {"type": "content_block_delta", "index": call["index"],
                                            "delta": {"type": "input_json_delta", "partial_json": p}})
                   for p in pieces(draw, call["arguments"])]
        events.append(("content_block_stop", {"type": "content_block_stop", "index": call["index"]}))
    stop = "tool_use" if calls else "end_turn"
    events.append(("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop},
                                     "usage": {"output_tokens": 5}}))
    events.append(("message_stop", {"type": "message_stop"}))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    raw = "".join(f"event: {name}{newline}data: {json.dumps(e)}{newline}{newline}" for name, e in events)
    expected = {"content": "".join(texts) or None,
                "calls": [(c["id"], c["name"], json.loads(c["arguments"])) for c in calls],
                "finish": "tool_calls" if calls else "stop"}
    return raw.encode(), expected


def split(draw, raw: bytes) -> list[bytes]:
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(raw) - 1)), max_size=12)))
    bounds = [0, *[c for c in cuts if c < len(raw)], len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds) if raw[a:b]]


@fuzz
@given(stream=openai_stream(), data=st.data())
def test_openai_stream_split_anywhere_reassembles_to_the_same_answer(stream, data):
    raw, expected = stream
    chunks = split(data.draw, raw)
    answer, usage = assemble(b"".join(chunks), stream=True)
    answer.pop("id", None)
    assert answer == expected["answer"]
    assert usage == expected["usage"]


class _Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self):
        for chunk in self.chunks:
            yield chunk


@pytest.fixture
async def messages_proxy(tmp_path):
    """memlane whose Anthropic upstream streams ``upstream.chunks``, as split, to ``/v1/messages``."""
    upstream = SimpleNamespace(chunks=[])

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=_Chunks(list(upstream.chunks)), headers={"content-type": "text/event-stream"})

    upstream.sent = []  # the body of each ASGI message memlane sent, as sent

    store = MemoryStore.open(tmp_path / "memlane.duckdb", embedder=HashEmbedder())
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as far_side:
        app = create_app(make_settings(tmp_path), store=store, embedder=HashEmbedder(), http_client=far_side)

        async def recording(scope, receive, send):
            async def record(message):
                if message["type"] == "http.response.body" and message.get("body"):
                    upstream.sent.append(message["body"])
                await send(message)

            await app(scope, receive, record)

        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=recording)
            async with httpx.AsyncClient(transport=transport, base_url="http://memlane.test") as client:
                yield client, upstream
    store.close()


@settings(fuzz, max_examples=max(10, EXAMPLES // 4))
@given(stream=anthropic_stream(), data=st.data())
async def test_messages_relay_sends_whole_events_and_logs_the_same_answer(messages_proxy, stream, data):
    client, upstream = messages_proxy
    raw, expected = stream
    upstream.chunks = split(data.draw, raw)
    upstream.sent.clear()
    body = {"model": "claude-x", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    response = await client.post("/v1/messages", json=body)
    assert response.status_code == 200 and response.content == raw  # byte for byte
    sent = upstream.sent
    event(f"sent in {min(len(sent), 5)}{'+' if len(sent) >= 5 else ''} pieces")
    assert b"".join(sent) == raw
    assert all(_event_end(piece) == len(piece) for piece in sent)  # each piece ends at an event boundary
    answer = assemble(teacher_view(b"".join(sent), stream=True), stream=True)[0]  # the teacher-log row
    assert answer["content"] == expected["content"] and answer["finish_reason"] == expected["finish"]
    calls = [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
             for c in answer.get("tool_calls", [])]
    assert calls == expected["calls"]


garbage_lines = st.lists(st.one_of(
    st.binary(max_size=40),
    json_value.map(lambda v: b"data: " + json.dumps(v).encode()),
    st.builds(lambda kind, v: b"data: " + json.dumps({"type": kind, **(v if isinstance(v, dict) else {"x": v})}).encode(),
              st.sampled_from(["message_start", "content_block_start", "content_block_delta", "message_delta",
                               "error", "ping"]), json_value),
    st.builds(lambda v: b"data: " + json.dumps({"choices": v, "usage": v}).encode(), json_value),
    st.builds(lambda v: b"data: " + json.dumps({"choices": [{"index": 0, "delta": v}]}).encode(), json_value),
    st.builds(lambda v: b"data: " + json.dumps({"choices": [{"delta": {"tool_calls": v}}]}).encode(), json_value),
    st.builds(lambda v: b"data: " + json.dumps({"choices": [{"delta": {"tool_calls": [{"function": v}]}}]}).encode(),
              json_value),
    st.builds(lambda i, v: b"data: " + json.dumps({"type": "content_block_delta", "index": i, "delta": {
        "type": "input_json_delta", "partial_json": v}}).encode(), json_value, json_value),
), max_size=12)


@fuzz
@given(lines=garbage_lines, stream=st.booleans())
def test_garbage_streams_never_raise(lines, stream):
    raw = b"\n\n".join(lines)
    answer, _ = assemble(raw, stream=stream)
    assert answer is None or isinstance(answer, dict)
    assert isinstance(teacher_view(raw, stream=stream), bytes)
    assert 0 <= _event_end(raw) <= len(raw)


@fuzz
@given(doc=json_value)
def test_garbage_json_answers_never_raise(doc):
    raw = json.dumps(doc).encode()
    answer, _ = assemble(raw, stream=False)
    assert answer is None or isinstance(answer, dict)
    assert isinstance(teacher_view(raw, stream=False), bytes)
    for wrapped in ({"choices": doc}, {"choices": [doc]}, {"choices": [{"message": doc}]}, {"content": doc},
                    {"content": [doc], "usage": doc}, {"usage": doc, "choices": []}):
        assemble(json.dumps(wrapped).encode(), stream=False)
        teacher_view(json.dumps(wrapped).encode(), stream=False)
