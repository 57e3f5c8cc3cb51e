"""schemathesis against memlane's own OpenAPI document (``GET /openapi.json``), in process over
ASGI, with fake upstreams that always answer well: any 5xx is memlane's own, and fails the test.
Errors must be OpenAI-shaped (Anthropic-shaped on ``/v1/messages``).

``MEMLANE_FUZZ_OPENAPI_EXAMPLES`` sets the examples per operation (default 12: ~1,300 cases, CI-sized;
the 10,000-case run and its command are in docs/reliability.md). ``MEMLANE_FUZZ_REPORT=<file>``
appends the number of cases sent, per operation and per status.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from memory import HashEmbedder, MemoryStore
from proxy import create_app
from proxy.openapi import openapi_document
from tests.hardening.test_fuzz_bodies import FarSide
from tests.hardening.test_injection import RecordingUpstream
from tests.proxy.conftest import ROUTES, make_settings, running

EXAMPLES = int(os.environ.get("MEMLANE_FUZZ_OPENAPI_EXAMPLES", "12"))
CASES: Counter[str] = Counter()
STATUSES: Counter[int] = Counter()


@pytest.fixture(scope="module")
def memlane_app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz-openapi")
    store = MemoryStore.open(tmp / "memlane.duckdb", embedder=HashEmbedder())
    store.add("default", "The user lives in Oslo.", source="api")
    far_side = httpx.AsyncClient(transport=httpx.MockTransport(FarSide()))
    app = create_app(make_settings(tmp, routes=ROUTES), store=store, embedder=HashEmbedder(),
                     upstreams={p: RecordingUpstream(p) for p in ("openai", "anthropic", "ollama")},
                     http_client=far_side)
    yield app
    store.close()
    _report()


# The routes are known before any app runs: the schema is made from an app that is never started,
# and every case is sent to the running one (`memlane_app`), whose /openapi.json must match it.
@schemathesis.serializer("application/x-ndjson", "application/vnd.apache.parquet")
def _raw_file(ctx, value) -> bytes:
    """Import bodies are files: whatever was generated, as bytes."""
    if isinstance(value, bytes):
        return value
    return (value if isinstance(value, str) else json.dumps(value)).encode("utf-8", "surrogatepass")


schema = schemathesis.openapi.from_dict(openapi_document(
    create_app(make_settings(Path(tempfile.gettempdir()) / "unused", routes=ROUTES)).routes))


def error_is_shaped(ctx, response, case) -> None:
    """A 4xx body is {"error": {message, type, param, code}}, or Anthropic's on /v1/messages."""
    CASES[f"{case.method} {case.path}"] += 1
    STATUSES[response.status_code] += 1
    if not 400 <= response.status_code < 500 or case.path in ("/ui", "/ui/", "/ui/{name}"):
        return
    body = json.loads(response.content)
    if case.path.startswith("/v1/messages"):
        assert body.get("type") == "error" and {"type", "message"} <= set(body["error"]), (response.status_code, body)
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}, (response.status_code, body)


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_operation_answers_with_a_server_error(case, memlane_app):
    response = case.call(app=memlane_app)
    case.validate_response(response, checks=[not_a_server_error, error_is_shaped])


async def test_the_document_lists_every_route_of_the_app(memlane_app):
    async with running(memlane_app) as client:
        document = (await client.get("/openapi.json")).json()
    assert document == json.loads(json.dumps(schema.raw_schema))
    served = {(re.sub(r"{([^}:]+)(?::[^}]+)?}", r"{\1}", route.path), method.lower())
              for route in memlane_app.routes for method in (getattr(route, "methods", None) or ()) - {"HEAD"}}
    listed = {(path, method) for path, item in document["paths"].items() for method in item}
    assert served <= listed, served - listed
    chat = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert chat["schema"]["$ref"] == "#/components/schemas/ChatRequest"
    assert "messages" in document["components"]["schemas"]["ChatRequest"]["required"]
    assert document["components"]["schemas"]["MemoryCreate"]["properties"]["sensitivity"]["enum"] == [
        "none", "personal", "health", "finance", "credentials"]


def _report() -> None:
    path = os.environ.get("MEMLANE_FUZZ_REPORT")
    if not path:
        return
    with open(path, "a") as out:
        out.write(json.dumps({"examples_per_operation": EXAMPLES, "cases": sum(CASES.values()),
                              "operations": len(CASES), "per_operation": dict(CASES),
                              "statuses": {str(k): v for k, v in sorted(STATUSES.items())}}) + "\n")
