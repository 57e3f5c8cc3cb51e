"""An OpenAI-compatible upstream on loopback that fails on purpose, written on raw asyncio
sockets so it can do what a well-behaved HTTP server cannot: reset a connection mid-stream,
send malformed JSON, cut an SSE stream short, or stall before or after its headers.

The fault is picked by the last user message (``fault:<name>``); every request is recorded
with its fault and whether the caller hung up on it (``Seen.disconnected``), so tests can
assert both what the client got and what the upstream saw.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

_FAULT = re.compile(r"fault:([a-z0-9_]+)")
STALL_S = 30.0  # how long a stalling fault waits; far beyond any timeout the tests set


@dataclass
class Seen:
    fault: str
    body: dict
    headers: dict[str, str]
    disconnected: threading.Event = field(default_factory=threading.Event)


def sse(content: str | None = None, *, finish: str | None = None) -> bytes:
    delta = {"content": content} if content is not None else {}
    event = {"id": "chatcmpl-fault", "object": "chat.completion.chunk", "created": 1700000000,
             "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def completion(content: str) -> bytes:
    return json.dumps({
        "id": "chatcmpl-fault", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }).encode()


def _head(status: int, headers: dict[str, str], *, length: int | None = None, chunked: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {status} X", "connection: close"] + [f"{k}: {v}" for k, v in headers.items()]
    if length is not None:
        lines.append(f"content-length: {length}")
    if chunked:
        lines.append("transfer-encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class FaultUpstream:
    """Serve in a thread of this process; ``seen`` lists the requests in arrival order."""

    def __init__(self, *, echo_headers: bool = False) -> None:
        self.seen: list[Seen] = []
        self.echo_headers = echo_headers  # error bodies quote the request's headers (secrets test)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fault-upstream")
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FaultUpstream:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault upstream did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def attempts(self, fault: str) -> int:
        return sum(s.fault == fault for s in self.seen)

    def last(self, fault: str) -> Seen:
        return [s for s in self.seen if s.fault == fault][-1]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:  # one request per connection: a hang-up watch never races a next request
            await self._one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = json.loads(await reader.readexactly(int(headers.get("content-length", "0"))) or b"{}")
        last = next((m.get("content") or "" for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
        match = _FAULT.search(last if isinstance(last, str) else "")
        seen = Seen(match.group(1) if match else "none", body, headers)
        self.seen.append(seen)
        watch = asyncio.ensure_future(self._watch_hangup(reader, seen))
        try:
            await self._answer(seen, bool(body.get("stream")), writer)
        finally:
            watch.cancel()

    async def _watch_hangup(self, reader: asyncio.StreamReader, seen: Seen) -> None:
        if await reader.read(1) == b"":
            seen.disconnected.set()

    async def _answer(self, seen: Seen, stream: bool, writer: asyncio.StreamWriter) -> None:
        fault = seen.fault
        status = {"429": 429, "500": 500, "502": 502, "503": 503, "529": 529, "400": 400}.get(fault)
        if status is not None:
            message = f"upstream says {status}"
            if self.echo_headers:
                message += f" for request with headers {json.dumps(seen.headers)}"
            payload = json.dumps({"error": {"message": message, "type": "server_error", "code": None}}).encode()
            extra = {"retry-after": "7", "x-ratelimit-remaining-requests": "0"} if status == 429 else {}
            writer.write(_head(status, {"content-type": "application/json", **extra}, length=len(payload)) + payload)
            await writer.drain()
            return
        if fault == "stall_headers":  # nothing after the request: the caller's read timeout fires
            await self._stall(seen)
            return
        if fault == "malformed":
            payload = b'{"id": "chatcmpl-fault", "choices": [{"message": {"content": "oops"'
            writer.write(_head(200, {"content-type": "application/json"}, length=len(payload)) + payload)
            await writer.drain()
            return
        if fault == "reset_headers" or (fault == "reset_once" and self.attempts(fault) % 2 == 1):
            _reset(writer)  # RST before any byte of the response (reset_once: every other attempt)
            return
        if not stream:
            payload = completion(f"ok {fault}")
            writer.write(_head(200, {"content-type": "application/json"}, length=len(payload)) + payload)
            await writer.drain()
            return
        writer.write(_head(200, {"content-type": "text/event-stream"}, chunked=True))
        for word in ("one ", "two "):
            writer.write(_chunk(sse(word)))
            await writer.drain()
            await asyncio.sleep(0.05)
        if fault == "reset_mid":
            _reset(writer)
            return
        if fault == "truncated":  # half an event, then a clean end of the body
            writer.write(_chunk(b'data: {"id": "chatcmpl-fault", "choices": [{"delta": {"content": "thr'))
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return
        if fault.startswith("drip"):  # drip<N>: N more words, one every 100 ms, then a clean end
            for i in range(int(fault[4:] or 30)):
                if seen.disconnected.is_set():
                    return
                writer.write(_chunk(sse(f"w{i} ")))
                await writer.drain()
                await asyncio.sleep(0.1)
        if fault in ("stall_mid", "hang"):
            await self._stall(seen)
            return
        writer.write(_chunk(sse(finish="stop") + b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()

    async def _stall(self, seen: Seen) -> None:
        deadline = time.monotonic() + STALL_S
        while time.monotonic() < deadline and not seen.disconnected.is_set():
            await asyncio.sleep(0.02)


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class BlackHole:
    """A listening socket whose accept queue is full, so connecting to it times out."""

    def __enter__(self) -> BlackHole:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(3):  # fill the backlog; later SYNs are dropped
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(s)
        time.sleep(0.05)
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc: object) -> None:
        for s in self.fillers:
            s.close()
        self.sock.close()
