"""``/v1/memories``: the authenticated user's own memories.

List, search (``?q=``), get, add, patch, delete, export, import, and wipe. Scoped exactly like
chat: the key picks the user, a sub-user only where the key allows it; another user's memory
is a 404. The CLI uses these routes when a server holds the database file, and shares the
request validation below (`parse_new`, `parse_changes`) in its direct mode.
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
from enum import StrEnum
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from memory import (
    DuplicateContentError,
    ImportFormatError,
    MemoryEntry,
    MemoryStore,
    MemoryType,
    Sensitivity,
    Tier,
    TruthCategory,
    edit_memory,
    entry_to_dict,
    export_jsonl,
    export_parquet,
    import_jsonl,
    import_parquet,
)
from proxy.caller import caller, invalid_value, query_int
from proxy.errors import InvalidRequest, NotFound, ProxyError
from proxy.schema import read_json

MAX_CONTENT = 2000
MAX_LABELS = 64  # tags or domains on one memory
FORMATS = {"jsonl": "application/x-ndjson", "parquet": "application/vnd.apache.parquet"}
_EDITABLE = ("content", "tags", "domains", "importance", "validated", "tier", "memory_type", "truth_category",
             "sensitivity")
_NEW = ("content", "tags", "domains", "importance", "memory_type", "truth_category", "sensitivity")


# -- validation, shared with the CLI ---------------------------------------------------


def parse_new(body: dict[str, Any]) -> dict[str, Any]:
    """The fields of a new memory (`content` required), typed; InvalidRequest names the bad one."""
    if "content" not in body:
        raise InvalidRequest("Missing required parameter: 'content'.", param="content",
                             code="missing_required_parameter")
    return _parse(body, _NEW)


def parse_changes(body: dict[str, Any]) -> dict[str, Any]:
    """The fields a PATCH changes, typed; InvalidRequest names the bad one."""
    return _parse(body, _EDITABLE)


def _parse(body: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    for name in body:
        if name not in allowed:
            raise InvalidRequest(f"Unrecognized parameter: '{name}'. Allowed: {', '.join(allowed)}.",
                                 param=name, code="unknown_parameter")
    out: dict[str, Any] = {}
    for name, value in body.items():
        if name == "content":
            if not isinstance(value, str) or not value.strip() or len(value) > MAX_CONTENT:
                raise invalid_value(name, f"a non-empty string of at most {MAX_CONTENT} characters")
            out[name] = value.strip()
        elif name in ("tags", "domains"):
            if (not isinstance(value, list) or len(value) > MAX_LABELS
                    or not all(isinstance(v, str) and 0 < len(v.strip()) <= 100 for v in value)):
                raise invalid_value(name, f"a list of at most {MAX_LABELS} non-empty strings")
            out[name] = [v.strip() for v in value]
        elif name == "importance":
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise invalid_value(name, "a number from 0 to 1")
            out[name] = float(value)
        elif name == "validated":
            if not isinstance(value, bool):
                raise invalid_value(name, "true or false")
            out[name] = value
        else:
            out[name] = _enum(name, value, {"tier": Tier, "memory_type": MemoryType,
                                            "truth_category": TruthCategory, "sensitivity": Sensitivity}[name])
    return out


def label_memory(store: MemoryStore, user_id: str, memory: MemoryEntry | None,
                 sensitivity: Sensitivity | None) -> MemoryEntry | None:
    """``memory`` with its sensitivity label set (the egress policy reads it); None stays None."""
    if memory is None or sensitivity is None or memory.sensitivity == sensitivity:
        return memory
    store.update_entry(user_id, memory.id, sensitivity=sensitivity.value)
    return store.get(user_id, memory.id)


def _enum(name: str, value: object, kind: type[StrEnum]) -> Any:
    try:
        return kind(value)
    except ValueError as exc:
        raise invalid_value(name, f"one of {', '.join(kind)}") from exc


# -- request plumbing ------------------------------------------------------------------


def _bool(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise invalid_value(name, "true or false")
    return raw in ("true", "1")


def _format(request: Request, default: str | None = "jsonl") -> str | None:
    fmt = request.query_params.get("format", default)
    if fmt is not None and fmt not in FORMATS:
        raise invalid_value("format", "jsonl or parquet")
    return fmt


def _not_found(memory_id: str) -> NotFound:
    return NotFound(f"No memory '{memory_id}' for this user.", code="memory_not_found")


def as_json(memory: MemoryEntry, **extra: Any) -> dict:
    return {"object": "memory", **entry_to_dict(memory), **extra}


def action_of(memory: MemoryEntry, created: bool) -> str:
    """What adding did: "created", "corroborated" (an existing memory), or "superseded"
    (created, replacing an older memory that contradicted it)."""
    if not created:
        return "corroborated"
    return "superseded" if memory.supersedes else "created"


# -- handlers --------------------------------------------------------------------------


async def memories_collection(request: Request) -> Response:
    """GET: list, or search with `q`. POST: add."""
    user_id, store = caller(request)
    if request.method == "POST":
        fields = parse_new(await read_json(request))
        content, sensitivity = fields.pop("content"), fields.pop("sensitivity", None)
        memory, created = await asyncio.to_thread(store.add, user_id, content, source="api", **fields)
        memory = await asyncio.to_thread(label_memory, store, user_id, memory, sensitivity)
        return JSONResponse(as_json(memory, action=action_of(memory, created)), status_code=201 if created else 200)
    query = request.query_params.get("q")
    if query is not None:
        return await _search(request, user_id, store, query)
    tiers = request.query_params.getlist("tier")
    if len(tiers) > 1:
        raise invalid_value("tier", "a single tier when listing")
    limit = query_int(request, "limit", 100, 1, 1000)
    found = await asyncio.to_thread(
        store.list, user_id, limit=limit + 1, offset=query_int(request, "offset", 0, 0, 10**9),
        tier=_enum("tier", tiers[0], Tier) if tiers else None,
        include_history=_bool(request, "include_history"),
    )
    return JSONResponse({"object": "list", "data": [as_json(m) for m in found[:limit]],
                         "has_more": len(found) > limit})


async def _search(request: Request, user_id: str, store: MemoryStore, query: str) -> Response:
    if not query.strip() or len(query) > MAX_CONTENT:
        raise invalid_value("q", f"a non-empty string of at most {MAX_CONTENT} characters")
    tiers = [_enum("tier", t, Tier) for t in request.query_params.getlist("tier")]
    domains = request.query_params.getlist("domain")
    try:
        min_score = float(request.query_params.get("min_score", "0"))
    except ValueError:
        min_score = -1.0
    if not 0 <= min_score <= 1:
        raise invalid_value("min_score", "a number from 0 to 1")
    found = await asyncio.to_thread(
        store.search_text, user_id, query, k=query_int(request, "limit", 10, 1, 100), min_score=min_score,
        tiers=tiers or None, domains=domains or None, touch=False,  # looking does not count as use
    )
    return JSONResponse({"object": "list", "data": [as_json(m) for m in found], "has_more": False})


async def memory_item(request: Request) -> Response:
    """GET, PATCH or DELETE /v1/memories/{memory_id}."""
    user_id, store = caller(request)
    memory_id = request.path_params["memory_id"]
    if request.method == "GET":
        memory = await asyncio.to_thread(store.get, user_id, memory_id)
    elif request.method == "PATCH":
        changes = parse_changes(await read_json(request))
        sensitivity = changes.pop("sensitivity", None)
        try:
            memory = await asyncio.to_thread(edit_memory, store, user_id, memory_id, **changes)
        except DuplicateContentError as exc:
            raise ProxyError(f"Memory '{exc.existing_id}' already holds this content.", status=409,
                             param="content", code="memory_exists") from exc
        memory = await asyncio.to_thread(label_memory, store, user_id, memory, sensitivity)
    else:
        deleted = await asyncio.to_thread(store.delete_entries, user_id, [memory_id])
        if not deleted:
            raise _not_found(memory_id)
        return JSONResponse({"id": memory_id, "object": "memory.deleted", "deleted": True,
                             "derived": [i for i in deleted if i != memory_id]})
    if memory is None:
        raise _not_found(memory_id)
    return JSONResponse(as_json(memory))


async def export_memories(request: Request) -> Response:
    """The caller's memories, history included, as a JSONL or Parquet file."""
    user_id, store = caller(request)
    fmt = _format(request)
    fd, path = tempfile.mkstemp(prefix="memlane-export-", suffix=f".{fmt}")
    os.close(fd)
    try:
        await asyncio.to_thread(export_jsonl if fmt == "jsonl" else export_parquet, store, user_id, path)
    except BaseException:
        os.unlink(path)
        raise
    return FileResponse(path, media_type=FORMATS[fmt or "jsonl"], filename=f"memlane-memories.{fmt}",
                        background=BackgroundTask(os.unlink, path))


async def import_memories(request: Request) -> Response:
    """Import a JSONL or Parquet export (the request body) into the caller's memories."""
    user_id, store = caller(request)
    raw = await request.body()
    fmt = _format(request, default=None) or ("parquet" if raw.startswith(b"PAR1") else "jsonl")
    if not raw.strip():
        raise InvalidRequest("The request body is empty; send an exported file.", code="invalid_file")
    reader = import_jsonl if fmt == "jsonl" else import_parquet
    try:
        report = await asyncio.to_thread(reader, store, user_id, io.BytesIO(raw))
    except (ImportFormatError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"This is not a memlane {fmt} export: {exc}", code="invalid_file") from exc
    return JSONResponse({"object": "memory.import", "imported": report.imported,
                         "skipped": report.skipped, "links": report.links})


async def wipe_memories(request: Request) -> Response:
    """Delete everything memlane holds for the caller: memories and logged interactions."""
    user_id, store = caller(request)
    body = await read_json(request)
    if body.get("confirm") is not True:
        raise InvalidRequest("Wiping deletes all of this user's memories and logged interactions for "
                             "good; send {\"confirm\": true}.", param="confirm", code="confirmation_required")
    counts = await asyncio.to_thread(store.wipe_user, user_id)
    return JSONResponse({"object": "user.wiped", "user": user_id, "deleted": counts})
