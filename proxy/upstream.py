"""Upstreams: where a chat request goes after enrichment.

Every upstream opens a call and returns an ``UpstreamReply`` once the upstream has answered with
a success status; errors before that point are raised as ``ProxyError``s. The reply's body is an
async iterator of bytes: OpenAI-shaped SSE when streaming, one JSON document otherwise.

``OpenAIUpstream`` forwards OpenAI-compatible upstreams byte for byte over one pooled
``httpx.AsyncClient``. Anthropic and Ollama go through litellm (``proxy/translate.py``), the
embedded model through ``proxy/local.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import httpx
import structlog
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from proxy.errors import ProxyError, RateLimited, UpstreamError, UpstreamTimeout
from proxy.settings import RouteConfig

T = TypeVar("T")
log = structlog.get_logger("memlane.upstream")

# Upstream response headers worth passing on to the client.
_FORWARDED_PREFIXES = ("x-ratelimit-", "openai-", "anthropic-")


@dataclass
class UpstreamReply:
    body: AsyncIterator[bytes]
    provider: str
    headers: dict[str, str] = field(default_factory=dict)
    media_type: str = "application/json"
    upstream_s: float = 0.0  # seconds spent waiting on the upstream, updated while iterating
    _close: Callable[[], object] | None = None

    async def aclose(self) -> None:
        if self._close is not None:
            result = self._close()
            if hasattr(result, "__await__"):
                await result  # type: ignore[misc]
            self._close = None


class ChatUpstream(Protocol):
    provider: str

    async def open(self, route: RouteConfig, body: dict, *, stream: bool) -> UpstreamReply: ...


def upstream_model(route: RouteConfig, model: str) -> str:
    if route.strip_prefix and model.startswith(route.strip_prefix):
        return model[len(route.strip_prefix):]
    return model


class OpenAIUpstream:
    """Any OpenAI-compatible server: bytes in, bytes out, nothing re-encoded."""

    provider = "openai"

    def __init__(self, client: httpx.AsyncClient, *, retries: int = 1) -> None:
        self._client = client
        self.retries = retries  # extra attempts after a connection failed before any response
        self._urls: dict[str, httpx.URL] = {}  # per api_base: parsing a URL per request shows in profiles

    def _url(self, api_base: str) -> httpx.URL:
        url = self._urls.get(api_base)
        if url is None:
            url = self._urls[api_base] = httpx.URL(api_base.rstrip("/") + "/chat/completions")
        return url

    async def open(self, route: RouteConfig, body: dict, *, stream: bool) -> UpstreamReply:
        if not route.api_base:
            raise UpstreamError(f"route {route.match!r} has no api_base", code="upstream_not_configured")
        headers = {"content-type": "application/json", "accept": "text/event-stream" if stream else "application/json"}
        if route.api_key is not None:
            headers["authorization"] = f"Bearer {route.api_key.get_secret_value()}"
        payload = dict(body, model=upstream_model(route, body["model"]))
        request = self._client.build_request("POST", self._url(route.api_base), headers=headers,
                                             content=json.dumps(payload))
        started = time.perf_counter()
        try:
            response = await send_retrying(self._client, request, self.retries)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"{self.provider} upstream timed out") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{self.provider} upstream unreachable: {type(exc).__name__}") from exc
        if response.status_code >= 400:
            content = without_credentials(await response.aread(), headers)
            await response.aclose()
            raise upstream_status_error(self.provider, response.status_code, content, response.headers)

        if not stream:  # read it all here, where the caller's disconnect watch still applies
            content = await read_body(response, self.provider)
            media_type = response.headers.get("content-type", "application/json").split(";")[0]
            if media_type == "application/json" and not _is_json(content):
                raise UpstreamError(f"{self.provider} upstream returned malformed JSON",
                                    code="upstream_malformed_response")
            return UpstreamReply(
                body=one_chunk(content), provider=self.provider, headers=forwarded_headers(response.headers),
                media_type=media_type, upstream_s=time.perf_counter() - started,
            )
        reply = UpstreamReply(
            body=_empty(),
            provider=self.provider,
            headers=forwarded_headers(response.headers),
            media_type=response.headers.get("content-type", "application/json").split(";")[0],
            upstream_s=time.perf_counter() - started,
            _close=response.aclose,
        )
        reply.body = timed_raw(response, reply)
        return reply


# Failures where the upstream sent no response at all: a refused connection, or a pooled
# keep-alive connection the upstream had just closed. Timeouts are not retried (the wait would
# multiply), nor is anything once a status arrived: by then bytes may be on their way to the client.
_RETRYABLE = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


async def send_retrying(client: httpx.AsyncClient, request: httpx.Request, retries: int) -> httpx.Response:
    """``client.send(request, stream=True)``, again up to `retries` times if no response came.

    The first attempt is a plain call: tenacity's retry state costs ~10% of the event loop's
    time per request at c=64 (profiled), and the first attempt almost always succeeds."""
    try:
        return await client.send(request, stream=True)
    except _RETRYABLE:
        if retries < 1:
            raise
    async for attempt in AsyncRetrying(stop=stop_after_attempt(retries), reraise=True,
                                       wait=wait_exponential(multiplier=0.05, max=1.0),
                                       retry=retry_if_exception_type(_RETRYABLE)):
        with attempt:
            log.info("upstream_retry", attempt=attempt.retry_state.attempt_number + 1)
            response = await client.send(request, stream=True)
    return response


async def one_chunk(payload: bytes) -> AsyncIterator[bytes]:
    yield payload


async def _empty() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover


async def timed(items: AsyncIterator[T], reply: UpstreamReply) -> AsyncIterator[T]:
    """Yield from ``items``, adding the time spent waiting for each to ``reply.upstream_s``."""
    iterator = aiter(items)
    while True:
        started = time.perf_counter()
        try:
            item = await anext(iterator)
        except StopAsyncIteration:
            return
        finally:
            reply.upstream_s += time.perf_counter() - started
        yield item


async def read_body(response: httpx.Response, provider: str) -> bytes:
    """The whole response body, closed after; httpx failures as memlane's upstream errors."""
    try:
        return await response.aread()
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout(f"{provider} upstream timed out") from exc
    except httpx.HTTPError as exc:
        raise UpstreamError(f"{provider} upstream broke: {type(exc).__name__}") from exc
    finally:
        await response.aclose()


async def timed_raw(response: httpx.Response, reply: UpstreamReply) -> AsyncIterator[bytes]:
    try:
        if response.is_stream_consumed:  # a transport that hands over whole bodies (httpx.MockTransport)
            yield response.content
            return
        async for chunk in timed(response.aiter_raw(), reply):
            yield chunk
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout("upstream timed out while streaming") from exc
    except httpx.HTTPError as exc:
        raise UpstreamError(f"upstream stream broke: {type(exc).__name__}") from exc
    finally:
        await response.aclose()


def _is_json(content: bytes) -> bool:
    try:
        json.loads(content)
    except ValueError:  # UnicodeDecodeError included
        return False
    return True


def forwarded_headers(headers: httpx.Headers) -> dict[str, str]:
    out = {k: v for k, v in headers.items() if k.lower().startswith(_FORWARDED_PREFIXES)}
    if "x-request-id" in headers:
        out["x-upstream-request-id"] = headers["x-request-id"]
    return out


def without_credentials(content: bytes, sent: Mapping[str, str]) -> bytes:
    """An upstream's error body with the credentials memlane sent it blanked out: some
    upstreams quote the request (headers included) in their errors, and errors reach clients."""
    for name in ("authorization", "x-api-key", "api-key"):
        key = sent.get(name, "").split(" ", 1)[-1].strip()  # "Bearer <key>" -> "<key>"
        if len(key) >= 8:
            content = content.replace(key.encode(), b"[redacted]")
    return content


def upstream_status_error(provider: str, status: int, content: bytes, headers: httpx.Headers) -> ProxyError:
    """Map an upstream error status to what the client sees."""
    message, param, code = _upstream_error_fields(content)
    if status == 429:
        extra = {k: headers[k] for k in ("retry-after", "retry-after-ms") if k in headers}
        return RateLimited(message or f"{provider} upstream rate limit", param=param, code=code, headers=extra)
    if status in (401, 403):
        # The client's own key was fine (we checked it); memlane's upstream key was not.
        return UpstreamError(f"{provider} upstream rejected memlane's credentials ({status})", code="upstream_auth_failed")
    if 400 <= status < 500:
        err = ProxyError(message or f"{provider} upstream rejected the request ({status})", param=param,
                         code=code or "upstream_rejected", status=status)
        err.type = "invalid_request_error"
        return err
    return UpstreamError(f"{provider} upstream failed with status {status}" + (f": {message}" if message else ""))


def _upstream_error_fields(content: bytes) -> tuple[str | None, str | None, str | None]:
    try:
        err = json.loads(content).get("error")
    except (ValueError, AttributeError):
        return None, None, None
    if isinstance(err, dict):
        code = err.get("code")
        return err.get("message"), err.get("param"), str(code) if code is not None else None
    if isinstance(err, str):
        return err, None, None
    return None, None, None
