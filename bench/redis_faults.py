"""What a Redis kill costs the pipeline: ingest and answers during the outage, and the index's
catch-up once Redis is back.

    python -m bench.redis_faults [--streams 4] [--frames 48] [--size tiny] [--rounds 3]

One coordinator with its index on a private redis-server. Per round and persistence mode (aof:
an append-only file fsynced each second; none: the restart is empty): every stream ingests the
first half of its frames (chunks of 8, all streams at once) with Redis up, timed; Redis is
SIGKILLed; the second half is ingested, timed, and every stream asks bench.engine's first
question; then Redis starts again on the same port. Counted: ingest and ask calls that failed
(the writer must make them 0), records pending when Redis came back, records rewritten, and the
time from the restart (Redis answering PING) until the index is healthy with nothing pending
(catch-up; the writer retries every backoff_max_s = 1 s at the most). The index is then checked
to hold a record of every committed segment. A "control" run does the same without a kill: the
second half's ingest rate over the first's, with and without the fault, side by side. Writes
bench/results/redis_faults.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ray
from rich.console import Console
from rich.table import Table

from bench.engine import CHUNK, QUESTIONS, frames_for
from bench.pipeline import SIZES
from actors.coordinator import StreamCoordinator
from cache_store.index import RedisIndex
from synthetic.checkpoint import build_checkpoint
from tests.plugins.redis_server import RedisServer, free_port


def _ingest(coordinator, ids: list[str], frames) -> tuple[int, float]:
    """(calls that failed, seconds) for every stream ingesting `frames` in chunks, all at once."""
    failed, start = 0, time.perf_counter()
    for i in range(0, len(frames), CHUNK):
        for ref in [coordinator.ingest.remote(sid, frames[i : i + CHUNK]) for sid in ids]:
            try:
                ray.get(ref)
            except Exception:  # noqa: BLE001 - counted: what the benchmark measures
                failed += 1
    return failed, time.perf_counter() - start


def _caught_up(coordinator) -> dict:
    while True:
        health = ray.get(coordinator.index_health.remote())
        if health["state"] == "healthy" and not health["pending_writes"] and not health["pending_deletes"]:
            return health
        time.sleep(0.01)


def fault_run(coordinator, server: RedisServer, workdir: Path, persistence: str, ids: list[str], method: str,
              options: dict, frames) -> dict:
    """persistence "control": the same run, and no kill (the second half's rate without a fault)."""
    resets = ray.get(coordinator.index_health.remote())["resets"]
    server.stop()  # a fresh server of this persistence mode (the journal holds no stream now)
    server.persistence, server.dir = "none" if persistence == "control" else persistence, workdir
    server.start(server.port)
    while (before := _caught_up(coordinator))["resets"] == resets:  # until the writer has seen the new one
        time.sleep(0.01)
    ray.get([coordinator.create_stream.remote(sid, method, options) for sid in ids])
    half = (len(frames) // 2 // CHUNK) * CHUNK
    failed_up, up_s = _ingest(coordinator, ids, frames[:half])
    if persistence != "control":
        server.kill()
    failed_down, down_s = _ingest(coordinator, ids, frames[half:])
    asks_failed = 0
    for ref in [coordinator.ask.remote(sid, QUESTIONS[0], 8) for sid in ids]:
        try:
            ray.get(ref)
        except Exception:  # noqa: BLE001
            asks_failed += 1
    pending = ray.get(coordinator.index_health.remote())["pending_writes"]
    start = time.perf_counter()
    if persistence != "control":
        server.start(server.port)  # aof: on the file it wrote before the kill; none: empty
    health = _caught_up(coordinator)
    catch_up = time.perf_counter() - start
    index = RedisIndex(server.url)
    committed = [ray.get(coordinator.status.remote(sid))["segments"] for sid in ids]
    held = [len(index.segments(sid)) for sid in ids]
    ray.get([coordinator.delete_stream.remote(sid) for sid in ids])
    return {"persistence": persistence, "ingest_failed": failed_up + failed_down, "asks_failed": asks_failed,
            "frames_per_s_up": len(ids) * half / up_s, "frames_per_s_down": len(ids) * (len(frames) - half) / down_s,
            "pending_at_restart": pending, "catch_up_s": catch_up,
            "records_rewritten": health["records_rewritten"] - before["records_rewritten"],
            "resets": health["resets"] - before["resets"], "segments": sum(committed),
            "records_held": sum(min(h, c) for h, c in zip(held, committed))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--frames", type=int, default=48, help="frames per stream")
    parser.add_argument("--method", default="rekv")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found on PATH (apt-get install redis-server)")
    frames = frames_for(args.frames)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_checkpoint(tmp / "bench", SIZES[args.size])
        options = {}  # the preset as it is: the actors scale it to their model (make_config)
        server = RedisServer(binary, tmp / "redis-0", "aof")
        server.dir.mkdir()
        server.start(free_port())
        repo = str(Path(__file__).resolve().parent.parent)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}})
        try:
            coordinator = ray.remote(StreamCoordinator).options(num_cpus=0.1).remote(
                str(model_dir), index_url=server.url)
            ray.get(coordinator.create_stream.remote("warm-up", args.method, options))  # actors up, models loaded
            ray.get(coordinator.ingest.remote("warm-up", frames[:CHUNK]))
            ray.get(coordinator.delete_stream.remote("warm-up"))
            for r in range(args.rounds):
                for persistence in ("control", "aof", "none"):
                    workdir = tmp / f"redis-{r}-{persistence}"
                    workdir.mkdir()
                    ids = [f"r{r}-{persistence}-{i}" for i in range(args.streams)]
                    runs.append(fault_run(coordinator, server, workdir, persistence, ids, args.method, options,
                                          frames))
        finally:
            ray.shutdown()
            server.stop()
    results = {"method": args.method, "size": args.size, "streams": args.streams, "frames_per_stream": args.frames,
               "runs": runs}
    print_table(results, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "redis_faults.json").write_text(json.dumps(results, indent=1))
    return results


def print_table(results: dict, args) -> None:
    table = Table(title=f"Redis killed mid-ingest ({args.method}, {args.size} model, {args.streams} streams x "
                        f"{args.frames} frames, medians of {args.rounds} rounds [min, max])")
    for column in ("persistence", "ingest failed", "asks failed", "frames/s down / up", "pending at restart",
                   "records rewritten", "resets", "catch-up", "index whole"):
        table.add_column(column, justify="right")
    for mode in ("control", "aof", "none"):
        runs = [r for r in results["runs"] if r["persistence"] == mode]

        def spread(key, fmt="{:.0f}"):
            values = [r[key] for r in runs]
            return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"

        ratios = [r["frames_per_s_down"] / r["frames_per_s_up"] for r in runs]
        table.add_row(mode, str(sum(r["ingest_failed"] for r in runs)), str(sum(r["asks_failed"] for r in runs)),
                      f"{statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}]",
                      spread("pending_at_restart"), spread("records_rewritten"), spread("resets"),
                      spread("catch_up_s", "{:.2f} s"),
                      f"{sum(r['records_held'] for r in runs)}/{sum(r['segments'] for r in runs)}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
