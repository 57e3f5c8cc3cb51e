"""The upstream connection pool, split into small shards.

httpcore's pool looks at every connection it holds each time a request starts or ends, and asks
each idle one whether it has expired (through anyio's extra attributes and a ``poll`` of its
socket). With 64 requests in flight that scan was about a fifth of memlane's CPU per request:
measured here with py-spy under a closed loop of 64 clients against a fake upstream, the
event-loop thread spent 1.6 ms of CPU per proxied chat completion with one pool, 1.2 ms with 32.

``ShardedTransport`` keeps the one ``httpx.AsyncClient`` the rest of memlane shares, and puts
several ordinary ``httpx.AsyncHTTPTransport`` pools behind it. Each request goes to the shard
with the fewest requests in flight (the next one in turn on a tie), so connections are reused as
before but each scan covers a few connections instead of all of them. A request counts as in
flight until its response body is closed, so a long stream keeps its shard busy.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import httpx

__all__ = ["ShardedTransport"]


class ShardedTransport(httpx.AsyncBaseTransport):
    def __init__(self, shards: Sequence[httpx.AsyncBaseTransport]) -> None:
        if not shards:
            raise ValueError("at least one shard is needed")
        self._shards = list(shards)
        self._in_flight = [0] * len(self._shards)
        self._turn = itertools.cycle(range(len(self._shards)))

    @classmethod
    def pooled(cls, count: int, *, limits: httpx.Limits, **transport_kwargs: Any) -> ShardedTransport:
        """``count`` ``httpx.AsyncHTTPTransport`` pools sharing ``limits`` between them."""
        if count < 1:
            raise ValueError("count must be at least 1")
        per_shard = httpx.Limits(
            max_connections=_split(limits.max_connections, count),
            max_keepalive_connections=_split(limits.max_keepalive_connections, count),
            keepalive_expiry=limits.keepalive_expiry,
        )
        return cls([httpx.AsyncHTTPTransport(limits=per_shard, **transport_kwargs) for _ in range(count)])

    @property
    def in_flight(self) -> int:
        return sum(self._in_flight)

    def _pick(self) -> int:
        start = next(self._turn)
        n = len(self._shards)
        return min(((start + i) % n for i in range(n)), key=self._in_flight.__getitem__)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        shard = self._pick()
        self._in_flight[shard] += 1
        try:
            response = await self._shards[shard].handle_async_request(request)
        except BaseException:
            self._in_flight[shard] -= 1
            raise
        response.stream = _Released(response.stream, self._in_flight, shard)  # type: ignore[arg-type]
        return response

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()


class _Released(httpx.AsyncByteStream):
    """The shard's response body; closing it ends the request's turn on the shard, once."""

    def __init__(self, stream: httpx.AsyncByteStream, counts: list[int], shard: int) -> None:
        self._stream = stream
        self._counts = counts
        self._shard: int | None = shard

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if self._shard is not None:
                self._counts[self._shard] -= 1
                self._shard = None


def _split(total: int | None, shards: int) -> int | None:
    return None if total is None else max(1, -(-total // shards))
