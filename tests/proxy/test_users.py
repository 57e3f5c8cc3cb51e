"""Proxy keys map to users; sub-users only where the key allows; no memory crosses users."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.proxy.conftest import KEYS, PROXY_KEY, TEAM_KEY, UPSTREAM, chat_body, completion_json, running


@pytest.fixture
async def keyed(app_factory):
    async with running(app_factory(keys=KEYS)) as c:
        yield c


async def test_missing_and_wrong_keys_are_rejected(keyed):
    r = await keyed.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = await keyed.post("/v1/chat/completions", json=chat_body(), headers={"authorization": "Bearer sk-wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = await keyed.get("/v1/models", headers={"x-api-key": "sk-wrong"})
    assert r.status_code == 401
    assert (await keyed.get("/healthz")).status_code == 200  # liveness needs no key


async def test_hashed_keys_work(app_factory):
    import hashlib

    digest = hashlib.sha256(b"sk-hashed").hexdigest()
    async with running(app_factory(keys=[{"user": "bob", "key_sha256": digest}])) as c:
        assert (await c.get("/v1/models", headers={"authorization": "Bearer sk-hashed"})).status_code == 200


@pytest.mark.respx(assert_all_called=True)
async def test_each_key_sees_only_its_own_users_memories(keyed, respx_mock, store):
    store.add("alice", "The user is allergic to peanuts.", source="test")
    store.add("team/carol", "The user is allergic to shellfish.", source="test")
    route = respx_mock.post(f"{UPSTREAM}/chat/completions").mock(return_value=httpx.Response(200, json=completion_json()))

    async def injected(headers: dict, **extra) -> str:
        r = await keyed.post("/v1/chat/completions", json=chat_body("what am I allergic to?", **extra), headers=headers)
        assert r.status_code == 200, r.text
        return json.dumps(json.loads(route.calls.last.request.content)["messages"])

    alice = {"authorization": f"Bearer {PROXY_KEY}"}
    team = {"authorization": f"Bearer {TEAM_KEY}"}
    assert "peanuts" in await injected(alice) and "shellfish" not in await injected(alice)
    # alice's key has no sub-users: the `user` field is ignored, not obeyed
    assert "shellfish" not in await injected(alice, user="carol")
    assert "shellfish" in await injected(team, user="carol")
    assert "shellfish" in await injected({**team, "x-memlane-user": "carol"})
    # a team sub-user named "alice" is team/alice, not alice
    assert "peanuts" not in await injected({**team, "x-memlane-user": "alice"})


async def test_sub_user_header_needs_permission(keyed):
    r = await keyed.post("/v1/chat/completions", json=chat_body(),
                         headers={"authorization": f"Bearer {PROXY_KEY}", "x-memlane-user": "mallory"})
    assert r.status_code == 403 and r.json()["error"]["param"] == "x-memlane-user"
    r = await keyed.post("/v1/chat/completions", json=chat_body(),
                         headers={"authorization": f"Bearer {TEAM_KEY}", "x-memlane-user": "../alice"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_user"


async def test_memories_api_is_scoped_to_the_key(keyed, store):
    alice = {"authorization": f"Bearer {PROXY_KEY}"}
    r = await keyed.post("/v1/memories", json={"content": "The user likes tea."}, headers=alice)
    assert r.status_code == 201
    memory_id = r.json()["id"]
    team = {"authorization": f"Bearer {TEAM_KEY}", "x-memlane-user": "alice"}
    assert (await keyed.get("/v1/memories", headers=team)).json()["data"] == []
    assert (await keyed.delete(f"/v1/memories/{memory_id}", headers=team)).status_code == 404
    listed = (await keyed.get("/v1/memories", params={"q": "tea"}, headers=alice)).json()["data"]
    assert [m["content"] for m in listed] == ["The user likes tea."]
    assert (await keyed.delete(f"/v1/memories/{memory_id}", headers=alice)).status_code == 200
    assert store.count("alice") == 0
