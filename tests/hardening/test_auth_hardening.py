"""Proxy keys: stored hashed (sha256 or scrypt), compared in constant time, rate-limited per key
with OpenAI-shaped 429s that say when to retry."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import json
import time

import httpx
import pytest
from typer.testing import CliRunner

from memory import HashEmbedder, MemoryStore
from proxy import Settings, create_app
from proxy.auth import KeyRing, hash_key
from proxy.cli import app as cli_app
from proxy.errors import ProxyError, RateLimited
from proxy.ratelimit import Limit, RateLimiter
from proxy.settings import SettingsError
from tests.hardening.conftest import ThreadServer
from tests.proxy.conftest import ENV, make_settings, running

PLAIN = "sk-memlane-plain-7f3a9c"


@pytest.fixture
def store(tmp_path):
    s = MemoryStore.open(tmp_path / "memlane.duckdb", embedder=HashEmbedder())
    yield s
    s.close()


def _app(tmp_path, store, **overrides):
    return create_app(make_settings(tmp_path, **overrides), store=store, embedder=HashEmbedder())


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_a_plain_key_is_hashed_at_load_and_not_kept():
    env = {**ENV, "MEMLANE_KEYS": json.dumps([{"user": "alice", "key": PLAIN}])}
    settings = Settings.from_env(env)
    (config,) = settings.keys
    assert config.key_hash == "sha256:" + hashlib.sha256(PLAIN.encode()).hexdigest()
    assert PLAIN not in settings.model_dump_json() and PLAIN not in repr(settings)
    ring = KeyRing(settings.keys)
    held = repr(vars(ring)) + repr(ring._sha256)
    assert PLAIN not in held and PLAIN.encode() not in held.encode()
    assert ring.authenticate(_bearer(PLAIN)).user_id == "alice"


@pytest.mark.parametrize("entry", [
    {"key_sha256": hashlib.sha256(PLAIN.encode()).hexdigest().upper()},
    {"key_hash": "sha256:" + hashlib.sha256(PLAIN.encode()).hexdigest()},
    {"key_hash": hash_key(PLAIN)},  # scrypt
])
def test_each_hash_form_authenticates_its_key_only(entry):
    ring = KeyRing(Settings.from_env(ENV, keys=[{"user": "bob", **entry}]).keys)
    assert ring.authenticate(_bearer(PLAIN)).user_id == "bob"
    assert ring.authenticate({"x-api-key": PLAIN}).user_id == "bob"
    for wrong in (PLAIN[:-1], PLAIN + "x", PLAIN.upper(), "sk-other"):
        with pytest.raises(ProxyError) as caught:
            ring.authenticate(_bearer(wrong))
        assert caught.value.status == 401


@pytest.mark.parametrize(("entry", "named"), [
    ({"key_hash": "md5:abc"}, "keys.0.key_hash"),
    ({"key_hash": "scrypt:16384:8:1:zz:00"}, "keys.0.key_hash"),
    ({"key": PLAIN, "key_hash": hash_key(PLAIN, algorithm="sha256")}, "exactly one"),
    ({}, "exactly one"),
])
def test_bad_key_configuration_fails_at_start_up(entry, named):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(ENV, keys=[{"user": "bob", **entry}])
    assert named in str(caught.value)
    assert PLAIN not in str(caught.value)  # the error never echoes a key


def test_a_verified_scrypt_key_is_not_rehashed_on_every_request():
    ring = KeyRing(Settings.from_env(ENV, keys=[{"user": "bob", "key_hash": hash_key(PLAIN)}]).keys)
    started = time.perf_counter()
    ring.authenticate(_bearer(PLAIN))
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(50):
        ring.authenticate(_bearer(PLAIN))
    fifty = time.perf_counter() - started
    assert first > 0.005  # scrypt's cost, once
    assert fifty < first * 10  # 50 scrypt checks would take ~50x the first


async def test_a_scrypt_check_does_not_hold_up_other_requests(tmp_path, store):
    """A new key's scrypt check runs on a worker thread: memlane (on a loopback socket) answers
    /healthz many times while it runs, and no wait spans most of it; on the event loop the check
    held every request up for its full cost (one wait as long as the check, a handful answered).
    The bound is the check's own duration in this run, not a fixed figure: on a busy two-core
    machine a single /healthz can stall for a scheduling slice (0.23 s seen once in CI) while
    the check, competing for the same cores, takes twice its quiet cost."""
    n, salt = 2**16, b"memlane-test-salt"  # 4x the default cost, so the check is long enough to watch
    started = time.perf_counter()
    derived = hashlib.scrypt(PLAIN.encode(), salt=salt, n=n, r=8, p=1, dklen=32, maxmem=256 * 1024 * 1024)
    hash_s = time.perf_counter() - started
    key_hash = f"scrypt:{n}:8:1:{salt.hex()}:{derived.hex()}"
    app = _app(tmp_path, store, keys=[{"user": "dana", "key_hash": key_hash}])
    with contextlib.ExitStack() as stack, ThreadServer(app) as server:
        gc.disable()  # a full collection of this process (pytest, the server thread) pauses as long as a check
        stack.callback(gc.enable)
        async with httpx.AsyncClient(base_url=server.url, trust_env=False) as c:
            for key, status in ((PLAIN, 200), ("sk-wrong-key", 401)):
                check_started = time.perf_counter()
                checking = asyncio.ensure_future(c.get("/v1/models", headers=_bearer(key)))
                waits = []
                while not checking.done():
                    started = time.perf_counter()
                    assert (await c.get("/healthz")).status_code == 200
                    waits.append(time.perf_counter() - started)
                assert (await checking).status_code == status
                check_s = time.perf_counter() - check_started
                assert check_s >= hash_s / 2, (key, check_s, hash_s)  # the check did run, at about its cost
                assert len(waits) >= 5, (key, len(waits), check_s)
                stalled = [(i, round(w, 3)) for i, w in enumerate(waits) if w >= hash_s / 2]
                assert sum(w for _, w in stalled) < check_s * 0.6, (key, len(waits), stalled, check_s)
            remembered = []  # the key's answer is remembered now: no request pays for a check again
            for _ in range(5):
                started = time.perf_counter()
                assert (await c.get("/v1/models", headers=_bearer(PLAIN))).status_code == 200
                remembered.append(time.perf_counter() - started)
            assert sorted(remembered)[2] < hash_s / 2, (remembered, hash_s)


def test_keys_are_compared_in_constant_time_without_early_exit(monkeypatch):
    configs = [{"user": f"user{i}", "key": f"sk-key-{i}"} for i in range(5)]
    ring = KeyRing(Settings.from_env(ENV, keys=configs).keys)
    calls = []
    compare = hmac.compare_digest

    def counting(a, b):
        calls.append(1)
        return compare(a, b)

    monkeypatch.setattr("proxy.auth.hmac.compare_digest", counting)
    for presented in ("sk-key-0", "sk-key-4", "sk-nope"):
        calls.clear()
        try:
            ring.authenticate(_bearer(presented))
        except ProxyError as err:
            assert err.status == 401
        assert len(calls) == 5, presented  # every configured hash is compared, hit or miss


def test_token_bucket_refills_at_the_configured_rate():
    now = [100.0]
    limiter = RateLimiter(Limit.of(60, 2), clock=lambda: now[0])  # one token a second, burst 2
    limiter.check("k")
    limiter.check("k")
    with pytest.raises(RateLimited) as caught:
        limiter.check("k")
    assert caught.value.headers["retry-after"] == "1"
    limiter.check("other")  # buckets are per key
    now[0] += 0.5
    with pytest.raises(RateLimited):
        limiter.check("k")
    now[0] += 0.5
    limiter.check("k")
    now[0] += 3600  # a long quiet spell refills to the burst, no more
    limiter.check("k")
    limiter.check("k")
    with pytest.raises(RateLimited):
        limiter.check("k")


async def test_rate_limited_keys_get_openai_shaped_429s_with_retry_after(tmp_path, store):
    keys = [{"user": "alice", "key": PLAIN}, {"user": "bob", "key": "sk-bob", "rate_limit_rpm": 0}]
    app = _app(tmp_path, store, keys=keys, rate_limit_rpm=600, rate_limit_burst=2)  # a token every 0.1 s
    async with running(app) as c:
        assert [(await c.get("/v1/models", headers=_bearer(PLAIN))).status_code for _ in range(2)] == [200, 200]
        r = await c.get("/v1/models", headers=_bearer(PLAIN))
        assert r.status_code == 429
        assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "rate_limit_error",
                                      "param": None, "code": "rate_limit_exceeded"}}
        assert "600 requests per minute" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) >= 1 and r.headers["x-ratelimit-remaining-requests"] == "0"
        assert r.headers["x-request-id"]
        # memories and chat share the key's bucket; another key (here unlimited) does not
        assert (await c.get("/v1/memories", headers=_bearer(PLAIN))).status_code == 429
        assert all([(await c.get("/v1/models", headers=_bearer("sk-bob"))).status_code == 200 for _ in range(5)])
        # a wrong key is a 401, not a 429, and does not use the bucket
        assert (await c.get("/v1/models", headers=_bearer("sk-wrong"))).status_code == 401
        await asyncio.sleep(float(r.headers["retry-after-ms"]) / 1000 + 0.05)
        assert (await c.get("/v1/models", headers=_bearer(PLAIN))).status_code == 200


async def test_messages_429_is_anthropic_shaped(tmp_path, store):
    body = {"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"type": "message", "content": []}))
    async with httpx.AsyncClient(transport=transport) as upstream:
        app = create_app(make_settings(tmp_path, keys=[{"user": "alice", "key": PLAIN}], rate_limit_rpm=1,
                                       rate_limit_burst=1), store=store, embedder=HashEmbedder(),
                         http_client=upstream)
        async with running(app) as c:
            assert (await c.post("/v1/messages", json=body, headers={"x-api-key": PLAIN})).status_code == 200
            r = await c.post("/v1/messages", json=body, headers={"x-api-key": PLAIN})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 59
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "rate_limit_error"


def test_cli_prints_a_hash_that_authenticates():
    result = CliRunner().invoke(cli_app, ["keys", "hash", "--stdin"], input=PLAIN + "\n")
    assert result.exit_code == 0, result.output
    printed = result.output.strip().splitlines()[-1]
    assert printed.startswith("scrypt:16384:8:1:") and PLAIN not in result.output
    ring = KeyRing(Settings.from_env(ENV, keys=[{"user": "carol", "key_hash": printed}]).keys)
    assert ring.authenticate(_bearer(PLAIN)).user_id == "carol"
    sha = CliRunner().invoke(cli_app, ["keys", "hash", "--stdin", "--algorithm", "sha256"], input=PLAIN + "\n")
    assert sha.output.strip() == "sha256:" + hashlib.sha256(PLAIN.encode()).hexdigest()
    bad = CliRunner().invoke(cli_app, ["keys", "hash", "--stdin", "--algorithm", "md5"], input=PLAIN + "\n")
    assert bad.exit_code != 0
