"""Pure ASGI middleware: request id, body-size limit, access log and request metrics.

Pure ASGI (not BaseHTTPMiddleware) so that streamed responses pass through untouched and a
client disconnect reaches the handler. It is also the last line of defence: an exception that
escapes a handler before the response started becomes an OpenAI-shaped 500 carrying the request
id, never a stack trace.
"""

from __future__ import annotations

import re
import time
import uuid

import duckdb
import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.errors import ProxyError, RequestTooLarge, ServiceUnavailable, error_response
from proxy.metrics import Metrics

log = structlog.get_logger("memlane.http")

_INCOMING_ID = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")
KNOWN_ROUTES = frozenset(
    {
        "/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens", "/v1/embeddings",
        "/v1/completions", "/v1/models", "/healthz", "/readyz", "/metrics", "/v1/memories",
    }
)


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        # Our id is unique by construction (it keys the teacher log); a client's own id is kept
        # beside it in the logs for correlation.
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        incoming = headers.get("x-request-id", "")
        if _INCOMING_ID.match(incoming):
            structlog.contextvars.bind_contextvars(request_id=request_id, client_request_id=incoming)
        else:
            structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500
        response_started = False
        route = scope["path"] if scope["path"] in KNOWN_ROUTES else "other"
        if route == "other" and scope["path"].startswith("/v1/memories/"):
            route = "/v1/memories"

        declared = headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._send_error(send, RequestTooLarge(self._too_large()), request_id)
            self._record(scope, route, 413, started)
            structlog.contextvars.unbind_contextvars("request_id", "client_request_id")
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise RequestTooLarge(self._too_large())
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_id)
        except ProxyError as err:
            if response_started:
                raise
            status = err.status
            await self._send_error(send, err, request_id)
        except duckdb.FatalException as exc:  # DuckDB invalidated the database: reopened in the background
            log.error("memory_store_invalidated", error=type(exc).__name__, path=scope["path"])
            _recover_store(scope, exc)
            if response_started:
                raise
            status = 503
            await self._send_error(send, ServiceUnavailable(
                "The memory store hit a database error and is being reopened; retry shortly.",
                code="memory_unavailable"), request_id)
        except Exception as exc:
            log.error("unhandled_error", error=repr(exc), path=scope["path"])
            if response_started:
                raise
            status = 500
            await self._send_error(send, ProxyError("The server had an error processing your request."), request_id)
        finally:
            self._record(scope, route, status, started)
            structlog.contextvars.unbind_contextvars("request_id", "client_request_id")

    def _too_large(self) -> str:
        return f"Request body is larger than the limit of {self.max_body_bytes} bytes."

    async def _send_error(self, send: Send, err: ProxyError, request_id: str) -> None:
        response = error_response(err, request_id=request_id)
        await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})

    def _record(self, scope: Scope, route: str, status: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        self.metrics.requests.labels(route=route, method=scope["method"], status=str(status)).inc()
        self.metrics.latency.labels(route=route).observe(elapsed)
        if route in ("/healthz", "/metrics") or (route == "/v1/chat/completions" and status < 400):
            return  # probes are noise; a served chat request already logged chat_done
        log.info("http_request", method=scope["method"], route=route, status=status,
                 latency_ms=round(elapsed * 1000, 3))


def _recover_store(scope: Scope, error: BaseException) -> None:
    state = getattr(getattr(scope.get("app"), "state", None), "memlane", None)
    store = getattr(state, "store", None)
    if store is not None:
        store.recover_soon(error)
