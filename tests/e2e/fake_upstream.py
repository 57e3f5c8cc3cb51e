"""A fake OpenAI-compatible upstream on loopback, for end-to-end tests and benchmarks.

It answers from what it is asked, with no model: the reply echoes the last user message, a
request with ``tools`` gets a tool call, and a user message containing ``slow`` streams one
chunk every 100 ms for a minute (so tests can watch a disconnect reach it), ``steady`` for a second.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FakeState:
    requests: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)
    slow_started: threading.Event = field(default_factory=threading.Event)
    slow_closed: threading.Event = field(default_factory=threading.Event)
    slow_chunks_sent: int = 0


def chunk(content: str | None = None, *, finish: str | None = None, delta: dict | None = None) -> bytes:
    d = delta if delta is not None else ({"content": content} if content is not None else {})
    body = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def build_app(state: FakeState) -> Starlette:
    async def chat(request: Request) -> Response:
        body = await request.json()
        state.requests.append(body)
        state.headers.append(dict(request.headers))
        last = next((m.get("content") or "" for m in reversed(body["messages"]) if m["role"] == "user"), "")
        if body.get("stream"):
            if "slow" in last:
                return StreamingResponse(slow(600), media_type="text/event-stream")
            if "steady" in last:
                return StreamingResponse(slow(10), media_type="text/event-stream")
            return StreamingResponse(fast(body, last), media_type="text/event-stream")
        if "slow" in last:  # wait for a minute, watching for the caller to give up
            state.slow_started.set()
            for _ in range(600):
                if await request.is_disconnected():
                    state.slow_closed.set()
                    return Response(status_code=499)
                await asyncio.sleep(0.1)
        return JSONResponse(completion(body, last))

    async def fast(body: dict, last: str):
        if body.get("tools"):
            call = {"index": 0, "id": "call_fake", "type": "function",
                    "function": {"name": body["tools"][0]["function"]["name"], "arguments": ""}}
            yield chunk(delta={"role": "assistant", "tool_calls": [call]})
            for part in ('{"city":', ' "Paris"}'):
                yield chunk(delta={"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
            yield chunk(finish="tool_calls")
        else:
            yield chunk(delta={"role": "assistant", "content": ""})
            for word in f"You said: {last}".split(" "):
                yield chunk(word + " ")
            yield chunk(finish="stop")
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000,
                     "model": "gpt-4o-mini", "choices": [],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
            yield b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def slow(chunks: int):
        state.slow_started.set()
        try:
            for i in range(chunks):
                yield chunk(f"{i} ")
                state.slow_chunks_sent += 1
                await asyncio.sleep(0.1)
            yield chunk(finish="stop") + b"data: [DONE]\n\n"
        finally:
            state.slow_closed.set()

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def completion(body: dict, last: str) -> dict:
    message: dict = {"role": "assistant", "content": f"You said: {last}"}
    finish = "stop"
    if body.get("tools"):
        name = body["tools"][0]["function"]["name"]
        message = {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_fake", "type": "function", "function": {"name": name, "arguments": '{"city": "Paris"}'}}]}
        finish = "tool_calls"
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000, "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


class FakeUpstream:
    """Runs the fake in a thread of this process; ``state`` shows what it saw."""

    def __init__(self) -> None:
        self.state = FakeState()
        self.port = free_port()
        config = uvicorn.Config(build_app(self.state), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FakeUpstream:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake upstream did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def main(argv: list[str] | None = None) -> None:
    """Serve the fake in its own process: ``python -m tests.e2e.fake_upstream --port 9000``.

    Benchmarks use this so the upstream does not share a GIL with the load generator. Only the
    last 1,000 requests are kept, so a long run does not grow without bound.
    """
    import argparse
    import collections
    import importlib.util

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    state = FakeState(requests=collections.deque(maxlen=1000), headers=collections.deque(maxlen=1000))  # type: ignore[arg-type]
    uvicorn.run(
        build_app(state), host=args.host, port=args.port, log_level="warning", access_log=False, lifespan="off",
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
    )


if __name__ == "__main__":
    main()
