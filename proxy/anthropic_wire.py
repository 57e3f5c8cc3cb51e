"""Anthropic's Messages format at memlane's edges: request checks, upstream errors, teacher log.

memlane forwards Messages requests and answers as bytes; this module only reads them. It checks
the fields memlane relies on (never rewriting the request), turns an Anthropic upstream's error
answer into a ``ProxyError`` that keeps Anthropic's error type, and reassembles an answer (one
JSON message or the SSE events as sent) into the OpenAI chat-completion shape the teacher log
stores (``learner.assemble`` reads that shape).
"""

from __future__ import annotations

import json
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from proxy.errors import InvalidRequest, ProxyError, RateLimited, UpstreamError

_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
           "tool_use": "tool_calls", "refusal": "content_filter"}


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[dict[str, Any]] | None = None
    stream: bool | None = False


class CountTokensRequest(MessagesRequest):
    max_tokens: int | None = Field(default=None, ge=1)  # type: ignore[assignment]


def validate_messages(body: dict[str, Any], *, count_tokens: bool = False) -> MessagesRequest:
    try:
        return (CountTokensRequest if count_tokens else MessagesRequest).model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p not in ("str", "list[dict[str,any]]"))
        if first["type"] == "missing":
            raise InvalidRequest(f"{where}: Field required", param=where, code="missing_required_parameter") from exc
        raise InvalidRequest(f"{where}: {first['msg']}", param=where, code="invalid_value") from exc


def anthropic_status_error(provider: str, status: int, content: bytes, headers: httpx.Headers) -> ProxyError:
    """Map an Anthropic upstream's error status to what the client sees, keeping its error type."""
    kind, message = _error_fields(content)
    if status in (401, 403):
        # The client's own key was fine (we checked it); memlane's upstream key was not.
        return UpstreamError(f"{provider} upstream rejected memlane's credentials ({status})",
                             code="upstream_auth_failed")
    if status == 429:
        extra = {k: v for k, v in headers.items() if k == "retry-after" or k.startswith("anthropic-ratelimit-")}
        err: ProxyError = RateLimited(message or f"{provider} upstream rate limit", headers=extra)
    elif status == 529:  # overloaded: the same status, so clients back off as they would with Anthropic
        err = ProxyError(message or f"{provider} upstream is overloaded", status=529, code="upstream_overloaded")
        err.type = "server_error"
    elif 400 <= status < 500:
        err = ProxyError(message or f"{provider} upstream rejected the request ({status})", status=status,
                         code="upstream_rejected")
        err.type = "invalid_request_error"
    else:
        return UpstreamError(f"{provider} upstream failed with status {status}" + (f": {message}" if message else ""))
    err.anthropic_type = kind
    return err


def _error_fields(content: bytes) -> tuple[str | None, str | None]:
    try:
        err = json.loads(content).get("error")
    except (ValueError, AttributeError):
        return None, None
    if not isinstance(err, dict):
        return None, None
    kind, message = err.get("type"), err.get("message")
    return (kind if isinstance(kind, str) else None), (message if isinstance(message, str) else None)


def teacher_view(raw: bytes, *, stream: bool) -> bytes:
    """The answer in ``raw`` as an OpenAI chat completion (JSON, or SSE when ``stream``)."""
    if stream:
        message, error = _from_events(raw)
    else:
        try:
            message, error = json.loads(raw), None
        except ValueError:
            return raw
        if not isinstance(message, dict):
            return raw
    if error is not None:
        return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"
    if message is None:
        return b""
    answer, finish, usage = _openai_answer(message)
    if not stream:
        return json.dumps({"object": "chat.completion", "model": message.get("model"),
                           "choices": [{"index": 0, "message": answer, "finish_reason": finish}],
                           "usage": usage}).encode()
    calls = [dict(c, index=i) for i, c in enumerate(answer.pop("tool_calls", []))]
    delta = {**answer, **({"tool_calls": calls} if calls else {})}
    events = [{"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]},
              {"object": "chat.completion.chunk", "choices": [], "usage": usage}]
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def _from_events(raw: bytes) -> tuple[dict | None, dict | None]:
    """Rebuild the final message from Messages SSE events: (message, error)."""
    message: dict | None = None
    blocks: dict[int, dict] = {}
    partial: dict[int, list[str]] = {}
    for event in _sse_data(raw):
        kind = event.get("type")
        if kind == "error":
            return None, event.get("error")
        index = event.get("index", 0)
        if not isinstance(index, int) or isinstance(index, bool):  # an upstream's garbage: skipped
            continue
        if kind == "message_start":
            message = dict(_dict(event.get("message")))
        elif kind == "content_block_start":
            blocks[index] = dict(_dict(event.get("content_block")))
        elif kind == "content_block_delta":
            block = blocks.setdefault(index, {"type": "text", "text": ""})
            delta = _dict(event.get("delta"))
            if delta.get("type") == "text_delta":
                block["text"] = _str(block.get("text")) + _str(delta.get("text"))
            elif delta.get("type") == "input_json_delta":
                partial.setdefault(index, []).append(_str(delta.get("partial_json")))
        elif kind == "message_delta" and message is not None:
            message.update(_dict(event.get("delta")))
            message["usage"] = {**_dict(message.get("usage")), **_dict(event.get("usage"))}
    if message is None:
        return None, None
    for index, parts in partial.items():
        try:
            blocks[index]["input"] = json.loads("".join(parts) or "{}")
        except ValueError:
            blocks[index]["input"] = "".join(parts)
    message["content"] = [blocks[i] for i in sorted(blocks)]
    return message, None


def _sse_data(raw: bytes) -> list[dict]:
    events = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if line.startswith("data:"):
            try:
                event = json.loads(line[5:].strip())
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
    return events


def _openai_answer(message: dict) -> tuple[dict, str | None, dict | None]:
    text: list[str] = []
    calls: list[dict] = []
    content = message.get("content")
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            text.append(_str(block.get("text")))
        elif block.get("type") == "tool_use":
            arguments = block.get("input")
            calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block.get("name"),
                "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
    answer: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if calls:
        answer["tool_calls"] = calls
    stop = _str(message.get("stop_reason")) or None
    usage = _dict(message.get("usage"))
    prompt = sum(_count(usage.get(k)) for k in ("input_tokens", "cache_read_input_tokens",
                                                "cache_creation_input_tokens"))
    completion = _count(usage.get("output_tokens"))
    counted = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return answer, _FINISH.get(stop, stop) if stop else None, counted if usage else None


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
