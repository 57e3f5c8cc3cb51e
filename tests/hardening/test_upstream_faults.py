"""Upstream faults, from a raw-socket upstream on loopback, through memlane on a real socket.

Every fault ends in an OpenAI-shaped error (a status before the stream starts, a final ``data:``
error event after), within the configured timeouts; memlane makes exactly one upstream attempt
(it does not retry, so it can never retry after bytes reached the client); and a client that
hangs up makes memlane hang up on the upstream.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.hardening.conftest import assert_openai_error, chat, serving, settings_for
from tests.hardening.fault_upstream import BlackHole, FaultUpstream

TIMEOUT_S = 1.0  # memlane's upstream read timeout in these tests
CONNECT_TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def upstream():
    with FaultUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def memlane(tmp_path_factory, upstream):
    settings = settings_for(tmp_path_factory.mktemp("faults"), upstream.base_url,
                            upstream_timeout_s=TIMEOUT_S, upstream_connect_timeout_s=CONNECT_TIMEOUT_S)
    with serving(settings) as server:
        yield server


def post(memlane, body: dict, timeout: float = 10) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    r = httpx.post(f"{memlane.url}/v1/chat/completions", json=body, timeout=timeout)
    return r, time.perf_counter() - started


def events(text: str) -> list[dict | str]:
    out: list[dict | str] = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            try:
                out.append(json.loads(data))
            except ValueError:
                out.append(data)
    return out


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("fault,status,code", [
    ("429", 429, None),
    ("500", 502, "upstream_error"),
    ("502", 502, "upstream_error"),
    ("503", 502, "upstream_error"),
    ("529", 502, "upstream_error"),
    ("reset_headers", 502, "upstream_error"),
    ("stall_headers", 504, "upstream_timeout"),
])
def test_fault_before_the_first_byte_is_an_error_status(memlane, upstream, fault, status, code, stream):
    before = upstream.attempts(fault)
    r, elapsed = post(memlane, chat(f"fault:{fault} please", stream=stream))
    assert r.status_code == status
    error = assert_openai_error(r)
    if code:
        assert error["code"] == code
    assert r.headers["x-request-id"].startswith("req_")
    # Only a connection that failed before any response is tried again (upstream_retries=1).
    assert upstream.attempts(fault) - before == (2 if fault == "reset_headers" else 1)
    assert elapsed < TIMEOUT_S + 2
    if fault == "429":
        assert r.headers["retry-after"] == "7"
        assert error["type"] == "rate_limit_error"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_connection_dropped_before_any_response_is_retried_once(memlane, upstream, stream):
    before = upstream.attempts("reset_once")
    r, _ = post(memlane, chat("fault:reset_once", stream=stream))
    assert r.status_code == 200
    assert "ok reset_once" in r.text or "one two" in "".join(
        e["choices"][0]["delta"].get("content", "") for e in events(r.text) if isinstance(e, dict))
    assert upstream.attempts("reset_once") - before == 2


def test_connect_timeout_is_a_504_within_the_connect_timeout(tmp_path):
    with BlackHole() as hole:
        settings = settings_for(tmp_path, hole.base_url, upstream_timeout_s=30,
                                upstream_connect_timeout_s=CONNECT_TIMEOUT_S)
        with serving(settings) as server:
            r, elapsed = post(server, chat("hello"))
    assert r.status_code == 504 and assert_openai_error(r)["code"] == "upstream_timeout"
    assert elapsed < CONNECT_TIMEOUT_S + 2


def test_malformed_json_from_the_upstream_is_a_502(memlane, upstream):
    r, _ = post(memlane, chat("fault:malformed"))
    assert r.status_code == 502
    assert assert_openai_error(r)["code"] == "upstream_malformed_response"
    assert upstream.attempts("malformed") == 1


@pytest.mark.parametrize("fault,code", [
    ("reset_mid", "upstream_error"),
    ("stall_mid", "upstream_timeout"),
    ("truncated", "upstream_truncated"),
])
def test_fault_mid_stream_ends_with_an_error_event(memlane, upstream, fault, code):
    r, elapsed = post(memlane, chat(f"fault:{fault}", stream=True))
    assert r.status_code == 200  # the status went out with the first bytes
    got = events(r.text)
    words = "".join(e["choices"][0]["delta"].get("content", "") for e in got
                    if isinstance(e, dict) and "choices" in e)
    assert words == "one two "  # what arrived before the fault reached the client unchanged
    errors = [e for e in got if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["code"] == code
    assert set(errors[0]["error"]) == {"message", "type", "param", "code"}
    assert got[-1] == "[DONE]"
    assert upstream.attempts(fault) == 1  # nothing retried after bytes reached the client
    assert elapsed < TIMEOUT_S + 3


def test_client_hanging_up_mid_stream_closes_the_upstream_call(memlane, upstream):
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", f"{memlane.url}/v1/chat/completions", json=chat("fault:hang", stream=True)) as r:
            assert r.status_code == 200
            first = next(r.iter_raw())
            assert b"one" in first
    assert upstream.last("hang").disconnected.wait(3), "the upstream call kept running after the client left"


def test_client_giving_up_before_the_answer_closes_the_upstream_call(tmp_path, upstream):
    settings = settings_for(tmp_path, upstream.base_url, upstream_timeout_s=60)
    with serving(settings) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/chat/completions", json=chat("fault:stall_headers wait"), timeout=0.5)
        seen = upstream.last("stall_headers")
        assert seen.disconnected.wait(3), "the upstream call kept running after the client left"
