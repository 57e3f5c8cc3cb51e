"""Turn what the proxy saw on the wire into a teacher-log answer.

Runs in the learner's thread, off the request path: the proxy hands over the raw response bytes
(one JSON document, or the SSE stream as sent to the client) and this module reassembles the
final assistant message, tool calls included, with its finish reason and usage. The bytes are
whatever the upstream sent: a part of the wrong JSON type is skipped, never raised on.
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
        if not isinstance(doc, dict):
            return None, None
        choices = _list(doc.get("choices"))
        if not choices or not isinstance(choices[0], dict):
            return None, _usage(doc.get("usage"))
        first = choices[0]
        answer = dict(_dict(first.get("message")))
        answer["finish_reason"] = first.get("finish_reason")
        if first.get("logprobs"):  # the teacher's token log-probabilities, for distillation
            answer["logprobs"] = first["logprobs"]
        if isinstance(doc.get("id"), str):  # the completion id a client may send feedback on
            answer["id"] = doc["id"]
        return answer, _usage(doc.get("usage"))
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
            event = json.loads(data)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def _assemble_stream(raw: bytes) -> tuple[dict | None, dict | None]:
    content: list[str] = []
    tool_calls: dict[int, dict[str, Any]] = {}
    finish_reason = None
    usage = None
    role = "assistant"
    seen = False
    logprobs: list[Any] = []
    completion_id = None
    for event in sse_events(raw):
        if event.get("usage") and isinstance(event["usage"], dict):
            usage = event["usage"]
        if "error" in event:
            return {"role": role, "content": "".join(content) or None, "error": event["error"]}, usage
        if isinstance(event.get("id"), str):
            completion_id = event["id"]
        for choice in _list(event.get("choices")):
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            seen = True
            logprobs += _list(_dict(choice.get("logprobs")).get("content"))
            delta = _dict(choice.get("delta"))
            role = _str(delta.get("role")) or role
            if _str(delta.get("content")):
                content.append(delta["content"])
            for call in _list(delta.get("tool_calls")):
                if isinstance(call, dict):
                    _merge_tool_call(tool_calls, call)
            finish_reason = _str(choice.get("finish_reason")) or finish_reason
    if not seen:
        return None, usage
    answer: dict[str, Any] = {"role": role, "content": "".join(content) or None, "finish_reason": finish_reason}
    if tool_calls:
        answer["tool_calls"] = [tool_calls[i] for i in sorted(tool_calls)]
    if logprobs:
        answer["logprobs"] = {"content": logprobs}
    if completion_id:
        answer["id"] = completion_id
    return answer, usage


def _merge_tool_call(calls: dict[int, dict[str, Any]], delta: dict[str, Any]) -> None:
    index = delta.get("index", 0)
    if not isinstance(index, int) or isinstance(index, bool):
        return
    call = calls.setdefault(index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
    if _str(delta.get("id")):
        call["id"] = delta["id"]
    if _str(delta.get("type")):
        call["type"] = delta["type"]
    function = _dict(delta.get("function"))
    if _str(function.get("name")):
        call["function"]["name"] += function["name"]
    if _str(function.get("arguments")):
        call["function"]["arguments"] += function["arguments"]


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _usage(value: Any) -> dict | None:
    return value if isinstance(value, dict) else None
