"""HTTP clients for a load of many streams: one `httpx.AsyncClient` per group of streams.

    async with ClientShards(200, base_url=url, timeout=300) as shards:
        await shards.for_stream(17).post(f"/v1/streams/{sid}/chunks", ...)

Why: httpcore's connection pool (httpx's transport) places each waiting request by scanning
every connection of the pool, and does so again whenever a request starts or ends
(`AsyncConnectionPool._assign_requests_to_connections`), so one client that holds hundreds of
connections and requests spends CPU in proportion to their product. bench.load's single client
for 200 live streams (a pusher and a status poll per stream) spent ~16 ms of the driver's CPU per
request (one core at ~60 requests/s, less as requests piled up) against the ~200 requests/s the
streams needed: the pushes fell behind while the service waited for them (BENCHMARKS.md, "Decoder
pool: live-stream capacity"). A client per `per_client` streams keeps each pool small: ~1.5 ms a
request on the same load.
"""

from __future__ import annotations

import math

PER_CLIENT = 16  # streams per client: a pusher and a poll each, so ~32 connections a pool at most


class ClientShards:
    """`streams` streams' clients, `per_client` streams to a client (every client made with
    `client_options`, e.g. base_url, headers, timeout); stream i's is `for_stream(i)`."""

    def __init__(self, streams: int, per_client: int = PER_CLIENT, **client_options) -> None:
        if streams < 1 or per_client < 1:
            raise ValueError("need streams >= 1 and per_client >= 1")
        self.per_client = per_client
        self.count = math.ceil(streams / per_client)
        self.options = client_options
        self.clients: list = []

    async def __aenter__(self) -> ClientShards:
        import httpx

        limits = httpx.Limits(max_connections=4 * self.per_client, max_keepalive_connections=2 * self.per_client)
        self.clients = [httpx.AsyncClient(limits=limits, **self.options) for _ in range(self.count)]
        return self

    async def __aexit__(self, *exc) -> None:
        for client in self.clients:
            await client.aclose()
        self.clients = []

    def for_stream(self, index: int):
        return self.clients[index // self.per_client]
