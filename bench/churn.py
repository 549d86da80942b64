"""Stream churn (issue 23 item 4): does a deleted stream give all of its memory back?

    python -m bench.churn [--streams 200] [--concurrency 4] [--sample-every 20] [--warmup 20]
    python -m bench.churn idle [--idle 10]          # memory per idle stream (decoder + state)

churn: the HTTP service as bench.load starts it (local Ray, Serve, deploy.app:build_app with the
demo model), its segment index and thumbnails on a private redis-server. Each stream goes through
its whole life over HTTP: create (push mode: its decoder actor starts), one MPEG-TS upload of
`--frames` frames of the synthetic world (closed, and waited for until ingested), one question,
delete. `--concurrency` streams live at once, in waves. After every `--sample-every` deleted
streams, once the deleted streams' decoder processes have exited (at most `--settle-s`), the
node's memory is read: PSS and USS of every process of the local runtime by title (raylet, GCS,
each `ray::` actor, Serve's proxy and replica), redis-server's `used_memory` and key count, and
the object store's bytes in use. Reported: start (server up, no stream yet), after `--warmup`
streams (allocator pools and caches warmed), end, and the slope of the runtime's PSS per stream
after the warm-up (least squares, 95% interval), per process title too: the leak, if any, and
where. Writes bench/results/<name>.json and <name>.png (memory against streams deleted).

plot: draws <name>.png again from the JSON, with `--before <name>` beside it.

idle: the same service; `--idle` push-mode streams created and left idle (their decoders wait
for bytes), then deleted: memory per idle stream, by process title.

Exit status 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from bench.procs import descendants, object_refs, processes, pss_uss, title

REPO = Path(__file__).resolve().parent.parent
MiB = 2**20
DECODER = "ray::StreamDecoder"


def node_memory(redis_client=None) -> dict:
    """The local runtime's memory now (this driver's descendants: raylet, GCS, workers, actors;
    redis-server too, counted apart): PSS, USS and RSS by process title, and Redis's own figures."""
    procs = processes()
    mine = descendants(os.getpid(), procs)
    by = defaultdict(lambda: {"pss": 0, "uss": 0, "rss": 0, "count": 0})
    for pid, _, cmd, rss in procs:
        if pid not in mine:
            continue
        name = title(cmd)
        sizes = pss_uss(pid)
        if sizes is None:
            continue
        row = by[name]
        row["pss"] += sizes[0]
        row["uss"] += sizes[1]
        row["rss"] += rss
        row["count"] += 1
    runtime = {k: sum(v[k] for n, v in by.items() if n != "redis-server") for k in ("pss", "uss", "rss")}
    out = {"t": time.time(), "by_title": dict(sorted(by.items())), "runtime": runtime,
           "object_store_bytes": _object_store_used(), "gcs": gcs_records(), "load_average": os.getloadavg()[0]}
    try:  # objects owned and references held, by process title
        refs, titles = object_refs(), {pid: title(cmd) for pid, _, cmd, _ in procs}
        owned = defaultdict(lambda: {"owned": 0, "in_scope": 0})
        for pid, worker in refs["workers"].items():
            owned[titles.get(pid, str(pid))]["owned"] += worker["owned"]
            owned[titles.get(pid, str(pid))]["in_scope"] += worker["in_scope"]
        out["objects"] = {"store_objects": refs["store_objects"], "store_bytes": refs["store_bytes"],
                          "by_title": dict(sorted(owned.items()))}
    except Exception as error:  # noqa: BLE001 - a figure, not a failure
        out["objects"] = {"error": f"{type(error).__name__}: {error}"}
    if redis_client is not None:
        info = redis_client.info("memory")
        out["redis"] = {"used_memory": info["used_memory"], "keys": redis_client.dbsize()}
    return out


GCS_COUNTS = {"task_events_stored": "-Current num of task events stored:",
              "task_events_reported": "-Total num task events reported:",
              "destroyed_actors": "- Destroyed actors count:"}


def gcs_records() -> dict:
    """What the GCS says it keeps, from the last debug dump in this runtime's gcs_server.out (it
    writes one a minute: the figures lag by up to 60 s): task events stored (capped by Ray's
    task_events_max_num_task_in_gcs) and reported, destroyed actors kept."""
    import ray

    try:
        text = (Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "gcs_server.out").read_text(errors="replace")
    except Exception:  # noqa: BLE001 - a figure, not a failure
        return {}
    out = {}
    for key, label in GCS_COUNTS.items():
        at = text.rfind(label)
        if at >= 0:
            out[key] = int(text[at + len(label):].split(None, 1)[0])
    return out


def _object_store_used() -> int | None:
    import ray

    try:
        return int(ray.cluster_resources().get("object_store_memory", 0)
                   - ray.available_resources().get("object_store_memory", 0))
    except Exception:  # noqa: BLE001 - a figure, not a failure
        return None


def _decoders_alive() -> int:
    return sum(1 for pid, _, cmd, _ in processes() if cmd.startswith(DECODER) and pid in descendants(os.getpid()))


async def settled(limit_s: float) -> float:
    """Wait until no decoder process of a deleted stream is left (at most limit_s); seconds waited."""
    start = time.monotonic()
    while _decoders_alive() and time.monotonic() - start < limit_s:
        await asyncio.sleep(0.5)
    return time.monotonic() - start


def _t975(dof: int) -> float:
    """The t distribution's 97.5% quantile (Cornish-Fisher expansion around the normal's; within
    1% of the exact value from 3 degrees of freedom up)."""
    z = 1.959964
    return (z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * dof**3))


def slope(xs: list[float], ys: list[float]) -> dict:
    """Least-squares slope of ys over xs with its 95% interval (t distribution, n - 2 dof)."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    if len(x) < 3:
        return {"slope": None, "low": None, "high": None, "n": len(x)}
    dx = x - x.mean()
    fit = float((dx * (y - y.mean())).sum() / (dx**2).sum())
    residuals = y - y.mean() - fit * dx
    stderr = float(np.sqrt((residuals**2).sum() / (len(x) - 2) / (dx**2).sum()))
    half = _t975(len(x) - 2) * stderr
    return {"slope": fit, "low": fit - half, "high": fit + half, "n": len(x)}


# ---- the service -------------------------------------------------------------------------------------
class Service:
    """A private redis-server, then bench.load's local service with its index there."""

    def __init__(self, args):
        from tests.plugins.redis_server import RedisServer, free_port

        self.redis = RedisServer("redis-server", Path(tempfile.mkdtemp(prefix="churn-redis-")), persistence="none")
        self.redis.start(free_port())
        self.args = SimpleNamespace(
            threads=1, num_cpus=4, object_store_mib=512, model=args.model, answerers=1, actor_cpus=0.25,
            coordinator_cpus=0.1, api_cpus=0.1, token=None, ray_config=ray_config(args.ray_config),
            server_arg=[f"index_url={self.redis.url}", f"max_streams={max(64, 2 * args.concurrency)}",
                        *args.server_arg])
        from bench.load import LocalService

        self.local = LocalService(self.args)

    def start(self) -> str:
        from rich.console import Console

        return self.local.start(Console(stderr=True))

    def close(self) -> None:
        self.local.close()
        self.redis.stop()


def ray_config(pairs: list[str]) -> dict:
    """--ray-config KEY=VALUE pairs as Ray's _system_config (numbers as ints)."""
    return {k: int(v) if v.lstrip("-").isdigit() else v for k, v in (p.split("=", 1) for p in pairs)}


def upload(frames: int, fps: float, seed: int = 90_000) -> list[bytes]:
    """One MPEG-TS container of the synthetic world, cut into ~1 s chunks."""
    from bench.load import encode_chunks
    from synthetic.world import WorldConfig, generate_stream

    video = generate_stream(frames, seed, WorldConfig()).frames
    return encode_chunks(video, fps, 1.0)[0]


async def healthy(client, limit_s: float = 180.0) -> str:
    """Wait for /healthz; the model's id."""
    import httpx

    deadline = time.monotonic() + limit_s
    while True:
        try:
            if (await client.get("/healthz")).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"/healthz did not answer 200 within {limit_s:g} s")
        await asyncio.sleep(1)
    return (await client.get("/v1/models")).json()["data"][0]["id"]


async def life(client, model: str, sid: str, chunks: list[bytes], errors: list[str]) -> None:
    """One stream's whole life: create, upload, close (ingested), one question, delete."""
    from bench.load import ask_body

    async def expect(response, codes, what):
        if response.status_code not in codes:
            errors.append(f"{sid} {what}: {response.status_code} {response.text[:200]}")
            return False
        return True

    try:
        if not await expect(await client.post("/v1/streams", json={"stream_id": sid, "method": "rekv"}), (201,), "create"):
            return
        try:
            for k, chunk in enumerate(chunks):
                await expect(await client.post(f"/v1/streams/{sid}/chunks", params={"seq": k}, content=chunk,
                                               headers={"Content-Type": "video/mp2t"}), (202,), "push")
            await expect(await client.post(f"/v1/streams/{sid}/close", params={"wait_s": 120}), (200,), "close")
            await expect(await client.post("/v1/chat/completions",
                                           json=ask_body(model, sid, "what is on screen now ?", 4, False)), (200,), "ask")
        finally:
            await expect(await client.delete(f"/v1/streams/{sid}"), (200,), "delete")
    except Exception as error:  # noqa: BLE001 - counted
        errors.append(f"{sid}: {type(error).__name__}: {error}"[:300])


def _row(label: str, streams: int, memory: dict, waited: float | None = None) -> dict:
    return {"label": label, "streams": streams, "settle_s": waited, **memory}


def _print(row: dict) -> None:
    redis = row.get("redis") or {}
    print(f"{row['label']:>10} streams {row['streams']:4d}: runtime PSS {row['runtime']['pss'] / MiB:8.1f} MiB "
          f"USS {row['runtime']['uss'] / MiB:8.1f} MiB  redis {redis.get('used_memory', 0) / MiB:6.2f} MiB "
          f"{redis.get('keys', '-')} keys  store {(row['object_store_bytes'] or 0) / MiB:.2f} MiB  "
          f"decoders {row['by_title'].get(DECODER, {}).get('count', 0)}  objects "
          f"{row.get('objects', {}).get('store_objects', '-')} coordinator refs "
          f"{row.get('objects', {}).get('by_title', {}).get('ray::StreamCoordinator')}  gcs {row.get('gcs')}", flush=True)


async def churn(args, url: str, redis_client) -> dict:
    import httpx

    chunks = upload(args.frames, args.fps)
    run, errors, rows = uuid.uuid4().hex[:6], [], []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        model = await healthy(client)
        await settled(args.settle_s)
        rows.append(_row("start", 0, node_memory(redis_client)))
        _print(rows[-1])
        started, done = time.monotonic(), 0
        while done < args.streams:
            wave = range(done, min(args.streams, done + args.concurrency))
            await asyncio.gather(*[life(client, model, f"churn-{run}-{i}", chunks, errors) for i in wave])
            before, done = done, wave.stop
            if done // args.sample_every > before // args.sample_every or done == args.streams:
                waited = await settled(args.settle_s)
                label = "warm-up" if before < args.warmup <= done else "end" if done == args.streams else ""
                rows.append(_row(label, done, node_memory(redis_client), waited))
                _print(rows[-1])
        elapsed = time.monotonic() - started
        left = len((await client.get("/v1/streams")).json()["data"])
    return {"streams": args.streams, "concurrency": args.concurrency, "frames_per_stream": args.frames,
            "ray_config": ray_config(args.ray_config), "load_average": os.getloadavg(),
            "fps": args.fps, "seconds": elapsed, "errors": errors, "streams_left": left, "samples": rows,
            "slopes_bytes_per_stream": fits(rows, args.warmup)}


def fits(rows: list[dict], warmup: int) -> dict:
    """Slopes (bytes per stream) over the samples from `warmup` streams on: the runtime's PSS and
    USS, Redis's used_memory, and each process title's PSS and USS."""
    after = [r for r in rows if r["streams"] >= warmup]
    xs = [r["streams"] for r in after]
    out = {"runtime_pss": slope(xs, [r["runtime"]["pss"] for r in after]),
           "runtime_uss": slope(xs, [r["runtime"]["uss"] for r in after]),
           "redis_used_memory": slope(xs, [r["redis"]["used_memory"] for r in after]),
           "redis_keys": slope(xs, [r["redis"]["keys"] for r in after])}
    for name in sorted({n for r in after for n in r["by_title"]}):
        for kind in ("pss", "uss"):
            out[f"{kind} {name}"] = slope(xs, [r["by_title"].get(name, {}).get(kind, 0) for r in after])
    return out


async def idle(args, url: str, redis_client) -> dict:
    """Memory per idle push-mode stream: before, with `--idle` streams, after deleting them."""
    import httpx

    run, rows, errors = uuid.uuid4().hex[:6], [], []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        model = await healthy(client)
        warm = f"warm-{run}"
        await life(client, model, warm, upload(args.frames, args.fps), errors)  # loads every actor's model
        await settled(args.settle_s)
        rows.append(_row("before", 0, node_memory(redis_client)))
        ids = [f"idle-{run}-{i}" for i in range(args.idle)]
        for sid in ids:
            r = await client.post("/v1/streams", json={"stream_id": sid, "method": "rekv"})
            if r.status_code != 201:
                errors.append(f"{sid} create: {r.status_code} {r.text[:200]}")
        await asyncio.sleep(2)
        rows.append(_row("idle", len(ids), node_memory(redis_client)))
        for sid in ids:
            await client.delete(f"/v1/streams/{sid}")
        rows.append(_row("deleted", 0, node_memory(redis_client), await settled(args.settle_s)))
    for row in rows:
        _print(row)
    before, held = rows[0], rows[1]
    titles = sorted(set(before["by_title"]) | set(held["by_title"]))
    per_stream = {name: {k: (held["by_title"].get(name, {}).get(k, 0) - before["by_title"].get(name, {}).get(k, 0))
                         / len(ids) for k in ("pss", "uss", "rss")} for name in titles}
    per_stream = {n: v for n, v in per_stream.items() if any(abs(x) > 2**16 for x in v.values())}
    total = {k: (held["runtime"][k] - before["runtime"][k]) / len(ids) for k in ("pss", "uss", "rss")}
    return {"idle_streams": len(ids), "errors": errors, "samples": rows, "per_stream_bytes": per_stream,
            "per_stream_total_bytes": total}


PLOTTED = ("ray::StreamCoordinator", "gcs_server", "ray::DecoderHost", "ray::PrefillWorker", "ray::ProxyActor")


def plot(result: dict, path: Path, before: dict | None = None) -> None:
    """USS against streams deleted (log scale): the runtime's total and the processes that grow,
    for this run (solid) and, given, a run before a change (dotted)."""
    from bench.figure import single_plot

    with single_plot(path, size=(7.5, 5)) as ax:
        for run, style, tag in ((result, "-", ""), (before, ":", " (before)")):
            if run is None:
                continue
            rows = run["samples"]
            xs = [r["streams"] for r in rows]
            line = ax.plot(xs, [r["runtime"]["uss"] / MiB for r in rows], "o" + style, label=f"runtime total{tag}")
            for i, name in enumerate(PLOTTED):
                ax.plot(xs, [r["by_title"].get(name, {}).get("uss", 0) / MiB for r in rows], "." + style,
                        color=f"C{i + 1}", label=f"{name}{tag}")
            ax.plot(xs, [r["redis"]["used_memory"] / MiB for r in rows], "^" + style, color="C6",
                    label=f"redis used_memory{tag}")
            line[0].set_color("C0")
        ax.set_yscale("log")
        ax.set_xlabel("streams created, fed, asked and deleted")
        ax.set_ylabel("USS, MiB (log)")
        ax.set_title(f"Memory over stream churn ({result.get('concurrency', '-')} at a time)")
        ax.legend(fontsize=6, ncol=2, loc="center right")
        ax.grid(alpha=0.3, which="both")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=("churn", "idle", "plot"), default="churn")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--sample-every", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=20, help="streams before the slope is fitted")
    parser.add_argument("--frames", type=int, default=16, help="frames uploaded per stream")
    parser.add_argument("--fps", type=float, default=4.0)
    parser.add_argument("--idle", type=int, default=10, help="idle streams (idle)")
    parser.add_argument("--settle-s", type=float, default=30.0, help="longest wait for deleted decoders to exit")
    parser.add_argument("--model", type=Path, default=REPO / "models" / "demo")
    parser.add_argument("--server-arg", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--ray-config", action="append", default=[], metavar="KEY=VALUE",
                        help="Ray _system_config entries, e.g. task_events_max_num_task_in_gcs=10000")
    parser.add_argument("--name", default=None, help="result files: bench/results/<name>.json/.png")
    parser.add_argument("--before", help="plot: a run before a change to draw beside --name's (its result name)")
    args = parser.parse_args()
    out = REPO / "bench" / "results"
    if args.what == "plot":  # again, from the JSON files
        load = lambda name: json.loads((out / f"{name}.json").read_text())  # noqa: E731
        plot(load(args.name or "churn"), out / f"{args.name or 'churn'}.png", args.before and load(args.before))
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    service = Service(args)
    try:
        url = service.start()
        client = service.redis.client()
        result = asyncio.run(churn(args, url, client) if args.what == "churn" else idle(args, url, client))
    finally:
        service.close()
    name = args.name or args.what
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=float))
    if args.what == "churn":
        plot(result, out / f"{name}.png")
        for key, fit in result["slopes_bytes_per_stream"].items():
            if fit["slope"] is not None and (key.startswith("runtime") or key.startswith("redis")
                                             or abs(fit["slope"]) > 2**14):
                print(f"slope {key:40s} {fit['slope'] / 1024:9.1f} KiB/stream "
                      f"[{fit['low'] / 1024:9.1f}, {fit['high'] / 1024:9.1f}]")
    else:
        print(json.dumps({k: {kk: round(vv / MiB, 1) for kk, vv in v.items()}
                          for k, v in result["per_stream_bytes"].items()}, indent=1))
    if result["errors"]:
        print(f"{len(result['errors'])} errors, first: {result['errors'][:3]}")
        sys.exit(1)


if __name__ == "__main__":
    main()
