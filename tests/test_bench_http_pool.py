"""bench.load's clients for many streams (bench/http_pool.py): with 200 streams each holding a
request open against a slow server, no client's connection pool holds more than its share of
connections (one client for all of them held 200, and httpcore's pool scans every connection for
every waiting request: the 200-stream load starved its own pushes, BENCHMARKS.md)."""

import asyncio

from bench.http_pool import ClientShards

STREAMS = 200


async def _slow_server(release: asyncio.Event):
    async def handle(reader, writer):
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await release.wait()  # every request stays in flight until all were sent
                writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    return await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)  # (every stream connects at once)


def test_every_client_holds_only_its_streams_connections():
    async def run():
        release = asyncio.Event()
        server = await _slow_server(release)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with ClientShards(STREAMS, base_url=url, timeout=30) as shards:
            assert len(shards.clients) == 13 and shards.for_stream(0) is shards.for_stream(15)
            assert shards.for_stream(15) is not shards.for_stream(16) and shards.for_stream(199) is shards.clients[-1]
            requests = [asyncio.create_task(shards.for_stream(i).get(f"/s/{i}")) for i in range(STREAMS)]
            for _ in range(200):  # until every request has its connection
                pools = [len(c._transport._pool.connections) for c in shards.clients]
                if sum(pools) == STREAMS:
                    break
                await asyncio.sleep(0.02)
            release.set()
            codes = [r.status_code for r in await asyncio.gather(*requests)]
        server.close()
        return pools, codes

    pools, codes = asyncio.run(run())
    assert codes == [202] * STREAMS
    assert sum(pools) == STREAMS and max(pools) == 16, pools  # (one client: a pool of 200)
