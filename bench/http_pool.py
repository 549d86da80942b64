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


# ---- python -m bench.http_pool: the client's CPU per request, one client vs a client per 16 streams
async def _compare(streams: int, per_stream: int, service_s: float) -> dict:
    """`streams` streams each sending `per_stream` requests in turn to a local server that answers
    each after `service_s` (a busy service: every stream keeps a request waiting), through one
    client, then through ClientShards; this process's CPU per request (the toy server's too)."""
    import asyncio
    import time

    import httpx

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                size = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                             if line.lower().startswith(b"content-length:")), 0)
                if size:
                    await reader.readexactly(size)
                await asyncio.sleep(service_s)
                writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    out = {}
    for mode in ("one client", f"a client per {PER_CLIENT} streams"):
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)  # bench.load's single client
        single = httpx.AsyncClient(base_url=url, timeout=600, limits=limits) if mode == "one client" else None
        async with ClientShards(streams, base_url=url, timeout=600) as shards:
            async def stream(i: int) -> None:
                client = single or shards.for_stream(i)
                for _ in range(per_stream):
                    (await client.post("/chunk", content=b"x" * 2000)).raise_for_status()

            wall, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*[stream(i) for i in range(streams)])
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if single is not None:
            await single.aclose()
        out[mode] = {"requests": streams * per_stream, "wall_s": round(wall, 1),
                     "cpu_ms_per_request": round(1000 * cpu / (streams * per_stream), 2)}
    server.close()
    return out


def main() -> None:
    import argparse
    import asyncio
    import json

    parser = argparse.ArgumentParser(description="client CPU per request: one httpx client vs ClientShards")
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--requests", type=int, default=10, help="per stream, one after another")
    parser.add_argument("--service-s", type=float, default=0.5, help="the toy server's time per request")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(_compare(args.streams, args.requests, args.service_s)), indent=1))


if __name__ == "__main__":
    main()
