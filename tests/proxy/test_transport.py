"""The sharded upstream pool: requests spread over shards, and a shard is busy until its body closes."""

from __future__ import annotations

import httpx
import pytest

from proxy.transport import ShardedTransport


class _Body(httpx.AsyncByteStream):
    """A body read from the network, as a real pool returns it (not pre-read like content=)."""

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        for chunk in (b"chunk-1 ", b"chunk-2"):
            yield chunk


def _shard(name: str, seen: list[str]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(name)
        return httpx.Response(200, stream=_Body())

    return httpx.MockTransport(handler)


async def test_concurrent_requests_go_to_different_shards_and_free_them_on_close() -> None:
    seen: list[str] = []
    transport = ShardedTransport([_shard("a", seen), _shard("b", seen), _shard("c", seen)])
    async with httpx.AsyncClient(transport=transport) as client:
        open_streams = []
        for _ in range(3):
            request = client.build_request("GET", "http://upstream.test/")
            open_streams.append(await client.send(request, stream=True))
        assert sorted(seen) == ["a", "b", "c"]  # none reused while all three are in flight
        assert transport.in_flight == 3
        for response in open_streams:
            assert await response.aread() == b"chunk-1 chunk-2"
            await response.aclose()
        assert transport.in_flight == 0


async def test_a_shard_whose_request_fails_is_not_left_busy() -> None:
    def boom(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    transport = ShardedTransport([httpx.MockTransport(boom)])
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("http://upstream.test/")
    assert transport.in_flight == 0


async def test_closing_a_body_twice_frees_its_shard_once() -> None:
    seen: list[str] = []
    transport = ShardedTransport([_shard("a", seen), _shard("b", seen)])
    async with httpx.AsyncClient(transport=transport) as client:
        first = await client.send(client.build_request("GET", "http://upstream.test/"), stream=True)
        second = await client.send(client.build_request("GET", "http://upstream.test/"), stream=True)
        await first.aclose()
        await first.aclose()
        assert transport.in_flight == 1
        await second.aclose()
    assert transport.in_flight == 0


def test_pooled_splits_the_connection_limits_between_shards() -> None:
    transport = ShardedTransport.pooled(4, limits=httpx.Limits(max_connections=10, max_keepalive_connections=None))
    pools = [shard._pool for shard in transport._shards]  # type: ignore[attr-defined]
    assert len(pools) == 4
    assert {pool._max_connections for pool in pools} == {3}
    with pytest.raises(ValueError):
        ShardedTransport.pooled(0, limits=httpx.Limits())


async def test_a_body_the_transport_already_read_is_relayed_whole() -> None:
    """httpx.MockTransport (and any transport returning whole bodies) hands over a read response."""
    from proxy.upstream import UpstreamReply, timed_raw

    response = httpx.Response(200, content=b"data: {}\n\ndata: [DONE]\n\n")
    assert response.is_stream_consumed
    reply = UpstreamReply(body=response.aiter_bytes(), provider="anthropic")
    relayed = [chunk async for chunk in timed_raw(response, reply)]
    assert b"".join(relayed) == b"data: {}\n\ndata: [DONE]\n\n"
