"""Memory per idle stream's decoder: a process per stream (`DecoderActor`, what the coordinator
started before issue 23 item 1) against the pool of decoder hosts (`DecoderHost`, many sources
per process), on a fresh local Ray runtime each.

    python -m bench.decoder_pool [--streams 40] [--capacity 32] [--feed]

Each of `--streams` streams gets a push-mode source, started (its decode thread waits for bytes:
an idle stream, as a camera attached but quiet, or an upload not yet sent), fed to a sink actor
that takes its chunks. Then the decoder processes' memory is read from /proc: PSS (shared pages
split among the processes that share them: what the processes cost the node together) and RSS.
With `--feed` every source then gets a small MPEG-TS clip and is closed, and memory is read
again once all have finished (the pool frees a finished source: only its status is kept).
The coordinator's own per-stream state is the same either way (this measures the decoders).
Raw numbers: bench/results/decoder_pool.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

import ray

from bench.procs import descendants, processes, pss

RESULTS = Path(__file__).resolve().parent / "results" / "decoder_pool.json"


class Sink:
    """Takes chunks and counts frames (a FrameSink)."""

    def __init__(self) -> None:
        self.frames = 0

    def ingest(self, stream_id, frames, times, seq=None) -> int:
        self.frames += len(frames)
        return self.frames

    def count(self) -> int:
        return self.frames


def _memory(title: str) -> dict:
    """PSS and RSS of this driver's Ray worker processes titled `title` ("ray::DecoderHost")."""
    procs = processes()
    mine = descendants(os.getpid(), procs)
    pids = [(pid, rss) for pid, _, cmd, rss in procs if pid in mine and cmd.startswith(title)]
    return {"processes": len(pids), "pss_bytes": sum(pss(pid) or 0 for pid, _ in pids),
            "rss_bytes": sum(rss for _, rss in pids)}


def _clip() -> bytes:
    from pipeline.video_io import write_video
    from tests.stages import scene_video

    buf = io.BytesIO()
    write_video(buf, scene_video(6, seed=3), 4.0, container_format="mpegts")
    return buf.getvalue()


def run(mode: str, streams: int, capacity: int, feed: bool) -> dict:
    """One fresh runtime: `streams` idle push sources as `mode` ("process" | "pool")."""
    from actors.decoder_actor import DecoderActor
    from actors.decoder_host import decoder_host_class
    from pipeline.decode import DecodeConfig

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=256 * 2**20,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    try:
        sink = ray.remote(Sink).options(num_cpus=0.05).remote()
        config = DecodeConfig(size=(64, 64), shrink_only=True)  # the demo model's input size
        began = time.monotonic()
        if mode == "process":
            title = "ray::DecoderActor"  # (the class is StreamDecoder wrapped: Ray titles it by its name)
            actors = [DecoderActor.options(num_cpus=0.05).remote(f"s{i}", None, config, sink) for i in range(streams)]
            calls = {i: a for i, a in enumerate(actors)}
            ray.get([a.start.remote() for a in actors])
            push = lambda i, data: calls[i].push.remote(data)  # noqa: E731
            close = lambda i: calls[i].close.remote()  # noqa: E731
            wait = lambda i: calls[i].wait.remote(120)  # noqa: E731
        else:
            title = "ray::DecoderHost"
            hosts = [decoder_host_class(capacity).options(num_cpus=0.05).remote(capacity)
                     for _ in range(-(-streams // capacity))]
            where = {i: hosts[i // capacity] for i in range(streams)}
            ray.get([where[i].open.remote(f"s{i}", f"s{i}", None, config, sink) for i in range(streams)])
            ray.get([where[i].start.remote(f"s{i}") for i in range(streams)])
            push = lambda i, data: where[i].push.remote(f"s{i}", data)  # noqa: E731
            close = lambda i: where[i].close.remote(f"s{i}")  # noqa: E731
            wait = lambda i: where[i].wait.remote(f"s{i}", 120)  # noqa: E731
        started_s = time.monotonic() - began
        time.sleep(3.0)  # settle (imports done, threads parked)
        if mode == "process":  # Ray may title a worker by the class it wraps
            found = _memory(title)
            title = title if found["processes"] else "ray::StreamDecoder"
        idle = _memory(title)
        out = {"mode": mode, "streams": streams, "capacity": capacity if mode == "pool" else 1,
               "start_s": round(started_s, 1), "idle": idle,
               "idle_pss_per_stream_mb": round(idle["pss_bytes"] / streams / 2**20, 1),
               "idle_rss_per_stream_mb": round(idle["rss_bytes"] / streams / 2**20, 1)}
        if feed:
            clip = _clip()
            ray.get([push(i, clip) for i in range(streams)])
            ray.get([close(i) for i in range(streams)])
            finals = ray.get([wait(i) for i in range(streams)])
            time.sleep(2.0)
            out["fed"] = {"states": sorted({f["state"] for f in finals}), "frames": ray.get(sink.count.remote()),
                          "after": _memory(title)}
        return out
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=40)
    parser.add_argument("--capacity", type=int, default=32, help="sources per host (the pool's default on 2 CPUs)")
    parser.add_argument("--feed", action="store_true", help="then push a clip to every source and read memory again")
    parser.add_argument("--modes", nargs="+", default=["pool", "process"])
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    results = [run(mode, args.streams, args.capacity, args.feed) for mode in args.modes]
    for r in results:
        print(json.dumps(r))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
