"""Proxy API keys -> users, per-key rate limits, and the sub-user rule.

Keys are kept as hashes only (``sha256:`` or ``scrypt:``, see ``KeyConfig``): a plain key in the
configuration is hashed while the settings load. A presented key is hashed and compared with
every configured hash in constant time (``hmac.compare_digest``, no early exit). A scrypt hash
costs ~40 ms to check, so a key that matched one is remembered by its SHA-256 for the life of
the process, and a few thousand recent misses are remembered too. That check runs on a worker
thread (``KeyCheckMiddleware``), never on the event loop, where it would hold up every other
request; the routes' own ``authenticate`` then finds the answer remembered. With no keys configured memlane
runs in open mode for one local person: any (or no) key is accepted and the user is ``default``.
The OpenAI ``user`` field or an ``X-Memlane-User`` header picks a sub-user only where the key
allows it, and a keyed sub-user is namespaced under the key's user (``team/alice``) so one key
can never reach the memories of another key's users.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.errors import AuthenticationFailed, InvalidRequest, PermissionDenied
from proxy.ratelimit import Limit, RateLimiter
from proxy.settings import KeyConfig

OPEN_MODE_USER = "default"
USER_HEADER = "x-memlane-user"
_SUB_USER = re.compile(r"^[^\s/\x00-\x1f]{1,128}$")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # the interactive-login parameters of the scrypt paper
_MAX_REMEMBERED_MISSES = 4096
# scrypt checks at once: each holds 128 * r * n bytes (16 MiB at the defaults) and a core.
_HASHING_THREADS = 2


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    sub_users: bool
    key_fingerprint: str | None  # first 8 hex chars of the key's digest; safe to log


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def hash_key(key: str, *, algorithm: str = "scrypt") -> str:
    """The ``key_hash`` to configure for ``key`` (what ``memlane keys hash`` prints)."""
    if algorithm == "sha256":
        return f"sha256:{key_digest(key)}"
    if algorithm != "scrypt":
        raise ValueError(f"unknown key hash algorithm {algorithm!r}; use scrypt or sha256")
    salt = secrets.token_bytes(16)
    derived = _scrypt(key, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt:{SCRYPT_N}:{SCRYPT_R}:{SCRYPT_P}:{salt.hex()}:{derived.hex()}"


def _scrypt(key: str, salt: bytes, n: int, r: int, p: int, length: int = 32) -> bytes:
    return hashlib.scrypt(key.encode(), salt=salt, n=n, r=r, p=p, dklen=length, maxmem=256 * 1024 * 1024)


@dataclass(frozen=True, slots=True)
class _Scrypt:
    n: int
    r: int
    p: int
    salt: bytes
    derived: bytes

    @classmethod
    def parse(cls, text: str) -> _Scrypt:
        _, n, r, p, salt, derived = text.split(":")
        if int(n) < 2 or int(n) & (int(n) - 1) or not 1 <= int(r) <= 64 or not 1 <= int(p) <= 16:
            raise ValueError("scrypt key hash: n must be a power of two, r 1-64, p 1-16")
        return cls(int(n), int(r), int(p), bytes.fromhex(salt), bytes.fromhex(derived))

    def matches(self, key: str) -> bool:
        return hmac.compare_digest(_scrypt(key, self.salt, self.n, self.r, self.p, len(self.derived)), self.derived)


class KeyRing:
    def __init__(self, keys: Sequence[KeyConfig], *, limiter: RateLimiter | None = None) -> None:
        self._sha256: list[tuple[bytes, KeyConfig]] = []
        self._scrypt: list[tuple[_Scrypt, KeyConfig]] = []
        for k in keys:
            algorithm, _, rest = k.key_hash.partition(":")
            if algorithm == "sha256":
                self._sha256.append((bytes.fromhex(rest), k))
            else:
                self._scrypt.append((_Scrypt.parse(k.key_hash), k))
        self._limiter = limiter or RateLimiter(None)
        self._verified: list[tuple[bytes, KeyConfig]] = []  # SHA-256 of keys that matched a scrypt hash
        self._misses: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        self._hasher = concurrent.futures.ThreadPoolExecutor(_HASHING_THREADS, thread_name_prefix="memlane-keycheck")

    @property
    def open_mode(self) -> bool:
        return not (self._sha256 or self._scrypt)

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """The caller's principal, after its rate limit; raises 401 or 429 (``RateLimited``)."""
        if self.open_mode:
            self._limiter.check("open")
            return Principal(OPEN_MODE_USER, sub_users=True, key_fingerprint=None)
        presented = _presented_key(headers)
        if presented is None:
            raise AuthenticationFailed(
                "Missing API key. Send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
                code="missing_api_key",
            )
        digest = hashlib.sha256(presented.encode()).digest()
        config = _find(digest, self._sha256) or self._scrypt_match(presented, digest)
        if config is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        limit = Limit.of(config.rate_limit_rpm, config.rate_limit_burst) if config.rate_limit_rpm is not None else None
        self._limiter.check(config.key_hash, limit)
        return Principal(config.user, sub_users=config.sub_users, key_fingerprint=digest.hex()[:8])

    async def check_off_loop(self, headers: Mapping[str, str]) -> None:
        """Run the presented key's scrypt check on a worker thread and remember its answer, so
        that ``authenticate`` (synchronous, called by every route) does not hash on the event loop.

        The pool is memlane's own, not asyncio's default one: a burst of new (or wrong) keys
        queues there instead of taking the threads that memory retrieval runs on. Nothing is
        raised here; ``authenticate`` answers 401 or 429 as before.
        """
        presented = _presented_key(headers) if self._scrypt else None
        if presented is None:
            return
        digest = hashlib.sha256(presented.encode()).digest()
        if _find(digest, self._sha256) is not None or self._remembered(digest):
            return
        await asyncio.get_running_loop().run_in_executor(self._hasher, self._scrypt_match, presented, digest)

    def _remembered(self, digest: bytes) -> bool:
        with self._lock:
            return _find(digest, self._verified) is not None or digest in self._misses

    def _scrypt_match(self, presented: str, digest: bytes) -> KeyConfig | None:
        if not self._scrypt:
            return None
        with self._lock:
            known = _find(digest, self._verified)
            if known is not None or digest in self._misses:
                return known
        found = None
        for hashed, config in self._scrypt:  # every hash is checked: the time does not say which matched
            if hashed.matches(presented) and found is None:
                found = config
        with self._lock:
            if found is not None:
                self._verified.append((digest, found))
            else:
                self._misses[digest] = None
                if len(self._misses) > _MAX_REMEMBERED_MISSES:
                    self._misses.popitem(last=False)
        return found


class KeyCheckMiddleware:
    """Pure ASGI middleware: checks a new key against the scrypt hashes off the event loop before
    the route runs (``KeyRing.check_off_loop``). Streams and disconnects pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope.get("app") if scope["type"] == "http" else None
        state = getattr(getattr(app, "state", None), "memlane", None)  # None until the lifespan built it
        if state is not None:
            await state.keyring.check_off_loop(Headers(scope=scope))
        await self.app(scope, receive, send)


def _find(digest: bytes, table: Sequence[tuple[bytes, KeyConfig]]) -> KeyConfig | None:
    """The config whose digest equals ``digest``, comparing with every entry in constant time."""
    found = None
    for candidate, config in table:
        if hmac.compare_digest(candidate, digest) and found is None:
            found = config
    return found


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
    if not _SUB_USER.fullmatch(name):  # not match: its `$` also matches before a final newline
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
