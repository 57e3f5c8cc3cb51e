"""Who is asking, and the query parameters every user-scoped endpoint reads the same way.

The key picks the user; a sub-user (``X-Memlane-User`` or ``?user=``) only where the key allows
it (``proxy.auth.resolve_user``). No endpoint takes a parameter that names another user.
"""

from __future__ import annotations

from starlette.requests import Request

from memory import MemoryStore
from proxy.auth import USER_HEADER, resolve_user
from proxy.errors import InvalidRequest, ServiceUnavailable
from proxy.state import AppState


def caller_user(request: Request) -> str:
    """The user a request acts for; 401 without a valid key."""
    state: AppState = request.app.state.memlane
    principal = state.keyring.authenticate(request.headers)
    return resolve_user(principal, body_user=request.query_params.get("user"),
                        header_user=request.headers.get(USER_HEADER))


def caller(request: Request) -> tuple[str, MemoryStore]:
    """The user a request acts for and the open store; 503 when the store could not be opened."""
    user_id = caller_user(request)
    store = request.app.state.memlane.store
    if store is None:
        raise ServiceUnavailable("The memory store is unavailable.", code="memory_unavailable")
    return user_id, store


def invalid_value(name: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid value for '{name}': expected {what}.", param=name, code="invalid_value")


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter in [low, high]; a 400 naming it otherwise."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise invalid_value(name, f"an integer from {low} to {high}")
    return value
