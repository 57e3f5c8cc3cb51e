"""``POST /v1/messages``: Anthropic's Messages API with the user's memories, for Claude clients.

Authenticate (``x-api-key`` or ``Authorization: Bearer`` with a memlane key), check the request,
recall memories for the latest user prompt and add them to ``system`` as a ``<user_profile>``
block, then forward the request to the model's Anthropic route as bytes over the shared HTTP
client, with memlane's upstream key and the client's ``anthropic-version`` and ``anthropic-beta``.
The answer (JSON, or the SSE events: ``message_start``, ``content_block_*``, ``ping``,
``message_delta``, ``message_stop``) reaches the client byte for byte. Errors are Anthropic-shaped;
after a stream has started, a final ``event: error``. Every interaction goes to the teacher log
and facts are extracted from the latest user turn, as for chat completions.

Only models routed to an ``anthropic`` provider are served here; others get a 400 that points
to ``/v1/chat/completions``. ``POST /v1/messages/count_tokens`` is forwarded unchanged.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from proxy.anthropic_wire import anthropic_status_error, teacher_view, validate_messages
from proxy.auth import USER_HEADER, resolve_user
from proxy.chat import (
    MAX_LOGGED_RESPONSE_BYTES,
    ClientDisconnected,
    _ExchangeDraft,
    until_disconnect,
)
from proxy.enrich import inject_system, latest_prompt_text
from proxy.errors import (
    InvalidRequest,
    ModelNotFound,
    ProxyError,
    ServiceUnavailable,
    UpstreamError,
    anthropic_error_response,
    anthropic_sse_error_event,
)
from proxy.local import request_user
from proxy.passthrough import forward, http_client
from proxy.schema import read_json
from proxy.settings import RouteConfig
from proxy.state import AppState
from proxy.upstream import UpstreamReply, upstream_model

DEFAULT_ANTHROPIC_VERSION = "2023-06-01"


def _anthropic_errors(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Render the handler's errors in Anthropic's shape instead of OpenAI's."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ProxyError as err:
            return anthropic_error_response(err)

    return endpoint


@_anthropic_errors
async def messages(request: Request) -> Response:
    state: AppState = request.app.state.memlane
    started = time.perf_counter()
    request_id: str = request.scope["state"]["request_id"]
    principal = state.keyring.authenticate(request.headers)
    body = await read_json(request)
    parsed = validate_messages(body)
    stream = bool(parsed.stream)
    # metadata.user_id is not a memory owner: Claude Code puts a per-session id there.
    user_id = resolve_user(principal, body_user=None, header_user=request.headers.get(USER_HEADER))
    request_user.set(user_id)  # whose personal adapter answers, on the plm route
    route = _anthropic_route(state, parsed.model)

    sent, memory, used = await _recall(state, user_id, body)
    if (name := upstream_model(route, parsed.model)) != parsed.model:
        sent = {**sent, "model": name}
    headers = {"x-memlane-memory": memory, "x-memlane-memories": str(used)}
    exchange = _ExchangeDraft(state, request_id, user_id, parsed.model, route.provider, stream, body, sent,
                              started, memory=memory)
    content = await request.body() if sent is body else _encode(sent)
    try:
        reply = await until_disconnect(request, _open(request, route, sent, content, stream=stream))
    except ClientDisconnected:
        exchange.finish(499, "client_disconnected", b"", upstream_s=0.0)
        return Response(status_code=499)
    except ProxyError as err:
        if isinstance(err, UpstreamError) or err.status in (429, 529):
            state.metrics.upstream_errors.labels(provider=route.provider, code=err.code or "").inc()
        exchange.finish(err.status, err.message, b"", upstream_s=0.0)
        err.headers.update(headers)
        raise
    headers.update(reply.headers)
    if stream:
        return StreamingResponse(_relay(reply, exchange), media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"})
    try:
        answer = b"".join([chunk async for chunk in reply.body])  # arrived whole in _open
    finally:
        await reply.aclose()
    exchange.finish(200, None, teacher_view(answer, stream=False), upstream_s=reply.upstream_s)
    return Response(answer, media_type=reply.media_type, headers=headers)


@_anthropic_errors
async def count_tokens(request: Request) -> Response:
    """``POST /v1/messages/count_tokens``, forwarded as sent (the memory block is not counted)."""
    state: AppState = request.app.state.memlane
    state.keyring.authenticate(request.headers)
    body = await read_json(request)
    route = _anthropic_route(state, validate_messages(body, count_tokens=True).model)
    content = await request.body()
    if upstream_model(route, body["model"]) != body["model"]:
        content = _encode(body)
    try:
        reply = await until_disconnect(request, _open(request, route, body, content, stream=False,
                                                      path="/v1/messages/count_tokens"))
    except ClientDisconnected:
        return Response(status_code=499)
    try:
        answer = b"".join([chunk async for chunk in reply.body])
    finally:
        await reply.aclose()
    return Response(answer, media_type=reply.media_type, headers=reply.headers)


def _anthropic_route(state: AppState, model: str) -> RouteConfig:
    route = state.settings.route_for(model)
    if route is None:
        raise ModelNotFound(f"model: {model} is not served by this memlane; GET /v1/models lists what it serves.",
                            param="model")
    if route.provider != "anthropic":
        raise InvalidRequest(
            f"The model '{model}' is routed to a {route.provider} upstream; /v1/messages serves only models "
            "routed to an anthropic upstream. Use /v1/chat/completions for this model.",
            param="model", code="unsupported_model")
    return route


async def _recall(state: AppState, user_id: str, body: dict) -> tuple[dict, str, int]:
    """(body to send, memory state, memories used): the ``<user_profile>`` block in ``system``."""
    text = latest_prompt_text(body["messages"]) or ""
    # The recaller owns retrieval, its budget, cap and metrics; asked with the prompt alone, the
    # block it makes for Claude is the one system message it inserts first.
    recall = await state.recaller.enrich(user_id, {"messages": [{"role": "user", "content": text}]}, "anthropic")
    if not recall.used:
        return body, recall.state, 0
    return inject_system(body, recall.body["messages"][0]["content"]), recall.state, recall.used


async def _open(request: Request, route: RouteConfig, body: dict, content: bytes, *, stream: bool,
                path: str = "/v1/messages") -> UpstreamReply:
    if not route.api_base:
        raise UpstreamError(f"route {route.match!r} has no api_base", code="upstream_not_configured")
    headers = {
        "content-type": "application/json",
        "accept": "text/event-stream" if stream else "application/json",
        "anthropic-version": request.headers.get("anthropic-version") or DEFAULT_ANTHROPIC_VERSION,
    }
    if beta := request.headers.get("anthropic-beta"):
        headers["anthropic-beta"] = beta
    if route.api_key is not None:
        headers["x-api-key"] = route.api_key.get_secret_value()
    return await forward(http_client(request), route.api_base.rstrip("/") + path, headers=headers,
                         content=content, stream=stream, provider=route.provider, on_status=anthropic_status_error)


def _encode(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


async def _relay(reply: UpstreamReply, exchange: _ExchangeDraft) -> AsyncIterator[bytes]:
    """The upstream's events as they come, whole: a stream that breaks mid-event ends with the
    ``event: error`` alone, not glued to half an event the client could not parse."""
    kept = bytearray()
    pending = b""
    status, error = 200, None
    draining = exchange.state.draining
    task = draining.register()
    try:
        async for chunk in reply.body:
            exchange.first_byte()
            if len(kept) < MAX_LOGGED_RESPONSE_BYTES:
                kept += chunk
            pending += chunk
            cut = _event_end(pending)
            if cut:
                yield pending[:cut]
                pending = pending[cut:]
        if pending:
            yield pending
    except ProxyError as err:
        status, error = err.status, err.message
        exchange.state.metrics.upstream_errors.labels(provider=reply.provider, code=err.code or "").inc()
        event = anthropic_sse_error_event(err)
        kept += event
        yield event
    except asyncio.CancelledError:
        if not draining.interrupted(task):
            status, error = 499, "client_disconnected"
            raise
        task.uncancel()  # type: ignore[union-attr]  # the server is stopping (proxy/shutdown.py): say so
        err = ServiceUnavailable("memlane is shutting down; this answer was cut short.", code="server_shutting_down")
        status, error = err.status, err.message
        event = anthropic_sse_error_event(err)
        kept += event
        yield event
    finally:
        draining.unregister(task)
        await reply.aclose()
        exchange.finish(status, error, teacher_view(bytes(kept), stream=True), upstream_s=reply.upstream_s)


def _event_end(data: bytes) -> int:
    """Where the last complete SSE event in ``data`` ends; 0 if none has."""
    lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
