"""``GET /v1/interactions``: the caller's own interaction log, read-only, newest first.

Scoped like ``/v1/memories``: the key picks the user, a sub-user only where the key allows it.
There is no parameter that names another user, so no key can read another user's rows. Each
row is a summary a person can read (the last user message and the answer, cut to
``MAX_TEXT`` characters), not the raw request, which can be megabytes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.caller import caller, query_int

MAX_TEXT = 2000
MAX_LIMIT = 100
MAX_OFFSET = 10_000  # the log is read newest first; deep pages are for export, not for a page


async def list_interactions(request: Request) -> Response:
    """A page of the caller's logged interactions: `limit` (1-100, default 20), `offset`."""
    user_id, store = caller(request)
    limit = query_int(request, "limit", 20, 1, MAX_LIMIT)
    offset = query_int(request, "offset", 0, 0, MAX_OFFSET)
    rows = await asyncio.to_thread(store.interactions, user_id=user_id, limit=offset + limit + 1)
    page = rows[offset:offset + limit]
    return JSONResponse({"object": "list", "data": [summary(r) for r in page],
                         "has_more": len(rows) > offset + limit})


def summary(row: dict[str, Any]) -> dict[str, Any]:
    """One logged interaction as the API shows it."""
    created = row["created_at"]
    return {
        "object": "interaction",
        "id": row["request_id"],
        "created_at": created.isoformat() if hasattr(created, "isoformat") else created,
        "model": row["model"],
        "provider": row["provider"],
        "stream": row["stream"],
        "status_code": row["status_code"],
        "error": row["error"],
        "latency_ms": row["latency_ms"],
        "ttft_ms": row["ttft_ms"],
        "conversation_id": row["conversation_id"],
        "usage": row["usage"],
        "prompt": _cut(_last_user_text(row["request_received"])),
        "answer": _cut(_text((row["response"] or {}).get("content"))),
    }


def _last_user_text(request: dict | None) -> str:
    for message in reversed((request or {}).get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text(message.get("content"))
    prompt = (request or {}).get("prompt")  # legacy completions
    return prompt if isinstance(prompt, str) else ""


def _text(content: object) -> str:
    """Text of an OpenAI or Anthropic content value: a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content
                        if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 1] + "…"

