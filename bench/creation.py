"""Stream creation and frame size (issue 23, first step): memory of a full-HD source with and
without resizing at the decoder, and many concurrent creations past max_streams.

    python -m bench.creation rss [--model models/demo] [--seconds 4] [--fps 15] [--height 1080 --width 1920]
    python -m bench.creation creations [--model models/demo] [--creations 50] [--max-streams 10]

rss: one stream fed a synthetic 1920x1080 clip (or --height x --width: 2160 x 3840 for 4K; every frame kept) through a decoder actor, twice on
a fresh local Ray runtime: frames at source size (a caller's size = the source's: what every
source did before) and at the model's input size (the default now). Peak RSS of the decoder,
prefill and coordinator processes, sampled every 50 ms, and each one's rise over its RSS before
the source was attached. creations: the HTTP service (Serve, real HTTP) with `max_streams`; N
concurrent POST /v1/streams (push mode: each 201 starts a decoder) while /healthz is polled:
status codes, time to answer, /healthz latency. Raw numbers: bench/results/creation.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from actors.messages import is_terminal
from bench.procs import descendants, processes

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "demo"
RESULTS = Path(__file__).resolve().parent / "results" / "creation.json"
ROLES = {"decoder": "ray::DecoderHost",  # (the pool's host: issue 23 item 1)
         "prefill": "ray::PrefillWorker", "coordinator": "ray::StreamCoordinator"}


def _rss_by_role() -> dict[str, int]:
    procs = processes()
    mine = descendants(os.getpid(), procs)
    out = defaultdict(int)
    for pid, _, cmd, rss in procs:
        for role, title in ROLES.items():
            if pid in mine and cmd.startswith(title):
                out[role] = max(out[role], rss)
    return dict(out)


def _clip(seconds: float, fps: float, height: int = 1080, width: int = 1920) -> str:
    from pipeline.video_io import write_video

    frames = int(seconds * fps)
    y, x = np.mgrid[0:height, 0:width]
    video = np.stack([((x + 7 * i) % 256 // 2 + (y // 4 % 2) * 60)[..., None].repeat(3, -1).astype(np.uint8)
                      for i in range(frames)])
    path = Path(tempfile.mkdtemp()) / f"{height}p.mp4"
    write_video(path, video, fps=fps)
    return str(path)


def rss(model: str, seconds: float, fps: float, height: int = 1080, width: int = 1920) -> dict:
    import ray

    from actors.coordinator import StreamCoordinator
    from pipeline.decode import DecodeConfig

    clip, out = _clip(seconds, fps, height, width), {}
    for mode, decode in [("source size", DecodeConfig(size=(height, width))), ("model size", None)]:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=512 * 2**20)
        coord = ray.remote(StreamCoordinator).options(num_cpus=0.1).remote(model, actor_cpus=0.1)
        ray.get(coord.create_stream.remote("hd"))
        before, peak, done = _rss_by_role(), defaultdict(int), threading.Event()

        def sample():
            while not done.is_set():
                for role, value in _rss_by_role().items():
                    peak[role] = max(peak[role], value)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        ray.get(coord.attach_source.remote("hd", clip, decode))
        while not is_terminal((status := ray.get(coord.status.remote("hd")))["source_state"]):
            time.sleep(0.1)
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
        after_delete = (ray.get(coord.delete_stream.remote("hd")), _rss_by_role())[1]
        out[mode] = {"frames": status["frames_ingested"], "seconds": elapsed,
                     "peak_mb": {r: peak[r] / 2**20 for r in ROLES},
                     "rise_mb": {r: (peak[r] - before.get(r, 0)) / 2**20 for r in ROLES if r != "decoder"},
                     "after_delete_mb": {r: v / 2**20 for r, v in after_delete.items()}}
        print(mode, json.dumps(out[mode], indent=1))
        ray.shutdown()
    return out


async def _creations(url: str, count: int) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        health, stop = [], asyncio.Event()

        async def probe():
            while not stop.is_set():
                started = time.perf_counter()
                code = (await http.get("/healthz")).status_code
                health.append((code, time.perf_counter() - started))
                await asyncio.sleep(0.05)

        async def create(i):
            started = time.perf_counter()
            r = await http.post("/v1/streams", json={"stream_id": f"c{i}"})
            return r.status_code, time.perf_counter() - started, r.headers.get("Retry-After"), r.json()

        prober = asyncio.create_task(probe())
        results = await asyncio.gather(*[create(i) for i in range(count)])
        stop.set()
        await prober
        for i, (code, *_rest) in enumerate(results):
            if code == 201:
                await http.delete(f"/v1/streams/c{i}")
        left = len((await http.get("/v1/streams")).json()["data"])  # none: nothing half-made
    by_code = defaultdict(list)
    for code, seconds, retry, _ in results:
        by_code[code].append(seconds)
    latencies = sorted(s for _, s in health)
    return {"streams_left": left, "codes": dict(Counter(c for c, *_ in results)),
            "answer_s": {c: {"max": max(v), "median": float(np.median(v))} for c, v in by_code.items()},
            "retry_after": sorted({r for _, _, r, _ in results if r}),
            "error_types": sorted({b["error"]["type"] for c, _, _, b in results if c >= 400}),
            "healthz": {"count": len(latencies), "codes": dict(Counter(c for c, _ in health)),
                        "p50_s": float(np.percentile(latencies, 50)), "p99_s": float(np.percentile(latencies, 99))}}


def creations(model: str, count: int, max_streams: int) -> dict:
    import httpx
    import ray
    from ray import serve

    from deploy.app import build_app
    from deploy.ingest import stop_coordinator

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=512 * 2**20)
    serve.start(http_options={"host": "127.0.0.1", "port": 8765})
    name = "bench-creation"
    serve.run(build_app({"model_dir": model, "coordinator_name": name, "max_streams": max_streams,
                         "actor_cpus": 0.05, "coordinator_cpus": 0.05}), name="bench", route_prefix="/")
    url = "http://127.0.0.1:8765"
    while httpx.get(f"{url}/healthz", timeout=60).status_code != 200:
        time.sleep(1)
    try:
        out = asyncio.run(_creations(url, count))
    finally:
        stop_coordinator(name)
        serve.shutdown()
        ray.shutdown()
    print(json.dumps(out, indent=1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("rss", "creations"))
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--fps", type=float, default=15.0)
    parser.add_argument("--creations", type=int, default=50)
    parser.add_argument("--max-streams", type=int, default=10)
    parser.add_argument("--height", type=int, default=1080, help="rss: the clip's size")
    parser.add_argument("--width", type=int, default=1920)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    result = (rss(args.model, args.seconds, args.fps, args.height, args.width) if args.what == "rss"
              else creations(args.model, args.creations, args.max_streams))
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.parent.mkdir(exist_ok=True)
    key = f"creations-{args.creations}-max{args.max_streams}"
    if args.what == "rss":
        key = "rss" if (args.height, args.width) == (1080, 1920) else f"rss-{args.height}p-{args.seconds:g}s"
    RESULTS.write_text(json.dumps({**saved, key: result}, indent=1))


if __name__ == "__main__":
    main()
