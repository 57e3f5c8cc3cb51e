"""Byte passthrough to upstreams that already speak the client's format, and the two OpenAI
endpoints that need nothing else: ``POST /v1/embeddings`` and the legacy ``POST /v1/completions``.

``forward`` sends one request body to one URL over the shared ``httpx.AsyncClient`` and returns
an ``UpstreamReply`` whose body is the upstream's bytes, unchanged. ``/v1/messages`` uses it for
Anthropic upstreams (``proxy/messages.py``).

Embeddings and completions get no memory and no teacher-log row: an embedding has no answer to
learn from, and editor autocomplete fires on every keystroke with code, not facts about the user.
They go to OpenAI-compatible routes (and to Ollama's OpenAI-compatible ``/v1`` API) by the model's
route; ``local/all-minilm-l6-v2`` embeddings come from memlane's own embedder.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from proxy.chat import ClientDisconnected, until_disconnect
from proxy.enrich import estimate_tokens
from proxy.errors import (
    InvalidRequest,
    ModelNotFound,
    ProxyError,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
    sse_error_event,
)
from proxy.schema import read_json
from proxy.settings import RouteConfig
from proxy.state import AppState
from proxy.upstream import (
    UpstreamReply,
    forwarded_headers,
    one_chunk,
    read_body,
    timed_raw,
    upstream_model,
    upstream_status_error,
    without_credentials,
)

ErrorMapper = Callable[[str, int, bytes, httpx.Headers], ProxyError]

LOCAL_EMBEDDING_MODEL = "all-minilm-l6-v2"
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit per request


async def forward(
    client: httpx.AsyncClient,
    url: str,
    *,
    headers: dict[str, str],
    content: bytes,
    stream: bool,
    provider: str,
    on_status: ErrorMapper = upstream_status_error,
) -> UpstreamReply:
    """POST ``content`` to ``url``; a success status returns the reply, any other raises."""
    request = client.build_request("POST", url, headers=headers, content=content)
    started = time.perf_counter()
    try:
        response = await client.send(request, stream=True)
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout(f"{provider} upstream timed out") from exc
    except httpx.HTTPError as exc:
        raise UpstreamError(f"{provider} upstream unreachable: {type(exc).__name__}") from exc
    if response.status_code >= 400:
        body = without_credentials(await response.aread(), headers)
        await response.aclose()
        raise on_status(provider, response.status_code, body, response.headers)
    relayed = forwarded_headers(response.headers)
    if "request-id" in response.headers:  # Anthropic's; its SDK shows it to the user
        relayed["request-id"] = response.headers["request-id"]
    media_type = response.headers.get("content-type", "application/json").split(";")[0]
    if not stream:  # read it all here, where the caller's disconnect watch still applies
        body = await read_body(response, provider)
        return UpstreamReply(body=one_chunk(body), provider=provider, headers=relayed, media_type=media_type,
                             upstream_s=time.perf_counter() - started)
    reply = UpstreamReply(body=one_chunk(b""), provider=provider, headers=relayed, media_type=media_type,
                          upstream_s=time.perf_counter() - started, _close=response.aclose)
    reply.body = timed_raw(response, reply)
    return reply


def http_client(request: Request) -> httpx.AsyncClient:
    client = request.app.state.memlane.http_client
    if client is None:
        raise ServiceUnavailable("memlane has no upstream HTTP client yet; retry in a moment.")
    return client


async def embeddings(request: Request) -> Response:
    """``POST /v1/embeddings``: forwarded by route, or memlane's own embedder for ``local/*``."""
    state, body, route = await _routed(request, required="input")
    if route.provider == "local":
        return await _local_embeddings(state, route, body)
    return await _forward_openai(request, state, route, body, "embeddings", stream=False)


async def completions(request: Request) -> Response:
    """``POST /v1/completions`` (legacy text completions, e.g. editor autocomplete), streaming or not."""
    state, body, route = await _routed(request, required="prompt")
    if route.provider == "local":
        raise InvalidRequest(
            f"The local model does not serve the legacy /v1/completions endpoint; use /v1/chat/completions "
            f"with '{body['model']}'.", param="model", code="unsupported_endpoint")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("Invalid value for 'stream': expected a boolean.", param="stream", code="invalid_value")
    return await _forward_openai(request, state, route, body, "completions", stream=stream)


async def _routed(request: Request, *, required: str) -> tuple[AppState, dict, RouteConfig]:
    state: AppState = request.app.state.memlane
    state.keyring.authenticate(request.headers)
    body = await read_json(request)
    model = body.get("model")
    if model is None:
        raise InvalidRequest("Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("Invalid value for 'model': expected a model name.", param="model", code="invalid_value")
    if required not in body:
        raise InvalidRequest(f"Missing required parameter: '{required}'.", param=required,
                             code="missing_required_parameter")
    route = state.settings.route_for(model)
    if route is None or route.provider not in ("openai", "ollama", "local"):
        where = f"an {route.provider} upstream, which does not serve {request.url.path}" if route else "no upstream"
        raise ModelNotFound(f"The model '{model}' is routed to {where}. GET /v1/models lists what this memlane "
                            "serves.", param="model")
    return state, body, route


async def _forward_openai(request: Request, state: AppState, route: RouteConfig, body: dict, path: str, *,
                          stream: bool) -> Response:
    if not route.api_base:
        raise UpstreamError(f"route {route.match!r} has no api_base", code="upstream_not_configured")
    base = route.api_base.rstrip("/")
    if route.provider == "ollama":  # the route's base is Ollama's root; its OpenAI API lives under /v1
        base += "/v1"
    headers = {"content-type": "application/json", "accept": "text/event-stream" if stream else "application/json"}
    if route.api_key is not None:
        headers["authorization"] = f"Bearer {route.api_key.get_secret_value()}"
    name = upstream_model(route, body["model"])
    content = await request.body() if name == body["model"] else json.dumps(dict(body, model=name)).encode()
    try:
        reply = await until_disconnect(request, forward(
            http_client(request), f"{base}/{path}", headers=headers, content=content, stream=stream,
            provider=route.provider))
    except ClientDisconnected:
        return Response(status_code=499)
    except ProxyError as err:
        if isinstance(err, UpstreamError) or err.status == 429:
            state.metrics.upstream_errors.labels(provider=route.provider, code=err.code or "").inc()
        raise
    if stream:
        return StreamingResponse(_relay(reply, state), media_type="text/event-stream",
                                 headers={**reply.headers, "cache-control": "no-cache", "x-accel-buffering": "no"})
    try:
        payload = b"".join([chunk async for chunk in reply.body])
    finally:
        await reply.aclose()
    return Response(payload, media_type=reply.media_type, headers=reply.headers)


async def _relay(reply: UpstreamReply, state: AppState) -> AsyncIterator[bytes]:
    try:
        async for chunk in reply.body:
            yield chunk
    except ProxyError as err:
        state.metrics.upstream_errors.labels(provider=reply.provider, code=err.code or "").inc()
        yield sse_error_event(err)
    finally:
        await reply.aclose()


async def _local_embeddings(state: AppState, route: RouteConfig, body: dict) -> Response:
    if upstream_model(route, body["model"]) != LOCAL_EMBEDDING_MODEL:
        raise ModelNotFound(f"The model '{body['model']}' does not exist. The local embedding model is "
                            f"'{route.strip_prefix or ''}{LOCAL_EMBEDDING_MODEL}'.", param="model")
    texts = _texts(body["input"])
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise InvalidRequest("encoding_format must be 'float' or 'base64'.", param="encoding_format",
                             code="invalid_value")
    vectors = await _embed(state, texts)  # (N, dim) float32
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != vectors.shape[1]:
        raise InvalidRequest(f"The local embedding model has {vectors.shape[1]} dimensions; it cannot return "
                             f"{dimensions}.", param="dimensions", code="invalid_value")
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, fmt)} for i, v in enumerate(vectors)]
    tokens = sum(estimate_tokens(t) for t in texts)
    return JSONResponse({"object": "list", "data": data, "model": body["model"],
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _texts(value: Any) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise InvalidRequest("'input' must be a non-empty string or a list of non-empty strings (token arrays are "
                             "not supported by the local embedder).", param="input", code="invalid_value")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(f"'input' may hold at most {MAX_EMBEDDING_INPUTS} texts.", param="input",
                             code="invalid_value")
    return texts


async def _embed(state: AppState, texts: list[str]) -> np.ndarray:
    try:
        batching = state.recaller.embedder  # shares the model's one worker with memory recall
        if batching is not None:
            return np.stack(await asyncio.gather(*(batching.embed_one(t) for t in texts)))
        if state.embedder is not None:
            return await asyncio.to_thread(state.embedder.embed, texts)
    except Exception as exc:  # the model failed to load or run: say so, with what it said
        raise ServiceUnavailable(f"the local embedder failed: {type(exc).__name__}: {exc}") from exc
    raise ServiceUnavailable("memlane has no embedder configured.")


def _encode(vector: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return [float(x) for x in vector]
