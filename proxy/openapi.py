"""``GET /openapi.json``: memlane's own HTTP API as an OpenAPI 3.1 document.

The chat and messages request bodies come from the pydantic models that validate them
(``proxy/schema.py``, ``proxy/anthropic_wire.py``), the memory bodies from the same limits and
enums that ``proxy/memories_api.py`` checks, so the document cannot drift from the validation.
Every route the app serves is listed: the ones described below in full, any other one (a page,
a newer endpoint) with its path, methods and path parameters, so a client or a fuzzer sees the
whole surface. The document is built once per app, on first request.
"""

from __future__ import annotations

import re
from importlib import metadata
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from memory import MemoryType, Sensitivity, Tier, TruthCategory
from proxy.anthropic_wire import CountTokensRequest, MessagesRequest
from proxy.memories_api import FORMATS, MAX_CONTENT, MAX_LABELS
from proxy.schema import ChatRequest

_REF = "#/components/schemas/{model}"
_PARAM = re.compile(r"{([^}:]+)(?::[^}]+)?}")


async def openapi(request: Request) -> Response:
    cached = getattr(request.app.state, "openapi_document", None)
    if cached is None:
        cached = request.app.state.openapi_document = openapi_document(request.app.routes)
    return JSONResponse(cached)


def openapi_document(routes: list[Any]) -> dict[str, Any]:
    schemas: dict[str, Any] = {"Error": _ERROR, "AnthropicError": _ANTHROPIC_ERROR}
    for model in (ChatRequest, MessagesRequest, CountTokensRequest):
        schemas.update(_model_schema(model))
    schemas.update(_memory_schemas())
    paths = _described_paths()
    for route in routes:
        if not isinstance(route, Route) or not route.include_in_schema:
            continue
        path = _PARAM.sub(r"{\1}", route.path)
        item = paths.setdefault(path, {})
        for method in sorted((route.methods or {"GET"}) - {"HEAD"}):
            item.setdefault(method.lower(), _generic_operation(path, method))
    return {
        "openapi": "3.1.0",
        "info": {"title": "memlane", "version": _version(),
                 "description": "A transparent OpenAI-compatible memory proxy. Errors are "
                                "{\"error\": {message, type, param, code}} (Anthropic's shape on /v1/messages)."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "A memlane proxy key."},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        }},
        "security": [{}, {"bearer": []}, {"apiKey": []}],  # no key at all in open mode
    }


def _version() -> str:
    try:
        return metadata.version("memlane")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def _model_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=_REF)
    defs = schema.pop("$defs", {})
    return {**defs, model.__name__: schema}


_ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
_ANTHROPIC_ERROR = {
    "type": "object", "required": ["type", "error"],
    "properties": {"type": {"const": "error"}, "error": {"type": "object", "required": ["type", "message"],
                                                         "properties": {"type": {"type": "string"},
                                                                        "message": {"type": "string"}}}},
}


def _memory_schemas() -> dict[str, Any]:
    labels = {"type": "array", "maxItems": MAX_LABELS,
              "items": {"type": "string", "minLength": 1, "maxLength": 100, "pattern": r"\S"}}
    enums = {"memory_type": _enum(MemoryType), "truth_category": _enum(TruthCategory),
             "sensitivity": _enum(Sensitivity)}
    content = {"type": "string", "minLength": 1, "maxLength": MAX_CONTENT, "pattern": r"\S"}
    importance = {"type": "number", "minimum": 0, "maximum": 1}
    return {
        "MemoryCreate": {"type": "object", "additionalProperties": False, "required": ["content"], "properties": {
            "content": content, "tags": labels, "domains": labels, "importance": importance, **enums}},
        "MemoryPatch": {"type": "object", "additionalProperties": False, "properties": {
            "content": content, "tags": labels, "domains": labels, "importance": importance,
            "validated": {"type": "boolean"}, "tier": _enum(Tier), **enums}},
        "Memory": {"type": "object", "required": ["object", "id", "content"], "properties": {
            "object": {"const": "memory"}, "id": {"type": "string"}, "content": {"type": "string"},
            "tier": _enum(Tier), **enums}, "additionalProperties": True},
        "Wipe": {"type": "object", "required": ["confirm"], "properties": {"confirm": {"const": True}}},
    }


def _enum(kind: Any) -> dict[str, Any]:
    return {"type": "string", "enum": [member.value for member in kind]}


def _json_body(ref: str, *, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": {"$ref": _REF.format(model=ref)}}}}


def _responses(ok: str, *, anthropic: bool = False, ok_schema: dict | None = None,
               stream: bool = False) -> dict[str, Any]:
    error = {"content": {"application/json": {"schema": {"$ref": _REF.format(
        model="AnthropicError" if anthropic else "Error")}}}}
    content: dict[str, Any] = {"application/json": {"schema": ok_schema or {"type": "object"}}}
    if stream:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    return {"200": {"description": ok, "content": content}, "4XX": {"description": "Bad request", **error},
            "5XX": {"description": "Upstream or store failure", **error}}


_USER_HEADER = {"name": "x-memlane-user", "in": "header", "required": False,
                "description": "A sub-user, where the key allows sub-users.",
                "schema": {"type": "string", "pattern": r"^[^\s/\x00-\x1f]{1,128}$"}}
_USER_QUERY = {"name": "user", "in": "query", "required": False, "schema": {"type": "string"}}


def _query(name: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, **extra}


def _described_paths() -> dict[str, Any]:
    memory_id = {"name": "memory_id", "in": "path", "required": True, "schema": {"type": "string"}}
    scoped = [_USER_HEADER, _USER_QUERY]
    memory = {"$ref": _REF.format(model="Memory")}
    fmt = _query("format", {"type": "string", "enum": list(FORMATS)})
    return {
        "/v1/chat/completions": {"post": {
            "summary": "Chat completion with the caller's memories injected (OpenAI's API).",
            "parameters": [_USER_HEADER], "requestBody": _json_body("ChatRequest"),
            "responses": _responses("A chat completion, or its SSE stream", stream=True)}},
        "/v1/messages": {"post": {
            "summary": "Anthropic's Messages API with the caller's memories in system.",
            "parameters": [_USER_HEADER, {"name": "anthropic-version", "in": "header", "required": False,
                                          "schema": {"type": "string"}}],
            "requestBody": _json_body("MessagesRequest"),
            "responses": _responses("A message, or its SSE events", anthropic=True, stream=True)}},
        "/v1/messages/count_tokens": {"post": {
            "summary": "Token count of a Messages request, forwarded.",
            "requestBody": _json_body("CountTokensRequest"), "responses": _responses("The count", anthropic=True)}},
        "/v1/embeddings": {"post": {
            "summary": "Embeddings: forwarded by route, or memlane's own for local/all-minilm-l6-v2.",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["model", "input"], "properties": {
                    "model": {"type": "string", "minLength": 1},
                    "input": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                                        {"type": "array", "items": {"type": "integer"}}]},
                    "encoding_format": {"type": "string", "enum": ["float", "base64"]},
                    "dimensions": {"type": "integer", "minimum": 1}}}}}},
            "responses": _responses("The embeddings")}},
        "/v1/completions": {"post": {
            "summary": "Legacy text completions, forwarded by route without memory.",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["model", "prompt"], "properties": {
                    "model": {"type": "string", "minLength": 1},
                    "prompt": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                    "stream": {"type": "boolean"}}}}}},
            "responses": _responses("A completion, or its SSE stream", stream=True)}},
        "/v1/models": {"get": {"summary": "The models this memlane serves.", "responses": _responses("A list")}},
        "/v1/memories": {
            "get": {"summary": "List the caller's memories, or search them with q.", "parameters": [
                *scoped, _query("q", {"type": "string"}), _query("limit", {"type": "integer"}),
                _query("offset", {"type": "integer"}), _query("include_history", {"type": "boolean"}),
                _query("min_score", {"type": "number"}),
                _query("tier", {"type": "array", "items": _enum(Tier)}, style="form", explode=True),
                _query("domain", {"type": "array", "items": {"type": "string"}}, style="form", explode=True)],
                "responses": _responses("A list of memories")},
            "post": {"summary": "Add a memory (dedup, corroboration and supersession applied).",
                     "parameters": scoped, "requestBody": _json_body("MemoryCreate"),
                     "responses": {**_responses("An existing memory corroborated", ok_schema=memory),
                                   "201": {"description": "Created",
                                           "content": {"application/json": {"schema": memory}}}}}},
        "/v1/memories/export": {"get": {"summary": "The caller's memories as a JSONL or Parquet file.",
                                        "parameters": [*scoped, fmt], "responses": {
                                            "200": {"description": "The file", "content": {
                                                media: {"schema": {"type": "string"}} for media in FORMATS.values()}},
                                            **{k: v for k, v in _responses("").items() if k != "200"}}}},
        "/v1/memories/import": {"post": {"summary": "Import an export file (the body) into the caller's memories.",
                                         "parameters": [*scoped, fmt], "requestBody": {"required": True, "content": {
                                             media: {"schema": {"type": "string", "format": "binary"}}
                                             for media in FORMATS.values()}},
                                         "responses": _responses("What was imported")}},
        "/v1/memories/wipe": {"post": {"summary": "Delete all of the caller's memories and logged interactions.",
                                       "parameters": scoped, "requestBody": _json_body("Wipe"),
                                       "responses": _responses("What was deleted")}},
        "/v1/memories/{memory_id}": {
            "get": {"summary": "One memory.", "parameters": [*scoped, memory_id],
                    "responses": _responses("The memory", ok_schema=memory)},
            "patch": {"summary": "Change fields of one memory.", "parameters": [*scoped, memory_id],
                      "requestBody": _json_body("MemoryPatch"), "responses": _responses("The memory", ok_schema=memory)},
            "delete": {"summary": "Forget one memory, and what was derived from it, for good.",
                       "parameters": [*scoped, memory_id], "responses": _responses("Deleted")}},
        "/healthz": {"get": {"summary": "Liveness.", "security": [{}], "responses": _responses("Alive")}},
        "/readyz": {"get": {"summary": "Readiness: 503 until the store and models are ready.", "security": [{}],
                            "responses": _responses("Ready")}},
        "/metrics": {"get": {"summary": "Prometheus metrics.", "security": [{}], "responses": {
            "200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"summary": "This document.", "security": [{}], "responses": {
            "200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
    }


def _generic_operation(path: str, method: str) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": f"{method} {path}",
        "parameters": [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                       for name in _PARAM.findall(path)],
        "responses": {"default": {"description": "See the HTTP API documentation."}},
    }
    if method in ("POST", "PUT", "PATCH"):
        operation["requestBody"] = {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}}
    return operation
