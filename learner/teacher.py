"""Turn what the proxy saw on the wire into a teacher-log answer.

Runs in the learner's thread, off the request path: the proxy hands over the raw response bytes
(one JSON document, or the SSE stream as sent to the client) and this module reassembles the
final assistant message, tool calls included, with its finish reason and usage.
"""

from __future__ import annotations

import json
from typing import Any


def assemble(raw: bytes, *, stream: bool) -> tuple[dict | None, dict | None]:
    """(answer, usage) from a chat completion response; answer is None if nothing parsed."""
    if not stream:
        try:
            doc = json.loads(raw)
        except ValueError:
            return None, None
        choices = doc.get("choices") or []
        if not choices:
            return None, doc.get("usage")
        first = choices[0]
        answer = dict(first.get("message") or {})
        answer["finish_reason"] = first.get("finish_reason")
        return answer, doc.get("usage")
    return _assemble_stream(raw)


def sse_events(raw: bytes) -> list[dict]:
    events = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if not data or data == "[DONE]":
            continue
        try:
            events.append(json.loads(data))
        except ValueError:
            continue
    return events


def _assemble_stream(raw: bytes) -> tuple[dict | None, dict | None]:
    content: list[str] = []
    tool_calls: dict[int, dict[str, Any]] = {}
    finish_reason = None
    usage = None
    role = "assistant"
    seen = False
    for event in sse_events(raw):
        if event.get("usage"):
            usage = event["usage"]
        if "error" in event:
            return {"role": role, "content": "".join(content) or None, "error": event["error"]}, usage
        for choice in event.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            seen = True
            delta = choice.get("delta") or {}
            role = delta.get("role") or role
            if delta.get("content"):
                content.append(delta["content"])
            for call in delta.get("tool_calls") or []:
                _merge_tool_call(tool_calls, call)
            finish_reason = choice.get("finish_reason") or finish_reason
    if not seen:
        return None, usage
    answer: dict[str, Any] = {"role": role, "content": "".join(content) or None, "finish_reason": finish_reason}
    if tool_calls:
        answer["tool_calls"] = [tool_calls[i] for i in sorted(tool_calls)]
    return answer, usage


def _merge_tool_call(calls: dict[int, dict[str, Any]], delta: dict[str, Any]) -> None:
    index = delta.get("index", 0)
    call = calls.setdefault(index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
    if delta.get("id"):
        call["id"] = delta["id"]
    if delta.get("type"):
        call["type"] = delta["type"]
    function = delta.get("function") or {}
    if function.get("name"):
        call["function"]["name"] += function["name"]
    if function.get("arguments"):
        call["function"]["arguments"] += function["arguments"]
