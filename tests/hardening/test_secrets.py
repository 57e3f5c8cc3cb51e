"""Secrets never leave memlane by the side doors.

`memlane serve` (JSON logs) runs a representative set of requests carrying real-looking
credentials: the proxy key as ``Authorization: Bearer`` and as ``x-api-key``, wrong keys,
``?key=`` query parameters, and the upstream key from the environment, sent by memlane to an
upstream that quotes the request's headers back in its error bodies. Then everything the run
produced is scanned for those values: every log line (structlog JSON and whatever uvicorn wrote
to the same streams: ``memlane serve`` runs without uvicorn's access log, its own
``http_request`` event names the route, never the path or query), every teacher-log row, job
and memory in the database, ``/metrics``, and every error body and SSE error event the clients got.
"""

from __future__ import annotations

import json

import httpx
import pytest

from memory import HashEmbedder, MemoryStore
from tests.e2e.conftest import start_server
from tests.hardening.conftest import MODEL, broken_events
from tests.hardening.fault_upstream import FaultUpstream

PROXY_KEY = "sk-memlane-proj-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
WRONG_KEY = "sk-proj-WRONGwrong4c1d9e8f7a6b5c4d3e2f1a0b9c8"
QUERY_KEY = "AIzaSyQUERYkey-7h6g5f4e3d2c1b0a9z8y7x6w5v"
UPSTREAM_KEY = "sk-proj-UPSTREAMk3y-0123456789abcdefABCDEFghij"
SECRETS = {"proxy key": PROXY_KEY, "wrong key": WRONG_KEY, "query key": QUERY_KEY, "upstream key": UPSTREAM_KEY}


def _fragments(secret: str) -> list[str]:
    """The secret, and its tail: a log that shows 'sk-...ABCDEFghij' still leaks part of it."""
    return [secret, secret[-16:]]


@pytest.fixture(scope="module")
def upstream():
    with FaultUpstream(echo_headers=True) as fake:
        yield fake


def _config(fake: FaultUpstream) -> str:
    return (
        "[[keys]]\n"
        f'user = "alice"\nkey = "{PROXY_KEY}"\nsub_users = true\n'
        "[[routes]]\n"
        'match = "gpt-*"\nprovider = "openai"\n'
        f'api_base = "{fake.base_url}"\napi_key_env = "OPENAI_API_KEY"\nmodels = ["{MODEL}"]\n'
    )


def _requests(url: str) -> list[httpx.Response]:
    bearer = {"authorization": f"Bearer {PROXY_KEY}"}
    x_api_key = {"x-api-key": PROXY_KEY}

    def chat(text: str, **extra) -> dict:
        return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}

    out: list[httpx.Response] = []
    with httpx.Client(base_url=url, timeout=30) as c:
        out.append(c.post("/v1/chat/completions", json=chat("I live in Lisbon."), headers=bearer))
        out.append(c.post("/v1/chat/completions", json=chat("stream please", stream=True), headers=x_api_key))
        out.append(c.post(f"/v1/chat/completions?key={QUERY_KEY}", json=chat("hello"), headers=bearer))
        out.append(c.post(f"/v1/chat/completions?key={QUERY_KEY}", json=chat("hello")))  # no key but the query
        out.append(c.post("/v1/chat/completions", json=chat("hi"), headers={"authorization": f"Bearer {WRONG_KEY}"}))
        out.append(c.post("/v1/chat/completions", json=chat("hi"), headers={"x-api-key": WRONG_KEY}))
        out.append(c.post("/v1/chat/completions", json=chat("hi"), headers={"authorization": WRONG_KEY}))  # no scheme
        for fault in ("400", "429", "500", "503", "malformed", "reset_mid"):
            out.append(c.post("/v1/chat/completions", json=chat(f"fault:{fault}"), headers=bearer))
            out.append(c.post("/v1/chat/completions", json=chat(f"fault:{fault}", stream=True), headers=bearer))
        out.append(c.post("/v1/chat/completions", json={"model": MODEL, "messages": "not a list"}, headers=bearer))
        out.append(c.post("/v1/chat/completions", content=b"{not json", headers=bearer))
        out.append(c.post("/v1/chat/completions", json=chat("hi", model="nope-1"), headers=bearer))
        out.append(c.post("/v1/memories", json={"content": "The user likes tea."}, headers=bearer))
        out.append(c.get(f"/v1/memories?key={QUERY_KEY}&q=tea", headers=x_api_key))
        out.append(c.get("/v1/memories/does-not-exist", headers=bearer))
        out.append(c.get(f"/v1/memories?key={QUERY_KEY}", headers={"authorization": f"Bearer {WRONG_KEY}"}))
        out.append(c.get(f"/v1/models?key={QUERY_KEY}", headers=bearer))
        out.append(c.get(f"/nowhere?key={QUERY_KEY}", headers=bearer))
        out.append(c.post("/v1/embeddings", json={"model": "nope", "input": "x"}, headers=bearer))
        out.append(c.get("/metrics"))
    return out


def test_no_secret_in_logs_rows_metrics_or_error_bodies(tmp_path, upstream):
    server = start_server(tmp_path, config=_config(upstream),
                          env={"OPENAI_API_KEY": UPSTREAM_KEY, "MEMLANE_EMBEDDER": "hash",
                               "MEMLANE_PRELOAD_LOCAL_MODEL": "false", "MEMLANE_LOG_LEVEL": "debug"})
    try:
        responses = _requests(server.url)
        metrics = responses[-1].text
    finally:
        server.terminate()
    # The requests did what they should (so the scan covers real paths, not refusals only).
    statuses = [r.status_code for r in responses]
    assert statuses[:2] == [200, 200] and statuses[4:7] == [401, 401, 401]
    assert any(s == 502 for s in statuses) and any(s == 429 for s in statuses)
    assert any(h.get("authorization") == f"Bearer {UPSTREAM_KEY}" for h in (s.headers for s in upstream.seen))

    produced: dict[str, str] = {"server log": server.logs(), "metrics": metrics}
    for i, r in enumerate(responses):
        if r.status_code >= 400 or b'"error"' in r.content:
            produced[f"response {i} ({r.status_code})"] = r.text + json.dumps(dict(r.headers))
    with MemoryStore.open(server.db, embedder=HashEmbedder()) as store:
        rows = store.interactions(limit=10_000)
        produced["teacher log"] = json.dumps(rows, default=str)
        produced["jobs"] = json.dumps([j.to_dict(with_input=True) for j in store.jobs(limit=10_000)], default=str)
        produced["memories"] = json.dumps([m.content for m in store.list("alice", limit=10_000)])
    assert len(rows) >= 10 and len(produced) > 20
    assert '"event": "http_request"' in produced["server log"]
    assert any("[redacted]" in text for text in produced.values())  # the echoing upstream was caught

    leaks = [f"{name} in {where}" for where, text in produced.items()
             for name, secret in SECRETS.items() for fragment in _fragments(secret) if fragment in text]
    assert leaks == []
    assert not broken_events(server.logs())
