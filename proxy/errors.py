"""Typed errors and the one place that renders them in OpenAI's shape (Anthropic's on ``/v1/messages``).

Every failure a client can see is a ``ProxyError`` subclass carrying its HTTP status, OpenAI
error ``type`` and ``code``. Exceptions from httpx and litellm are translated once, at the
upstream boundary (``proxy/upstream.py``), with ``raise ... from exc``. The Anthropic rendering
derives its error ``type`` from the status, unless the error carries an Anthropic upstream's own
(``anthropic_type``).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"
    anthropic_type: str | None = None  # an Anthropic upstream's own error type, kept as it said

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class AuthenticationFailed(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class RequestTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(ProxyError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamError(ProxyError):
    """The upstream answered with an error or could not be reached."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class ServiceUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


def error_response(err: ProxyError, *, request_id: str | None = None) -> Response:
    headers = dict(err.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return Response(
        json.dumps(err.body()),
        status_code=err.status,
        media_type="application/json",
        headers=headers,
    )


def sse_error_event(err: ProxyError) -> bytes:
    """After a stream has started, an error is a final ``data:`` event, never a new status."""
    return b"data: " + json.dumps(err.body()).encode() + b"\n\ndata: [DONE]\n\n"


# Anthropic's error types by status (docs.anthropic.com, "Errors"); 502 has none of its own.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_body(err: ProxyError) -> dict[str, Any]:
    kind = err.anthropic_type or _ANTHROPIC_TYPES.get(
        err.status, "invalid_request_error" if 400 <= err.status < 500 else "api_error"
    )
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def anthropic_error_response(err: ProxyError, *, request_id: str | None = None) -> Response:
    """``{"type": "error", "error": {"type", "message"}}`` with the error's status and headers."""
    headers = dict(err.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return Response(json.dumps(anthropic_body(err)), status_code=err.status, media_type="application/json",
                    headers=headers)


def anthropic_sse_error_event(err: ProxyError) -> bytes:
    """After an Anthropic stream has started, an error is a final ``event: error``."""
    return b"event: error\ndata: " + json.dumps(anthropic_body(err)).encode() + b"\n\n"
