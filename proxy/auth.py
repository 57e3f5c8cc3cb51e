"""Proxy API keys -> users, and the sub-user rule.

Keys are kept as SHA-256 digests only. With no keys configured memlane runs in open mode for
one local person: any (or no) key is accepted and the user is ``default``. The OpenAI ``user``
field or an ``X-Memlane-User`` header picks a sub-user only where the key allows it, and a keyed
sub-user is namespaced under the key's user (``team/alice``) so one key can never reach the
memories of another key's users.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from proxy.errors import AuthenticationFailed, InvalidRequest, PermissionDenied
from proxy.settings import KeyConfig

OPEN_MODE_USER = "default"
USER_HEADER = "x-memlane-user"
_SUB_USER = re.compile(r"^[^\s/\x00-\x1f]{1,128}$")


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    sub_users: bool
    key_fingerprint: str | None  # first 8 hex chars of the key's digest; safe to log


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    def __init__(self, keys: Sequence[KeyConfig]) -> None:
        self._by_digest: dict[str, KeyConfig] = {}
        for k in keys:
            digest = k.key_sha256 or key_digest(k.key.get_secret_value())  # type: ignore[union-attr]
            self._by_digest[digest] = k

    @property
    def open_mode(self) -> bool:
        return not self._by_digest

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        if self.open_mode:
            return Principal(OPEN_MODE_USER, sub_users=True, key_fingerprint=None)
        presented = _presented_key(headers)
        if presented is None:
            raise AuthenticationFailed(
                "Missing API key. Send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
                code="missing_api_key",
            )
        digest = key_digest(presented)
        config = self._by_digest.get(digest)
        if config is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        return Principal(config.user, sub_users=config.sub_users, key_fingerprint=digest[:8])


def resolve_user(principal: Principal, *, body_user: object, header_user: str | None) -> str:
    """The memory owner for one request."""
    if header_user is not None:
        if not principal.sub_users:
            raise PermissionDenied(
                "This API key may not select a sub-user with X-Memlane-User.", param=USER_HEADER
            )
        return _sub_user(principal, header_user, param=USER_HEADER)
    if principal.sub_users and isinstance(body_user, str) and body_user:
        return _sub_user(principal, body_user, param="user")
    # A key without sub-users ignores `user`: apps send it for abuse tracking, not for memory.
    return principal.user_id


def _sub_user(principal: Principal, name: str, *, param: str) -> str:
    if not _SUB_USER.match(name):
        raise InvalidRequest(
            "A user id is 1-128 printable characters without spaces or '/'.", param=param, code="invalid_user"
        )
    if principal.key_fingerprint is None:  # open mode: the local person names users directly
        return name
    return f"{principal.user_id}/{name}"


def _presented_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None
