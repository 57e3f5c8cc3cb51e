"""/v1/memories: every endpoint, scoped to the caller's user, with OpenAI-shaped errors."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest

from tests.proxy.conftest import KEYS, PROXY_KEY, TEAM_KEY, running

ALICE = {"authorization": f"Bearer {PROXY_KEY}"}
BOB = {"authorization": f"Bearer {TEAM_KEY}", "x-memlane-user": "bob"}


@pytest.fixture
async def api(app_factory):
    async with running(app_factory(keys=KEYS)) as c:
        yield c


async def add(api, content: str, headers=ALICE, **fields) -> dict:
    r = await api.post("/v1/memories", json={"content": content, **fields}, headers=headers)
    assert r.status_code in (200, 201), r.text
    return r.json()


def assert_error(r, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


async def test_add_says_whether_it_created_corroborated_or_superseded(api):
    r = await api.post("/v1/memories", json={"content": "The user lives in Paris.", "tags": ["home"],
                                             "domains": ["life"], "importance": 0.9}, headers=ALICE)
    assert r.status_code == 201
    paris = r.json()
    assert paris["object"] == "memory" and paris["action"] == "created"
    assert "home" in paris["tags"] and paris["domains"] == ["life"] and paris["importance"] == 0.9

    r = await api.post("/v1/memories", json={"content": "the user lives in paris"}, headers=ALICE)
    assert r.status_code == 200 and r.json()["action"] == "corroborated" and r.json()["id"] == paris["id"]

    berlin = await add(api, "The user lives in Berlin.", memory_type="EVENT", truth_category="ABSOLUTE")
    assert berlin["action"] == "superseded" and berlin["supersedes"] == paris["id"]
    assert (berlin["memory_type"], berlin["truth_category"]) == ("EVENT", "ABSOLUTE")


async def test_list_pages_filters_by_tier_and_shows_history_when_asked(api):
    paris = await add(api, "The user lives in Paris.")
    await add(api, "The user lives in Berlin.")
    await add(api, "The user likes tea.")
    r = await api.get("/v1/memories", headers=ALICE)
    listed = r.json()
    assert listed["object"] == "list" and listed["has_more"] is False
    assert [m["content"] for m in listed["data"]] == ["The user likes tea.", "The user lives in Berlin."]

    page = (await api.get("/v1/memories", params={"limit": 1, "offset": 1}, headers=ALICE)).json()
    assert [m["content"] for m in page["data"]] == ["The user lives in Berlin."] and page["has_more"] is False
    assert (await api.get("/v1/memories", params={"limit": 1}, headers=ALICE)).json()["has_more"] is True

    history = (await api.get("/v1/memories", params={"include_history": "true"}, headers=ALICE)).json()["data"]
    assert paris["id"] in [m["id"] for m in history]
    tier = listed["data"][0]["tier"]
    filtered = (await api.get("/v1/memories", params={"tier": tier}, headers=ALICE)).json()["data"]
    assert filtered and all(m["tier"] == tier for m in filtered)
    other = "SHORT_TERM" if tier != "SHORT_TERM" else "PERSISTENT"
    assert (await api.get("/v1/memories", params={"tier": other}, headers=ALICE)).json()["data"] == []


async def test_search_explains_each_score(api):
    tea = await add(api, "The user drinks green tea every morning.", domains=["food"])
    await add(api, "The user's dog is called Biscuit.")
    r = await api.get("/v1/memories", params={"q": "green tea", "limit": 1}, headers=ALICE)
    (found,) = r.json()["data"]
    assert found["id"] == tea["id"]
    parts = found["score"]
    assert {"total", "vector", "text", "recency", "importance", "confidence", "frequency", "tier", "link"} <= set(parts)
    assert 0 < parts["vector"] <= 1 and parts["total"] > 0
    in_domain = await api.get("/v1/memories", params={"q": "green tea", "domain": "pets"}, headers=ALICE)
    assert in_domain.json()["data"] == []


async def test_get_and_patch_one_memory(api, store):
    tea = await add(api, "The user likes tea.")
    r = await api.get(f"/v1/memories/{tea['id']}", headers=ALICE)
    assert r.status_code == 200 and r.json()["content"] == "The user likes tea."

    r = await api.patch(f"/v1/memories/{tea['id']}", headers=ALICE, json={
        "content": "The user likes coffee.", "tags": ["drinks"], "domains": ["food"], "importance": 0.2,
        "validated": False, "tier": "PERSISTENT", "memory_type": "PREFERENCE", "truth_category": "OPINION",
    })
    assert r.status_code == 200, r.text
    patched = r.json()
    assert (patched["content"], patched["tags"], patched["domains"], patched["importance"], patched["validated"],
            patched["tier"], patched["memory_type"], patched["truth_category"]) == (
        "The user likes coffee.", ["drinks"], ["food"], 0.2, False, "PERSISTENT", "PREFERENCE", "OPINION")
    assert patched["content_hash"] != tea["content_hash"]
    store.refresh_text_index()
    found = (await api.get("/v1/memories", params={"q": "coffee", "limit": 1}, headers=ALICE)).json()["data"]
    assert [m["id"] for m in found] == [tea["id"]]
    assert (await api.get(f"/v1/memories/{tea['id']}", headers=ALICE)).json() == patched


async def test_patch_to_the_content_of_another_memory_is_a_conflict(api):
    tea = await add(api, "The user likes tea.")
    await add(api, "The user likes coffee.")
    r = await api.patch(f"/v1/memories/{tea['id']}", json={"content": "The user likes coffee."}, headers=ALICE)
    assert assert_error(r, 409, "content")["code"] == "memory_exists"


async def test_delete_removes_the_memory_and_those_derived_from_it(api, store):
    tea = await add(api, "The user drinks green tea.")
    derived, _ = store.add("alice", "The user likes hot drinks.", derived_from=[tea["id"]])
    r = await api.delete(f"/v1/memories/{tea['id']}", headers=ALICE)
    assert r.status_code == 200
    assert r.json() == {"id": tea["id"], "object": "memory.deleted", "deleted": True, "derived": [derived.id]}
    assert store.count("alice") == 0
    assert_error(await api.get(f"/v1/memories/{derived.id}", headers=ALICE), 404)
    assert_error(await api.delete(f"/v1/memories/{tea['id']}", headers=ALICE), 404)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
async def test_export_and_import_round_trip(api, store, fmt):
    await add(api, "The user lives in Paris.")
    await add(api, "The user lives in Berlin.")
    await add(api, "The user likes tea.", tags=["drinks"])
    r = await api.get("/v1/memories/export", params={"format": fmt}, headers=ALICE)
    assert r.status_code == 200
    assert f"memlane-memories.{fmt}" in r.headers["content-disposition"]
    if fmt == "jsonl":
        assert r.headers["content-type"].startswith("application/x-ndjson")
        records = [json.loads(line) for line in r.text.splitlines()]
    else:
        records = pq.read_table(io.BytesIO(r.content)).to_pylist()
    assert sorted(rec["content"] for rec in records) == [
        "The user likes tea.", "The user lives in Berlin.", "The user lives in Paris."]

    again = await api.post("/v1/memories/import", params={"format": fmt}, content=r.content, headers=ALICE)
    assert again.json() == {"object": "memory.import", "imported": 0, "skipped": 3, "links": 0}

    # into an emptied user, without naming the format: everything comes back, history too
    assert (await api.post("/v1/memories/wipe", json={"confirm": True}, headers=ALICE)).status_code == 200
    restored = await api.post("/v1/memories/import", content=r.content, headers=ALICE)
    assert restored.status_code == 200 and restored.json()["imported"] == 3 and restored.json()["links"] == 2
    second = await api.get("/v1/memories/export", params={"format": fmt}, headers=ALICE)
    assert second.content == r.content


async def test_wipe_needs_confirmation_and_removes_memories_and_interactions(api, store):
    await add(api, "The user likes tea.")
    assert_error(await api.post("/v1/memories/wipe", json={}, headers=ALICE), 400, "confirm")
    assert store.count("alice") == 1
    r = await api.post("/v1/memories/wipe", json={"confirm": True}, headers=ALICE)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "user.wiped" and body["user"] == "alice" and body["deleted"]["memories"] == 1
    assert (await api.get("/v1/memories", params={"include_history": "true"}, headers=ALICE)).json()["data"] == []


async def test_every_endpoint_is_scoped_to_the_caller(api, store):
    tea = await add(api, "The user drinks green tea.")
    mine = await add(api, "The user's dog is called Rex.", headers=BOB)

    for method, kw in (("GET", {}), ("PATCH", {"json": {"importance": 1.0}}), ("DELETE", {})):
        r = await api.request(method, f"/v1/memories/{tea['id']}", headers=BOB, **kw)
        assert assert_error(r, 404)["code"] == "memory_not_found"
    listed = (await api.get("/v1/memories", params={"include_history": "true"}, headers=BOB)).json()["data"]
    assert [m["id"] for m in listed] == [mine["id"]]
    found = (await api.get("/v1/memories", params={"q": "green tea"}, headers=BOB)).json()["data"]
    assert tea["id"] not in [m["id"] for m in found]
    exported = (await api.get("/v1/memories/export", headers=BOB)).text
    assert "green tea" not in exported and "Rex" in exported

    # alice's export imported by bob becomes bob's own copy; alice's memory is untouched
    alices = (await api.get("/v1/memories/export", headers=ALICE)).content
    assert (await api.post("/v1/memories/import", content=alices, headers=BOB)).json()["imported"] == 1
    copy = [m for m in (await api.get("/v1/memories", headers=BOB)).json()["data"] if "green tea" in m["content"]]
    assert len(copy) == 1 and copy[0]["id"] != tea["id"] and copy[0]["user_id"] == "team/bob"

    assert (await api.post("/v1/memories/wipe", json={"confirm": True}, headers=BOB)).status_code == 200
    assert store.count("team/bob") == 0
    assert (await api.get(f"/v1/memories/{tea['id']}", headers=ALICE)).json()["importance"] == tea["importance"]
    assert store.count("alice") == 1


@pytest.mark.parametrize(
    ("method", "path", "kw", "param"),
    [
        ("POST", "/v1/memories", {"json": {"content": ""}}, "content"),
        ("POST", "/v1/memories", {"json": {"tags": ["x"]}}, "content"),
        ("POST", "/v1/memories", {"json": {"content": "x" * 2001}}, "content"),
        ("POST", "/v1/memories", {"json": {"content": "ok", "importance": 2}}, "importance"),
        ("POST", "/v1/memories", {"json": {"content": "ok", "memory_type": "GOSSIP"}}, "memory_type"),
        ("POST", "/v1/memories", {"json": {"content": "ok", "tags": "food"}}, "tags"),
        ("POST", "/v1/memories", {"json": {"content": "ok", "colour": "red"}}, "colour"),
        ("GET", "/v1/memories", {"params": {"limit": "lots"}}, "limit"),
        ("GET", "/v1/memories", {"params": {"limit": "0"}}, "limit"),
        ("GET", "/v1/memories", {"params": {"tier": "MEDIUM_TERM"}}, "tier"),
        ("GET", "/v1/memories", {"params": {"include_history": "maybe"}}, "include_history"),
        ("GET", "/v1/memories", {"params": {"q": " "}}, "q"),
        ("GET", "/v1/memories", {"params": {"q": "tea", "min_score": "high"}}, "min_score"),
        ("PATCH", "/v1/memories/{id}", {"json": {"validated": "yes"}}, "validated"),
        ("PATCH", "/v1/memories/{id}", {"json": {"tier": "FOREVER"}}, "tier"),
        ("PATCH", "/v1/memories/{id}", {"json": {"truth_category": 1}}, "truth_category"),
        ("PATCH", "/v1/memories/{id}", {"json": {"id": "new"}}, "id"),
        ("GET", "/v1/memories/export", {"params": {"format": "csv"}}, "format"),
        ("POST", "/v1/memories/import", {"params": {"format": "xml"}, "content": b"{}"}, "format"),
    ],
)
async def test_bad_input_is_an_openai_shaped_400_naming_the_parameter(api, store, method, path, kw, param):
    tea = await add(api, "The user likes tea.")
    r = await api.request(method, path.replace("{id}", tea["id"]), headers=ALICE, **kw)
    assert assert_error(r, 400, param)["type"] == "invalid_request_error"
    assert store.get("alice", tea["id"]).content == "The user likes tea."


async def test_a_file_that_is_not_an_export_is_refused(api, store):
    r = await api.post("/v1/memories/import", content=b'{"content": "hello"}\n', headers=ALICE)
    assert assert_error(r, 400)["code"] == "invalid_file"
    r = await api.post("/v1/memories/import", params={"format": "parquet"}, content=b"not parquet", headers=ALICE)
    assert assert_error(r, 400)["code"] == "invalid_file"
    assert_error(await api.post("/v1/memories/import", content=b"", headers=ALICE), 400)
    assert store.count("alice") == 0


async def test_without_a_key_every_endpoint_is_refused(api):
    for method, path in (("GET", "/v1/memories"), ("GET", "/v1/memories/x"), ("PATCH", "/v1/memories/x"),
                         ("DELETE", "/v1/memories/x"), ("GET", "/v1/memories/export"),
                         ("POST", "/v1/memories/import"), ("POST", "/v1/memories/wipe")):
        assert_error(await api.request(method, path), 401)
