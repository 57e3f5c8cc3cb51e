"""Upstreams whose wire format differs from OpenAI's (Anthropic, Ollama), through litellm.

litellm is imported lazily (it costs seconds) and only when such a route is configured. Its
price-list download thread is disabled, and it sends HTTP through httpx like the rest of memlane.
Its answers are OpenAI-shaped objects, re-encoded here as OpenAI JSON or SSE.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from proxy.errors import ProxyError, UpstreamError, UpstreamTimeout
from proxy.settings import RouteConfig
from proxy.upstream import (
    UpstreamReply,
    one_chunk,
    timed,
    upstream_model,
    upstream_status_error,
)

_LITELLM_PREFIX = {"anthropic": "anthropic", "ollama": "ollama_chat"}
_import_lock = threading.Lock()
_litellm: Any = None


def load_litellm() -> Any:
    global _litellm
    with _import_lock:
        if _litellm is None:
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            import litellm

            litellm.disable_aiohttp_transport = True
            litellm.telemetry = False
            litellm.suppress_debug_info = True
            _litellm = litellm
    return _litellm


class LiteLLMUpstream:
    def __init__(self, provider: str, *, timeout_s: float) -> None:
        if provider not in _LITELLM_PREFIX:
            raise ValueError(f"litellm upstream for {provider!r} is not supported")
        self.provider = provider
        self._timeout_s = timeout_s

    async def open(self, route: RouteConfig, body: dict, *, stream: bool) -> UpstreamReply:
        litellm = load_litellm()
        params = {k: v for k, v in body.items() if k not in ("model", "messages", "stream")}
        model = f"{_LITELLM_PREFIX[self.provider]}/{upstream_model(route, body['model'])}"
        started = time.perf_counter()
        try:
            result = await litellm.acompletion(
                model=model,
                messages=body["messages"],
                stream=stream,
                api_base=route.api_base,
                api_key=route.api_key.get_secret_value() if route.api_key else None,
                timeout=self._timeout_s,
                drop_params=True,
                num_retries=0,
                **params,
            )
        except Exception as exc:  # litellm raises its own hierarchy; translated once, here
            raise translate_error(self.provider, exc) from exc
        waited = time.perf_counter() - started
        if not stream:
            payload = json.dumps(result.model_dump(exclude_none=True)).encode()
            return UpstreamReply(body=one_chunk(payload), provider=self.provider, upstream_s=waited)
        reply = UpstreamReply(
            body=one_chunk(b""), provider=self.provider, media_type="text/event-stream", upstream_s=waited,
            _close=getattr(result, "aclose", None),
        )
        reply.body = _sse(result, reply, self.provider)
        return reply


async def _sse(stream: Any, reply: UpstreamReply, provider: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in timed(stream, reply):
            yield b"data: " + json.dumps(chunk.model_dump(exclude_none=True)).encode() + b"\n\n"
    except Exception as exc:  # litellm's exceptions, translated once, here
        raise translate_error(provider, exc) from exc
    yield b"data: [DONE]\n\n"


def translate_error(provider: str, exc: BaseException) -> ProxyError:
    if isinstance(exc, ProxyError):
        return exc
    name = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException) or name in ("Timeout", "APITimeoutError"):
        return UpstreamTimeout(f"{provider} upstream timed out")
    status = getattr(exc, "status_code", None)
    headers = httpx.Headers(getattr(exc, "litellm_response_headers", None) or {})
    if name == "APIConnectionError" or not isinstance(status, int):
        return UpstreamError(f"{provider} upstream unreachable: {name}")
    message = str(getattr(exc, "message", "") or "")
    content = json.dumps({"error": {"message": message}}).encode() if message else b""
    return upstream_status_error(provider, status, content, headers)
