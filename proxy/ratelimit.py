"""Per-key request rate limits: one token bucket per proxy key.

A bucket holds up to ``burst`` tokens and refills at ``rpm / 60`` tokens a second; a request
takes one token, and a request that finds the bucket empty is refused with an OpenAI-shaped 429
whose ``retry-after`` says when the next token arrives. Buckets exist only for keys that
authenticated, so their number is bounded by the configured keys.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.errors import RateLimited


@dataclass(frozen=True, slots=True)
class Limit:
    rpm: int  # requests a minute, sustained
    burst: int  # requests that may come at once after a quiet spell

    @classmethod
    def of(cls, rpm: int, burst: int | None) -> Limit:
        return cls(rpm, burst if burst is not None else rpm)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, default: Limit | None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.default = default if default is not None and default.rpm > 0 else None
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def check(self, bucket_id: str, limit: Limit | None = None) -> None:
        """Take one token from ``bucket_id``'s bucket, or raise ``RateLimited``."""
        limit = limit if limit is not None else self.default
        if limit is None or limit.rpm <= 0:
            return
        rate = limit.rpm / 60.0  # tokens a second
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(bucket_id)
            if bucket is None:
                bucket = self._buckets[bucket_id] = _Bucket(float(limit.burst), now)
            bucket.tokens = min(float(limit.burst), bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return
            wait_s = (1.0 - bucket.tokens) / rate
        raise RateLimited(
            f"Rate limit reached for this API key: {limit.rpm} requests per minute (burst {limit.burst}). "
            f"Try again in {wait_s:.1f}s.",
            headers={
                "retry-after": str(max(1, math.ceil(wait_s))),
                "retry-after-ms": str(max(1, math.ceil(wait_s * 1000))),
                "x-ratelimit-limit-requests": str(limit.rpm),
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": f"{wait_s:.3f}s",
            },
        )
