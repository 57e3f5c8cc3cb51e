"""GET /v1/interactions: the caller's own log only, newest first, paginated, readable summaries."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from memory import InteractionRecord
from tests.proxy.conftest import KEYS, PROXY_KEY, TEAM_KEY, running

ALICE = {"authorization": f"Bearer {PROXY_KEY}"}
BOB = {"authorization": f"Bearer {TEAM_KEY}", "x-memlane-user": "bob"}
START = datetime(2026, 11, 1, 12, 0, 0)


def record(n: int, user_id: str, text: str, **extra) -> InteractionRecord:
    fields = {
        "request_id": f"req-{user_id}-{n}", "user_id": user_id, "created_at": START + timedelta(minutes=n),
        "model": "gpt-4o-mini", "provider": "openai", "stream": False, "status_code": 200, "error": None,
        "request_received": {"model": "gpt-4o-mini", "messages": [
            {"role": "system", "content": "be brief"}, {"role": "user", "content": text}]},
        "request_sent": None, "response": {"role": "assistant", "content": f"You said: {text}"},
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}, "latency_ms": 12.5,
        "ttft_ms": None,
    }
    return InteractionRecord(**{**fields, **extra})


@pytest.fixture
async def api(app_factory, store):
    store.log_interactions([record(n, "alice", f"alice question {n}") for n in range(25)])
    store.log_interactions([record(0, "team/bob", "bob question"),
                            record(1, "team/carol", "carol question"),
                            record(2, "team/bob", [{"type": "text", "text": "parts"}, {"type": "image_url"}],
                                   status_code=502, error="upstream_error", response=None)])
    async with running(app_factory(keys=KEYS)) as c:
        yield c


async def test_own_rows_newest_first_in_pages(api):
    first = (await api.get("/v1/interactions", headers=ALICE)).json()
    assert first["object"] == "list" and first["has_more"] is True
    assert [i["prompt"] for i in first["data"]] == [f"alice question {n}" for n in range(24, 4, -1)]
    row = first["data"][0]
    assert row["object"] == "interaction" and row["id"] == "req-alice-24"
    assert row["answer"] == "You said: alice question 24" and row["status_code"] == 200
    assert row["created_at"].startswith("2026-11-01T12:24") and row["usage"]["total_tokens"] == 7
    assert "user_id" not in row and "request_received" not in row

    rest = (await api.get("/v1/interactions?limit=20&offset=20", headers=ALICE)).json()
    assert [i["prompt"] for i in rest["data"]] == [f"alice question {n}" for n in range(4, -1, -1)]
    assert rest["has_more"] is False


async def test_never_another_users_rows(api):
    alice = (await api.get("/v1/interactions?limit=100", headers=ALICE)).json()["data"]
    assert all(i["prompt"].startswith("alice") for i in alice) and len(alice) == 25
    bob = (await api.get("/v1/interactions?user=alice", headers=BOB)).json()["data"]  # header wins: team/bob
    assert [i["prompt"] for i in bob] == ["parts", "bob question"]
    assert bob[0]["status_code"] == 502 and bob[0]["error"] == "upstream_error" and bob[0]["answer"] == ""
    # alice's key may not pick a sub-user; the team key's sub-users are namespaced under it
    r = await api.get("/v1/interactions", headers={**ALICE, "x-memlane-user": "bob"})
    assert r.status_code == 403


@pytest.mark.parametrize("query, param", [("limit=0", "limit"), ("limit=101", "limit"),
                                          ("offset=-1", "offset"), ("limit=ten", "limit")])
async def test_bad_paging_is_an_openai_error(api, query, param):
    r = await api.get(f"/v1/interactions?{query}", headers=ALICE)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == "invalid_value"


async def test_needs_a_key(api):
    r = await api.get("/v1/interactions")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"


async def test_ui_files_are_served_with_a_strict_policy(api):
    page = await api.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/ui/app.js"' in page.text
    script = await api.get("/ui/app.js")
    assert script.headers["content-type"].startswith("text/javascript") and "innerHTML" not in script.text
    assert (await api.get("/ui/style.css")).status_code == 200
    missing = await api.get("/ui/../proxy/app.py")
    assert missing.status_code == 404
    assert (await api.get("/ui/secrets.txt")).json()["error"]["code"] == "unknown_url"
