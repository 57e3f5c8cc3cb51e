"""Every failure a client can see is OpenAI-shaped, with the right status and a request id."""

from __future__ import annotations

import httpx
import pytest

from tests.proxy.conftest import UPSTREAM, chat_body, running


def assert_openai_error(r: httpx.Response, status: int, *, code: str | None = None, param: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    assert r.headers["x-request-id"]
    return err


async def test_malformed_json(client):
    r = await client.post("/v1/chat/completions", content=b'{"model": "gpt-4o-mini", "messages": [',
                          headers={"content-type": "application/json"})
    assert_openai_error(r, 400, code="invalid_json")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e999", "-2.5E+400"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens"])
async def test_nan_and_infinity_are_not_json_numbers(client, path, constant):
    """Python's json reads them; forwarding them failed re-encoding (a 500, found by the fuzzer)."""
    body = ('{"model": "gpt-4o-mini", "max_tokens": 5, "temperature": %s, '
            '"messages": [{"role": "user", "content": "hi"}]}' % constant)
    r = await client.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert constant in r.text


async def test_body_that_is_not_an_object(client):
    assert_openai_error(await client.post("/v1/chat/completions", json=[1, 2]), 400, code="invalid_json")
    assert_openai_error(await client.post("/v1/chat/completions", content=b""), 400, code="invalid_json")


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model", "missing_required_parameter"),
        ({"model": "gpt-4o-mini"}, "messages", "missing_required_parameter"),
        ({"model": "gpt-4o-mini", "messages": "hello"}, "messages", "invalid_value"),
        ({"model": "gpt-4o-mini", "messages": []}, "messages", "invalid_value"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "invalid_value"),
        ({"model": 42, "messages": [{"role": "user", "content": "x"}]}, "model", "invalid_value"),
        ({**chat_body(), "temperature": 7}, "temperature", "invalid_value"),
        ({**chat_body(), "stream": "yes please"}, "stream", "invalid_value"),
    ],
)
async def test_missing_or_wrong_fields(client, body, param, code):
    assert_openai_error(await client.post("/v1/chat/completions", json=body), 400, code=code, param=param)


async def test_unknown_model(client):
    r = await client.post("/v1/chat/completions", json={**chat_body(), "model": "llama-9000"})
    assert_openai_error(r, 404, code="model_not_found", param="model")


async def test_request_too_large_by_content_length_and_by_stream(app_factory):
    async with running(app_factory(max_request_bytes=1000)) as c:
        big = chat_body("x" * 5000)
        assert_openai_error(await c.post("/v1/chat/completions", json=big), 413, code="request_too_large")

        async def chunked():
            yield b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "'
            for _ in range(20):
                yield b"y" * 100
            yield b'"}]}'

        r = await c.post("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
        assert_openai_error(r, 413, code="request_too_large")


async def test_unknown_path_and_wrong_method(client):
    assert_openai_error(await client.get("/v1/nothing-here"), 404, code="unknown_url")
    assert_openai_error(await client.get("/v1/chat/completions"), 405)


@pytest.mark.respx(assert_all_called=True)
async def test_upstream_429_forwards_retry_after(client, respx_mock):
    respx_mock.post(f"{UPSTREAM}/chat/completions").mock(return_value=httpx.Response(
        429, json={"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded",
                             "param": None}}, headers={"retry-after": "7"}))
    r = await client.post("/v1/chat/completions", json=chat_body())
    err = assert_openai_error(r, 429, code="rate_limit_exceeded")
    assert err["type"] == "rate_limit_error" and "Rate limit reached" in err["message"]
    assert r.headers["retry-after"] == "7"


@pytest.mark.respx(assert_all_called=True)
@pytest.mark.parametrize(("upstream_status", "status", "code"), [
    (500, 502, "upstream_error"), (503, 502, "upstream_error"), (401, 502, "upstream_auth_failed"),
])
async def test_upstream_failures_map_to_gateway_errors(client, respx_mock, upstream_status, status, code):
    respx_mock.post(f"{UPSTREAM}/chat/completions").mock(return_value=httpx.Response(upstream_status, text="boom"))
    assert_openai_error(await client.post("/v1/chat/completions", json=chat_body()), status, code=code)


@pytest.mark.respx(assert_all_called=True)
async def test_upstream_400_keeps_status_and_message(client, respx_mock):
    respx_mock.post(f"{UPSTREAM}/chat/completions").mock(return_value=httpx.Response(
        400, json={"error": {"message": "max_tokens is too large", "type": "invalid_request_error",
                             "param": "max_tokens", "code": None}}))
    err = assert_openai_error(await client.post("/v1/chat/completions", json=chat_body()), 400, param="max_tokens")
    assert err["message"] == "max_tokens is too large"


@pytest.mark.respx(assert_all_called=True)
@pytest.mark.parametrize(("exc", "status", "code"), [
    (httpx.ConnectTimeout, 504, "upstream_timeout"), (httpx.ReadTimeout, 504, "upstream_timeout"),
    (httpx.ConnectError, 502, "upstream_error"),
])
async def test_upstream_network_failures(client, respx_mock, exc, status, code):
    respx_mock.post(f"{UPSTREAM}/chat/completions").mock(side_effect=exc)
    r = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert_openai_error(r, status, code=code)


@pytest.mark.respx(assert_all_called=True)
async def test_stream_that_breaks_midway_ends_with_an_error_event(client, respx_mock):
    async def broken():
        yield b'data: {"choices":[{"index":0,"delta":{"content":"par"},"finish_reason":null}]}\n\n'
        raise httpx.ReadError("connection reset")

    respx_mock.post(f"{UPSTREAM}/chat/completions").mock(
        return_value=httpx.Response(200, content=broken(), headers={"content-type": "text/event-stream"}))
    r = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert r.status_code == 200
    events = [line for line in r.text.split("\n\n") if line]
    assert '"content":"par"' in events[0]
    assert '"error"' in events[-2] and '"upstream_error"' in events[-2]
    assert events[-1] == "data: [DONE]"


async def test_every_response_has_its_own_request_id(client):
    ids = {(await client.get(path)).headers["x-request-id"] for path in ("/healthz", "/metrics", "/v1/models", "/nope")}
    # a client's own id cannot make two requests share one (it keys the teacher log)
    ids |= {(await client.get("/healthz", headers={"x-request-id": "trace-1234abcd"})).headers["x-request-id"]
            for _ in range(2)}
    assert len(ids) == 6 and all(i.startswith("req_") for i in ids)
