"""Isolation: 1,012 users with overlapping memories, adversarial queries, zero cross-user results.

Every user has a locker code only they hold (a unique ``zq…`` token), a sentence all users
share, and a sentence shared by 50 users. Attackers ask for another user's exact memory text,
name the other user's id and token, send SQL-ish strings, and play with the ``user`` field,
``X-Memlane-User`` and ``?user=``. Checked on what a user could see: what the upstream received
(the injected memory block), the memories API (list, search, get/patch/delete by another user's
id), and export. A sample of attackers goes through real HTTP; a larger sample goes through the
store's own search, the call chat retrieval makes.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

import httpx
import pytest

from memory import HashEmbedder, MemoryStore, Tier
from memory.remember import build_entry, source_from_label
from proxy import create_app
from tests.e2e.fake_upstream import FakeUpstream
from tests.hardening.conftest import (
    MODEL,
    ThreadServer,
    assert_openai_error,
    settings_for,
)

TENANT_KEY, RIVAL_KEY, ALICE_KEY, BOB_KEY = "sk-tenant-7f3a", "sk-rival-19bc", "sk-alice-55d0", "sk-bob-a1e2"
KEYS = [
    {"user": "tenant", "key": TENANT_KEY, "sub_users": True},
    {"user": "rival", "key": RIVAL_KEY, "sub_users": True},
    {"user": "alice", "key": ALICE_KEY},
    {"user": "bob", "key": BOB_KEY},
]
TENANT_USERS = 1000
CITIES = [f"Town{c}" for c in "ABCDEFGHIJKLMNOPQRST"]  # each shared by 50 tenant users
HTTP_SAMPLE = 20
STORE_SAMPLE = 80
TOKEN = re.compile(r"zq\d{6}x")
CITY = re.compile(r"hiking near (Town[A-T])")


@dataclass
class Person:
    user_id: str
    token: str
    city: str
    ids: set[str] = field(default_factory=set)

    @property
    def secret(self) -> str:
        return f"The user's locker code is {self.token}."

    @property
    def contents(self) -> list[str]:
        return [self.secret, "The user likes hiking in the mountains.", f"The user likes hiking near {self.city}."]


def people() -> dict[str, Person]:
    users = [f"tenant/u{i:04d}" for i in range(TENANT_USERS)]
    users += [f"rival/u{i:04d}" for i in range(10)] + ["alice", "bob"]
    return {u: Person(u, f"zq{n:06d}x", CITIES[n % len(CITIES)]) for n, u in enumerate(users)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The populated database, memlane on a real socket in front of a fake upstream."""
    tmp = tmp_path_factory.mktemp("isolation")
    everyone = people()
    store = MemoryStore.open(tmp / "memlane.duckdb", embedder=HashEmbedder())
    origin = source_from_label("import")
    entries = []
    for person in everyone.values():
        for content in person.contents:
            entry = build_entry(store, person.user_id, content, origin, tier=Tier.LONG_TERM)
            person.ids.add(entry.id)
            entries.append(entry)
    store.insert_many(entries, store.embedder.embed([e.content for e in entries]))
    with FakeUpstream() as upstream:
        settings = settings_for(tmp, upstream.base_url, keys=KEYS, memory_min_score=0.0)
        app = create_app(settings, store=store, embedder=HashEmbedder())
        with ThreadServer(app) as server:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                yield World(everyone, store, upstream, client)
    store.close()


@dataclass
class World:
    people: dict[str, Person]
    store: MemoryStore
    upstream: FakeUpstream
    client: httpx.Client
    answered: dict[str, set[str]] = field(default_factory=dict)  # user -> request ids of their chats

    def chat(self, key: str, text: str, *, header_user: str | None = None, body_user: object = None) -> tuple[httpx.Response, str]:
        """Send one chat turn; return the response and the text memlane added on the way."""
        headers = {"authorization": f"Bearer {key}"}
        if header_user is not None:
            headers["x-memlane-user"] = header_user
        body: dict = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
        if body_user is not None:
            body["user"] = body_user
        before = len(self.upstream.state.requests)
        r = self.client.post("/v1/chat/completions", json=body, headers=headers)
        if r.status_code != 200:
            return r, ""
        self.answered.setdefault(header_user or "", set()).add(r.headers["x-request-id"])
        assert len(self.upstream.state.requests) == before + 1
        received = self.upstream.state.requests[-1]["messages"]
        added = [m for m in received if m not in body["messages"]]
        return r, json.dumps(added)

    def api(self, method: str, path: str, key: str | None, header_user: str | None = None, **kwargs) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        if header_user is not None:
            headers["x-memlane-user"] = header_user
        return self.client.request(method, path, headers=headers, **kwargs)


def assert_only(owner: Person, injected: str) -> None:
    """Every locker code and city in the injected text is the owner's own."""
    assert set(TOKEN.findall(injected)) <= {owner.token}, f"{owner.user_id} saw {TOKEN.findall(injected)}"
    assert set(CITY.findall(injected)) <= {owner.city}


def assert_own_listing(owner: Person, r: httpx.Response) -> list[dict]:
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert {m["id"] for m in data} <= owner.ids
    assert {m["user_id"] for m in data} <= {owner.user_id}
    assert_only(owner, r.text)
    return data


def attackers(world: World, n: int, offset: int) -> list[tuple[Person, Person]]:
    """(attacker, victim) pairs spread over the tenant's users; victims share the attacker's city.
    Each test takes its own `offset`: what an attacker types may become their own memory (the
    learner extracts it), so attackers are not reused across tests that compare exact sets."""
    tenant = [p for u, p in world.people.items() if u.startswith("tenant/")]
    return [(tenant[(k * 47 + offset) % len(tenant)], tenant[(k * 47 + offset + 20) % len(tenant)])
            for k in range(n)]


def adversarial_queries(victim: Person) -> list[str]:
    return [
        victim.secret,
        f"{victim.user_id} {victim.token} what is my locker code?",
        f"I am {victim.user_id.split('/')[1]}. Locker code please.",
        "' OR '1'='1' -- what is the locker code",
        f"locker'); SELECT * FROM memories WHERE user_id = '{victim.user_id}'; --",
        "%' UNION SELECT content FROM memories --",
    ]


def test_chat_injects_only_the_callers_memories(world):
    own_injected = 0
    for attacker, victim in attackers(world, HTTP_SAMPLE, offset=1):
        name = attacker.user_id.split("/")[1]
        for query in adversarial_queries(victim):
            r, injected = world.chat(TENANT_KEY, query, header_user=name, body_user=victim.user_id.split("/")[1])
            assert r.status_code == 200, r.text
            assert_only(attacker, injected)
            own_injected += attacker.token in injected
    assert own_injected >= HTTP_SAMPLE  # the control: retrieval ran and found the caller's own code


def test_user_selection_tricks(world):
    alice, bob = world.people["alice"], world.people["bob"]
    u1, u2 = world.people["tenant/u0001"], world.people["tenant/u0002"]
    # A key without sub-users: the header is refused, the body's `user` is ignored.
    r, _ = world.chat(ALICE_KEY, bob.secret, header_user="bob")
    assert r.status_code == 403 and assert_openai_error(r)["code"] == "permission_denied"
    r, injected = world.chat(ALICE_KEY, bob.secret, body_user="bob")
    assert r.status_code == 200 and alice.token in injected
    assert_only(alice, injected)
    # Path tricks in a sub-user name are refused before anything is read.
    tricks = [(n, None) for n in ("u0001/../u0002", "tenant/u0002", "../u0002", "u0002/", "u 0002")]
    tricks += [(None, n) for n in ("u0001/../u0002", "tenant/u0002", "u0002\t", "u0002\x00", "u0002\n", "x" * 129)]
    for header, body in tricks:
        r, _ = world.chat(TENANT_KEY, u2.secret, header_user=header, body_user=body)
        assert r.status_code == 400, (header, body, r.status_code)
        assert assert_openai_error(r)["code"] == "invalid_user"
    # The header wins over the body; a `user` that is not a string is refused.
    r, injected = world.chat(TENANT_KEY, u2.secret, header_user="u0001", body_user="u0002")
    assert r.status_code == 200 and u1.token in injected
    assert_only(u1, injected)
    for odd in ({"$ne": None}, ["u0002"], 2):
        r, _ = world.chat(TENANT_KEY, u2.secret, body_user=odd)
        assert r.status_code == 400 and assert_openai_error(r)["param"] == "user"
    # No user at all: the key's own user, who has no memories.
    r, injected = world.chat(TENANT_KEY, u2.secret)
    assert r.status_code == 200 and r.headers["x-memlane-memories"] == "0" and injected == "[]"
    # Another key's sub-user of the same name is a different person.
    rival0, tenant0 = world.people["rival/u0000"], world.people["tenant/u0000"]
    r, injected = world.chat(RIVAL_KEY, tenant0.secret, header_user="u0000")
    assert r.status_code == 200 and rival0.token in injected
    assert_only(rival0, injected)
    # A wrong or missing key reads nothing.
    r, _ = world.chat("sk-guess", u1.secret)
    assert r.status_code == 401 and assert_openai_error(r)


def test_memories_api_lists_and_searches_only_the_callers_memories(world):
    for attacker, victim in attackers(world, HTTP_SAMPLE, offset=2):
        name = attacker.user_id.split("/")[1]
        listed = assert_own_listing(attacker, world.api("GET", "/v1/memories", TENANT_KEY, name,
                                                         params={"limit": 1000, "include_history": "true"}))
        assert {m["id"] for m in listed} == attacker.ids
        for query in adversarial_queries(victim):
            assert_own_listing(attacker, world.api("GET", "/v1/memories", TENANT_KEY, name, params={"q": query}))
        # ?user= on a key without sub-users changes nothing.
        assert_own_listing(world.people["alice"], world.api("GET", "/v1/memories", ALICE_KEY,
                                                             params={"user": victim.user_id, "limit": 1000}))


def test_another_users_memory_by_id_is_not_found(world):
    for attacker, victim in attackers(world, HTTP_SAMPLE, offset=3):
        name = attacker.user_id.split("/")[1]
        for memory_id in sorted(victim.ids):
            for method, kwargs in (("GET", {}), ("PATCH", {"json": {"content": "owned by the attacker"}}),
                                   ("DELETE", {})):
                r = world.api(method, f"/v1/memories/{memory_id}", TENANT_KEY, name, **kwargs)
                assert r.status_code == 404, (method, r.text)
                assert assert_openai_error(r)["code"] == "memory_not_found"
                assert victim.token not in r.text
        # The victim's memories are untouched.
        assert {m.id for m in world.store.list(victim.user_id, limit=100)} == victim.ids
        assert world.store.get(victim.user_id, sorted(victim.ids)[0]).content in victim.contents


def test_export_holds_only_the_callers_memories(world):
    for attacker, _victim in attackers(world, HTTP_SAMPLE // 2, offset=4):
        r = world.api("GET", "/v1/memories/export", TENANT_KEY, attacker.user_id.split("/")[1])
        assert r.status_code == 200
        rows = [json.loads(line) for line in r.text.splitlines() if line.strip()]
        assert {row["user_id"] for row in rows if "user_id" in row} == {attacker.user_id}
        assert {row["id"] for row in rows if "id" in row} <= attacker.ids
        assert_only(attacker, r.text)
        assert attacker.token in r.text


def test_memory_page_and_its_interactions_api_show_only_the_caller(world):
    """The memory page (/ui) is static files that hold no data; what it shows comes from the
    same authenticated API (/v1/memories, tested above, and /v1/interactions)."""
    names = ("/ui", "/ui/index.html", "/ui/app.js", "/ui/style.css")
    for path in names:
        for key in (None, TENANT_KEY):
            r = world.api("GET", path, key, "u0001" if key else None, follow_redirects=True)
            assert r.status_code == 200, path
            assert not TOKEN.findall(r.text) and "tenant/" not in r.text
    pairs = attackers(world, 10, offset=6)
    for attacker, victim in pairs:
        r, _ = world.chat(TENANT_KEY, victim.secret, header_user=attacker.user_id.split("/")[1])
        assert r.status_code == 200
    deadline = time.monotonic() + 20
    for attacker, _victim in pairs:
        name = attacker.user_id.split("/")[1]
        while True:  # the learner logs interactions just after the answer
            r = world.api("GET", "/v1/interactions", TENANT_KEY, name, params={"limit": 100})
            assert r.status_code == 200
            shown = {row["id"] for row in r.json()["data"]}
            if shown == world.answered[name] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert shown == world.answered[name]
    r = world.api("GET", "/v1/interactions", ALICE_KEY, params={"user": "bob", "limit": 100})
    assert {row["id"] for row in r.json()["data"]} <= world.answered.get("", set())


def test_store_search_never_crosses_users(world):
    """The retrieval call of chat, for a wider sample, with the victim's exact text as the query."""
    embedder = world.store.embedder
    for attacker, victim in attackers(world, STORE_SAMPLE, offset=5):
        for query in (victim.secret, f"{victim.user_id} {victim.token}"):
            found = world.store.search(attacker.user_id, embedder.embed([query])[0], k=10, query=query,
                                       relations=False)
            assert {m.id for m in found} <= attacker.ids
            assert {m.user_id for m in found} <= {attacker.user_id}
