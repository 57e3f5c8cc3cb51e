"""Typed errors and the one place that renders them in OpenAI's shape.

Every failure a client can see is a ``ProxyError`` subclass carrying its HTTP status, OpenAI
error ``type`` and ``code``. Exceptions from httpx and litellm are translated once, at the
upstream boundary (``proxy/upstream.py``), with ``raise ... from exc``.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"

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
