"""The embedded local model as an upstream, speaking OpenAI's chat completion format.

Generation runs in the model's worker thread (``adapters.LocalModel``); this module only turns
text deltas into OpenAI JSON or SSE chunks. Sampling defaults to greedy when the client sets no
temperature: a 135M model sampled at OpenAI's default of 1.0 rambles.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any

from adapters import ContextLengthError, GenerationParams, LocalModel, LocalModelError
from proxy.errors import (
    InvalidRequest,
    ModelNotFound,
    ServiceUnavailable,
    UpstreamError,
)
from proxy.settings import RouteConfig
from proxy.upstream import UpstreamReply, one_chunk, timed, upstream_model

MAX_NEW_TOKENS = 2048

# The memory owner of the request being served: the chat handlers set it once the user is
# resolved, so that the personal model (`PersonalUpstream`) answers with that user's adapter.
request_user: ContextVar[str | None] = ContextVar("memlane_request_user", default=None)


class LocalUpstream:
    provider = "local"

    def __init__(self, model: LocalModel) -> None:
        self.model = model

    def served_models(self, route: RouteConfig) -> list[str]:
        return [f"{route.strip_prefix or ''}{self.model.name}"]

    async def open(self, route: RouteConfig, body: dict, *, stream: bool) -> UpstreamReply:
        name = upstream_model(route, body["model"])
        if name != self.model.name:
            raise ModelNotFound(
                f"The model '{body['model']}' does not exist. The local model is "
                f"'{self.served_models(route)[0]}'.",
                param="model",
            )
        params = generation_params(body)
        if not self.model.loaded:
            try:
                await asyncio.to_thread(self.model.load)
            except LocalModelError as exc:
                raise ServiceUnavailable(f"the local model could not be loaded: {exc}") from exc
        started = time.perf_counter()
        try:
            generation = self._generate(body["messages"], params)
        except ContextLengthError as exc:
            raise InvalidRequest(str(exc), param="messages", code="context_length_exceeded") from exc
        except LocalModelError as exc:
            raise UpstreamError(f"local model: {exc}") from exc
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        model_name = body["model"]
        if not stream:
            try:
                text = await generation.text()
            except LocalModelError as exc:
                raise UpstreamError(f"local model: {exc}") from exc
            payload = _completion(completion_id, model_name, text, generation)
            return UpstreamReply(
                body=one_chunk(json.dumps(payload).encode()), provider=self.provider,
                upstream_s=time.perf_counter() - started,
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        reply = UpstreamReply(
            body=one_chunk(b""), provider=self.provider, media_type="text/event-stream", _close=generation.aclose
        )
        reply.body = _sse(completion_id, model_name, generation, include_usage, reply)
        return reply

    def _generate(self, messages: list[dict], params: GenerationParams) -> Any:
        return self.model.generate(messages, params)


class PersonalUpstream(LocalUpstream):
    """The personal language model: the local base model with the requesting user's LoRA
    adapter (`adapters.plm.PersonalModel`), served under its own route (``plm/<base>``)."""

    provider = "plm"

    def _generate(self, messages: list[dict], params: GenerationParams) -> Any:
        user_id = request_user.get()
        if user_id is None:  # never guess whose adapter to use
            raise ServiceUnavailable("the personal model needs the request's user; none was resolved")
        return self.model.generate(messages, params, user_id=user_id)


def generation_params(body: dict[str, Any]) -> GenerationParams:
    if (body.get("n") or 1) != 1:
        raise InvalidRequest("The local model returns one choice; set n to 1.", param="n")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 512
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    return GenerationParams(
        max_new_tokens=min(int(max_tokens), MAX_NEW_TOKENS),
        temperature=float(body.get("temperature") or 0.0),
        top_p=1.0 if body.get("top_p") is None else float(body["top_p"]),
        stop=tuple(str(s) for s in stop),
        seed=body.get("seed"),
    )


def _usage(generation: Any) -> dict[str, int]:
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
    }


def _completion(cid: str, model: str, text: str, generation: Any) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": generation.finish_reason or "stop",
            }
        ],
        "usage": _usage(generation),
    }


def _chunk(cid: str, model: str, created: int, delta: dict, finish: str | None) -> bytes:
    payload = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


async def _sse(
    cid: str, model: str, generation: Any, include_usage: bool, reply: UpstreamReply
) -> AsyncIterator[bytes]:
    created = int(time.time())
    try:
        role_sent = False
        try:
            async for delta in timed(generation, reply):
                if delta:
                    head = {} if role_sent else {"role": "assistant"}
                    role_sent = True
                    yield _chunk(cid, model, created, {**head, "content": delta}, None)
        except LocalModelError as exc:
            raise UpstreamError(f"local model: {exc}") from exc
        yield _chunk(cid, model, created, {}, generation.finish_reason or "stop")
        if include_usage:
            usage = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [], "usage": _usage(generation)}
            yield b"data: " + json.dumps(usage).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"
    finally:
        await generation.aclose()
