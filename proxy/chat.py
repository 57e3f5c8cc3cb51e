"""``POST /v1/chat/completions``: authenticate, validate, enrich, forward, relay, log.

The upstream's bytes reach the client as they arrive; the handler keeps a copy (capped) that the
learner turns into a teacher-log row off the request path. A client that goes away cancels the
upstream call, streaming or not.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime
from typing import TypeVar

import structlog
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from learner import Exchange
from proxy.auth import USER_HEADER, resolve_user
from proxy.enrich import latest_user_text
from proxy.errors import ModelNotFound, ProxyError, ServiceUnavailable, UpstreamError, sse_error_event
from proxy.local import request_user
from proxy.schema import read_json, validate_chat
from proxy.state import AppState
from proxy.upstream import UpstreamReply

log = structlog.get_logger("memlane.chat")
T = TypeVar("T")

MAX_LOGGED_RESPONSE_BYTES = 4 * 1024 * 1024


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready."""


async def chat_completions(request: Request) -> Response:
    state: AppState = request.app.state.memlane
    started = time.perf_counter()
    request_id: str = request.scope["state"]["request_id"]
    principal = state.keyring.authenticate(request.headers)
    body = await read_json(request)
    chat = validate_chat(body)
    user_id = resolve_user(principal, body_user=body.get("user"), header_user=request.headers.get(USER_HEADER))
    request_user.set(user_id)  # whose personal adapter answers, on the plm route
    route = state.settings.route_for(chat.model)
    upstream = state.upstreams.get(route.provider) if route else None
    if route is None or upstream is None:
        raise ModelNotFound(
            f"The model '{chat.model}' does not exist or no upstream is configured for it. "
            "GET /v1/models lists what this memlane serves.",
            param="model",
        )

    recall = await state.recaller.enrich(user_id, body, route.provider)
    headers = {"x-memlane-memory": recall.state, "x-memlane-memories": str(recall.used), "x-memlane-plm": recall.plm}
    exchange = _ExchangeDraft(state, request_id, user_id, chat.model, route.provider, bool(chat.stream),
                              body, recall.body, started, memory=recall.state)
    try:
        reply = await until_disconnect(request, upstream.open(route, recall.body, stream=bool(chat.stream)))
    except ClientDisconnected:
        exchange.finish(499, "client_disconnected", b"", upstream_s=0.0)
        return Response(status_code=499)
    except ProxyError as err:
        if isinstance(err, UpstreamError) or err.status == 429:
            state.metrics.upstream_errors.labels(provider=route.provider, code=err.code or "").inc()
        exchange.finish(err.status, err.message, b"", upstream_s=0.0)
        err.headers.update(headers)
        raise
    headers.update(reply.headers)
    if chat.stream:
        return StreamingResponse(
            _relay(reply, exchange), media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
        )
    try:
        content = await _collect(reply)  # non-streaming replies arrive whole from open()
    except ProxyError as err:
        exchange.finish(err.status, err.message, b"", upstream_s=reply.upstream_s)
        err.headers.update(headers)
        raise
    finally:
        await reply.aclose()
    exchange.finish(200, None, content, upstream_s=reply.upstream_s)
    return Response(content, media_type=reply.media_type, headers=headers)


async def _collect(reply: UpstreamReply) -> bytes:
    return b"".join([chunk async for chunk in reply.body])


async def _relay(reply: UpstreamReply, exchange: _ExchangeDraft) -> AsyncIterator[bytes]:
    kept = bytearray()
    status, error = 200, None
    tail = b"\n"  # the last byte relayed: a whole stream never ends in the middle of a line
    draining = exchange.state.draining
    task = draining.register()
    try:
        async for chunk in reply.body:
            exchange.first_byte()
            if len(kept) < MAX_LOGGED_RESPONSE_BYTES:
                kept += chunk
            if chunk:
                tail = chunk[-1:]
            yield chunk
        if tail != b"\n":  # cut mid-event: end that event, then say what happened
            raise UpstreamError("upstream stream ended in the middle of an event", code="upstream_truncated")
    except ProxyError as err:
        status, error = err.status, err.message
        exchange.state.metrics.upstream_errors.labels(provider=reply.provider, code=err.code or "").inc()
        event = (b"\n\n" if tail != b"\n" else b"") + sse_error_event(err)
        kept += event
        yield event
    except asyncio.CancelledError:
        if not draining.interrupted(task):
            status, error = 499, "client_disconnected"
            raise
        task.uncancel()  # type: ignore[union-attr]  # the server is stopping: say so, then end
        err = ServiceUnavailable("memlane is shutting down; this answer was cut short.", code="server_shutting_down")
        status, error = err.status, err.message
        event = (b"\n\n" if tail != b"\n" else b"") + sse_error_event(err)
        kept += event
        yield event
    finally:
        draining.unregister(task)
        await reply.aclose()
        exchange.finish(status, error, bytes(kept), upstream_s=reply.upstream_s)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    raise ClientDisconnected()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _ExchangeDraft:
    """Timing and payloads of one request, handed to the learner exactly once."""

    def __init__(self, state: AppState, request_id: str, user_id: str, model: str, provider: str,
                 stream: bool, received: dict, sent: dict, started: float, *, memory: str) -> None:
        self.state = state
        self.request_id = request_id
        self.user_id = user_id
        self.model = model
        self.provider = provider
        self.stream = stream
        self.received = received
        self.sent = sent
        self.started = started
        self.memory = memory
        self.first_at: float | None = None
        self.done = False

    def first_byte(self) -> None:
        if self.first_at is None:
            self.first_at = time.perf_counter()
            self.state.metrics.ttft.labels(provider=self.provider).observe(self.first_at - self.started)

    def finish(self, status: int, error: str | None, raw: bytes, *, upstream_s: float) -> None:
        if self.done:
            return
        self.done = True
        total = time.perf_counter() - self.started
        self.state.metrics.overhead.labels(provider=self.provider, memory=self.memory).observe(
            max(total - upstream_s, 0.0)
        )
        log.info("chat_done", user_hash=_short_hash(self.user_id), model=self.model, provider=self.provider,
                 status=status, stream=self.stream, latency_ms=round(total * 1000, 2),
                 upstream_ms=round(upstream_s * 1000, 2), response_bytes=len(raw))
        self.state.learner.submit(
            Exchange(
                request_id=self.request_id,
                user_id=self.user_id,
                created_at=datetime.now(UTC).replace(tzinfo=None),
                model=self.model,
                provider=self.provider,
                stream=self.stream,
                status_code=status,
                error=error,
                request_received=self.received,
                request_sent=self.sent,
                response_raw=raw,
                latency_ms=total * 1000,
                ttft_ms=(self.first_at - self.started) * 1000 if self.first_at else None,
                user_text=latest_user_text(self.received["messages"]),
                conversation_id=conversation_id(self.user_id, self.received["messages"]),
            )
        )


def conversation_id(user_id: str, messages: list) -> str:
    """A stable id for a conversation: clients resend the whole history each turn, so the
    messages up to the first user turn are the same on every turn of one conversation."""
    opening: list = []
    for message in messages:
        opening.append(message)
        if isinstance(message, dict) and message.get("role") == "user":
            break
    digest = hashlib.sha256(json.dumps([user_id, opening], sort_keys=True, default=str).encode())
    return f"conv_{digest.hexdigest()[:16]}"


def _short_hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:12]
