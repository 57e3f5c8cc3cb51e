"""``/v1/memories``: the authenticated user's own memories (list, search, add, forget).

Scoped exactly like chat: the key picks the user, a sub-user only where the key allows it.
The CLI uses it when a server holds the database file.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from memory import MemoryEntry, entry_to_dict
from proxy.auth import USER_HEADER, resolve_user
from proxy.errors import InvalidRequest, NotFound, ServiceUnavailable
from proxy.schema import read_json
from proxy.state import AppState


def _user(request: Request, state: AppState) -> str:
    principal = state.keyring.authenticate(request.headers)
    return resolve_user(principal, body_user=request.query_params.get("user"),
                        header_user=request.headers.get(USER_HEADER))


def _store(state: AppState):  # type: ignore[no-untyped-def]
    if state.store is None:
        raise ServiceUnavailable("The memory store is unavailable.", code="memory_unavailable")
    return state.store


def as_json(memory: MemoryEntry) -> dict:
    return {"object": "memory", **entry_to_dict(memory)}


async def memories_collection(request: Request) -> Response:
    state: AppState = request.app.state.memlane
    user_id = _user(request, state)
    store = _store(state)
    if request.method == "POST":
        body = await read_json(request)
        content = body.get("content")
        if not isinstance(content, str) or not content.strip() or len(content) > 2000:
            raise InvalidRequest("'content' must be a non-empty string of at most 2000 characters.", param="content")
        memory, created = await asyncio.to_thread(store.add, user_id, content.strip(), source="api")
        return JSONResponse(as_json(memory), status_code=201 if created else 200)
    try:
        limit = min(max(int(request.query_params.get("limit", "100")), 1), 1000)
    except ValueError as exc:
        raise InvalidRequest("'limit' must be an integer.", param="limit") from exc
    query = request.query_params.get("q")
    if query:
        found = await asyncio.to_thread(store.search_text, user_id, query, k=limit)
    else:
        found = await asyncio.to_thread(store.list, user_id, limit=limit)
    return JSONResponse({"object": "list", "data": [as_json(m) for m in found]})


async def forget_memory(request: Request) -> Response:
    state: AppState = request.app.state.memlane
    user_id = _user(request, state)
    memory_id = request.path_params["memory_id"]
    if not await asyncio.to_thread(_store(state).forget, user_id, memory_id):
        raise NotFound(f"No memory '{memory_id}' for this user.", code="memory_not_found")
    return JSONResponse({"id": memory_id, "object": "memory.deleted", "deleted": True})
