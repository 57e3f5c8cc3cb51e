"""A fake Anthropic Messages API on loopback, for end-to-end tests.

It answers from what it is asked, with no model: the reply echoes the last user text, a request
with ``tools`` gets a ``tool_use`` block (streamed as ``input_json_delta`` pieces), a user text
containing ``overloaded`` gets Anthropic's 529, and a streamed one containing ``break`` stops
after a few events with an ``event: error``, as Anthropic's API does when it fails mid-stream.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.e2e.fake_upstream import free_port

USAGE = {"input_tokens": 21, "output_tokens": 7}


@dataclass
class FakeAnthropicState:
    requests: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)


def event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def last_text(body: dict) -> str:
    for message in reversed(body["messages"]):
        if message["role"] != "user":
            continue
        content = message["content"]
        if isinstance(content, str):
            return content
        texts = [b["text"] for b in content if b.get("type") == "text"]
        if texts:
            return " ".join(texts)
    return ""


def answer_blocks(body: dict) -> tuple[list[dict], str]:
    if body.get("tools"):
        tool = body["tools"][0]["name"]
        return [{"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_fake", "name": tool, "input": {"city": "Paris"}}], "tool_use"
    return [{"type": "text", "text": f"You said: {last_text(body)}"}], "end_turn"


def build_app(state: FakeAnthropicState) -> Starlette:
    async def messages(request: Request) -> Response:
        body = await request.json()
        state.requests.append(body)
        state.headers.append(dict(request.headers))
        if request.headers.get("x-api-key") != "sk-ant-upstream-test":
            return JSONResponse({"type": "error", "error": {"type": "authentication_error",
                                                            "message": "invalid x-api-key"}}, status_code=401)
        text = last_text(body)
        if "overloaded" in text:
            return JSONResponse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
                                status_code=529)
        blocks, stop = answer_blocks(body)
        if body.get("stream"):
            return StreamingResponse(stream(body, blocks, stop, broken="break" in text),
                                     media_type="text/event-stream", headers={"request-id": "req_fake_stream"})
        message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": body["model"],
                   "content": blocks, "stop_reason": stop, "stop_sequence": None, "usage": USAGE}
        return JSONResponse(message, headers={"request-id": "req_fake"})

    async def count_tokens(request: Request) -> Response:
        body = await request.json()
        state.requests.append(body)
        return JSONResponse({"input_tokens": len(json.dumps(body["messages"])) // 4})

    async def stream(body: dict, blocks: list[dict], stop: str, *, broken: bool) -> AsyncIterator[bytes]:
        yield event("message_start", {"type": "message_start", "message": {
            "id": "msg_fake", "type": "message", "role": "assistant", "model": body["model"], "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 21, "output_tokens": 1}}})
        yield event("ping", {"type": "ping"})
        for index, block in enumerate(blocks):
            if block["type"] == "text":
                yield event("content_block_start", {"type": "content_block_start", "index": index,
                                                    "content_block": {"type": "text", "text": ""}})
                for i, word in enumerate(block["text"].split(" ")):
                    if broken and i == 2:
                        yield event("error", {"type": "error", "error": {"type": "overloaded_error",
                                                                         "message": "Overloaded"}})
                        return
                    yield event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                        "delta": {"type": "text_delta",
                                                                  "text": word if i == 0 else f" {word}"}})
            else:
                yield event("content_block_start", {"type": "content_block_start", "index": index, "content_block": {
                    "type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}})
                for part in ('{"city":', ' "Paris"}'):
                    yield event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                        "delta": {"type": "input_json_delta", "partial_json": part}})
            yield event("content_block_stop", {"type": "content_block_stop", "index": index})
        yield event("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                      "usage": {"output_tokens": 7}})
        yield event("message_stop", {"type": "message_stop"})

    return Starlette(routes=[Route("/v1/messages", messages, methods=["POST"]),
                             Route("/v1/messages/count_tokens", count_tokens, methods=["POST"])])


class FakeAnthropic:
    """Runs the fake in a thread of this process; ``state`` shows what it saw."""

    def __init__(self) -> None:
        self.state = FakeAnthropicState()
        self.port = free_port()
        config = uvicorn.Config(build_app(self.state), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"  # Anthropic routes take the root; memlane adds /v1/messages

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake Anthropic did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
