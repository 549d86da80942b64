"""Ray pipeline benchmark: aggregate ingest and answer latency for N concurrent streams, against
the single-process engine on the same model and frames, in one run.

    python -m bench.pipeline [--streams 1 4 16] [--frames 256] [--method rekv] [--rounds 3]

Every stream ingests the same number of frames in numbered chunks of 8, four in flight per stream
(a decoder actor's default for a file, --in-flight), all streams submitting at once;
then every stream asks each of bench.engine's 4 questions, all streams at once per question
(answer p50 over those; the engine asks the same). A warm-up run (2 chunks and the questions on
one stream) goes first, and again after each engine run. Object-store use is read from Ray after
the questions. The engine and the stream counts take turns, round after round, and each ratio is
taken within its round. Writes bench/results/pipeline_<size>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from actors.coordinator import StreamCoordinator
from actors.sources import DEFAULT_IN_FLIGHT
from bench.engine import BENCH_SPEC, CHUNK, QUESTIONS, frames_for
from bench.procs import cpu_seconds
from pipeline import StreamSession, load_model
from synthetic.checkpoint import CheckpointSpec, build_checkpoint

IN_FLIGHT = DEFAULT_IN_FLIGHT["block"]  # a decoder actor's, for a file
# Models with ~10x (medium) and ~100x (large) the compute per frame of the tiny one: the share of
# per-chunk call overhead falls as compute per frame grows (a 7B model on a GPU is far beyond these)
SIZES = {
    "tiny": BENCH_SPEC,
    "medium": CheckpointSpec(image_size=64, patch_size=8, vision_hidden=128, vision_layers=4, vision_heads=4,
                             text_hidden=256, text_layers=4, text_heads=8, text_kv_heads=2, text_intermediate=512),
    "large": CheckpointSpec(image_size=128, patch_size=8, vision_hidden=256, vision_layers=6, vision_heads=8,
                            text_hidden=512, text_layers=8, text_heads=8, text_kv_heads=2, text_intermediate=1536),
}


def engine_run(model_dir: Path, method: str, options: dict, frames: np.ndarray) -> dict:
    model = load_model(model_dir)
    session = StreamSession(model, method=method, **options)
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(frames), CHUNK):
        session.add_frames(frames[i : i + CHUNK])
    session.flush()
    ingest, cpu = time.perf_counter() - start, time.process_time() - cpu
    latencies = []
    for question in QUESTIONS:
        start = time.perf_counter()
        session.ask(question, max_new_tokens=8)
        latencies.append(time.perf_counter() - start)
    return {"ingest_fps": len(frames) / ingest, "latency_p50_s": statistics.median(latencies),
            "ingest_cpu_s": {"engine": cpu}}


def pipeline_run(coordinator, n_streams: int, method: str, options: dict, frames: np.ndarray,
                 in_flight_chunks: int = IN_FLIGHT) -> dict:
    ids = [f"bench-{n_streams}-{i}" for i in range(n_streams)]
    ray.get([coordinator.create_stream.remote(sid, method, options) for sid in ids])
    start, cpu = time.perf_counter(), cpu_seconds(os.getpid())
    in_flight = []  # like a decoder actor: numbered chunks, in_flight_chunks of them unfinished per stream
    for seq, i in enumerate(range(0, len(frames), CHUNK)):
        in_flight.append([coordinator.ingest.remote(sid, frames[i : i + CHUNK], None, seq) for sid in ids])
        if len(in_flight) == in_flight_chunks:
            ray.get(in_flight.pop(0))
    ray.get([ref for refs in in_flight for ref in refs])
    ingest, cpu = time.perf_counter() - start, cpu_seconds(os.getpid()) - cpu
    latencies = []
    for question in QUESTIONS:  # every stream asks at once, one round per question
        start = time.perf_counter()
        pending = [coordinator.ask.remote(sid, question, 8) for sid in ids]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done[0])
            latencies.append(time.perf_counter() - start)
    used = ray.cluster_resources().get("object_store_memory", 0) - ray.available_resources().get("object_store_memory", 0)
    ray.get([coordinator.delete_stream.remote(sid) for sid in ids])
    return {"aggregate_ingest_fps": n_streams * len(frames) / ingest, "latency_p50_s": statistics.median(latencies),
            "object_store_bytes": used, "ingest_cpu_s": dict(cpu.most_common())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--method", default="rekv")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--in-flight", type=int, default=IN_FLIGHT, help="unfinished chunks per stream")
    parser.add_argument("--rounds", type=int, default=3, help="engine, then every stream count, this many times")
    parser.add_argument("--answerers", type=int, default=1, help="answer actors (each applies every update)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    frames = frames_for(args.frames)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_checkpoint(Path(tmp) / "bench", SIZES[args.size])
        options = {}  # the preset as it is: the actors scale it to their model (make_config)
        repo = str(Path(__file__).resolve().parent.parent)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": repo, "OMP_NUM_THREADS": str(args.threads)}})
        try:
            coordinator = ray.remote(StreamCoordinator).options(num_cpus=0.1).remote(
                str(model_dir), answerers=args.answerers)
            pipeline_run(coordinator, 1, args.method, options, frames[: 2 * CHUNK])  # warm-up
            results = {"method": args.method, "size": args.size, "frames_per_stream": args.frames, "options": options,
                       "answerers": args.answerers, "in_flight": args.in_flight, "engine": [], "pipeline": {n: [] for n in args.streams}}
            for _ in track(range(args.rounds), description="rounds"):
                results["engine"].append(engine_run(model_dir, args.method, options, frames))
                # the actors sat idle while the engine ran: the first run after it measured ~5% slower
                pipeline_run(coordinator, 1, args.method, options, frames[: 2 * CHUNK])
                for n in args.streams:
                    results["pipeline"][n].append(
                        pipeline_run(coordinator, n, args.method, options, frames, args.in_flight))
        finally:
            ray.shutdown()
    print_table(results, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"pipeline_{args.size}.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / f"pipeline_{args.size}.png")
    return results


def print_table(results: dict, args) -> None:
    """Medians over rounds; a pipeline's ratio to the engine is taken within each round (the
    machine's load drifts between rounds) and its median and range are shown."""
    table = Table(title=f"Ray pipeline vs engine ({args.method}, {args.size} model, {args.frames} frames per stream, "
                        f"{args.answerers} answer actor(s), {args.rounds} rounds)")
    for column in ("streams", "aggregate ingest fps", "vs engine (same round)", "answer p50", "object store"):
        table.add_column(column, justify="right")
    engine_fps = [r["ingest_fps"] for r in results["engine"]]
    table.add_row("engine", f"{statistics.median(engine_fps):.1f}", "1.00x",
                  f"{statistics.median(r['latency_p50_s'] for r in results['engine']) * 1000:.0f} ms", "-")
    for n, rows in results["pipeline"].items():
        ratios = [row["aggregate_ingest_fps"] / fps for row, fps in zip(rows, engine_fps)]
        table.add_row(str(n), f"{statistics.median(r['aggregate_ingest_fps'] for r in rows):.1f}",
                      f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}]",
                      f"{statistics.median(r['latency_p50_s'] for r in rows) * 1000:.0f} ms",
                      f"{max(r['object_store_bytes'] for r in rows) / 2**20:.1f} MiB")
    Console(width=120).print(table)
    print_cpu(results, args)


def print_cpu(results: dict, args) -> None:
    """Where ingest's CPU time goes: seconds per 1,000 frames by process, medians over rounds (the
    engine: its one process). Both cores' worth of work, against the engine's one thread."""
    streams = list(results["pipeline"])
    table = Table(title="ingest CPU seconds per 1,000 frames, by process (this driver submits the chunks)")
    table.add_column("process")
    for n in streams:
        table.add_column(f"{n} stream(s)", justify="right")
    per_k = lambda row, frames: {p: s * 1000 / frames for p, s in row["ingest_cpu_s"].items()}  # noqa: E731
    engine = statistics.median(per_k(r, args.frames)["engine"] for r in results["engine"])
    table.add_row("engine (in-process)", *[f"{engine:.2f}" for _ in streams])
    runs = {n: [per_k(row, int(n) * args.frames) for row in results["pipeline"][n]] for n in streams}
    names = sorted({p for rows in runs.values() for row in rows for p in row},
                   key=lambda p: -statistics.median(row.get(p, 0.0) for row in runs[streams[0]]))
    for name in names + ["total"]:
        cells = [statistics.median(sum(row.values()) if name == "total" else row.get(name, 0.0) for row in runs[n])
                 for n in streams]
        if name == "total" or max(cells) >= 0.01:
            table.add_row(name, *[f"{c:.2f}" for c in cells])
    Console(width=120).print(table)


def plot(results: dict, path: Path) -> None:
    """Aggregate ingest (as a multiple of the engine's, same round) and answer p50 against the
    number of streams: medians, with the range over rounds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engine = results["engine"]
    counts = sorted(results["pipeline"], key=int)  # int keys, or str once read back from JSON
    ratios = [[row["aggregate_ingest_fps"] / e["ingest_fps"] for row, e in zip(results["pipeline"][n], engine)]
              for n in counts]
    latencies = [[row["latency_p50_s"] * 1000 for row in results["pipeline"][n]] for n in counts]
    streams = [int(n) for n in counts]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, values in ((left, ratios), (right, latencies)):
        middle = [statistics.median(v) for v in values]
        axis.errorbar(streams, middle, yerr=[[m - min(v) for m, v in zip(middle, values)],
                                             [max(v) - m for m, v in zip(middle, values)]],
                      marker="o", capsize=3, label="Ray pipeline")
        axis.set_xscale("log", base=2)
        axis.set_xticks(streams, [str(n) for n in streams])
        axis.set_xlabel("concurrent streams")
        axis.grid(alpha=0.3)
    left.axhline(1.0, color="gray", linestyle="--", label="engine (1 stream, in-process)")
    left.axhline(0.9, color="red", linestyle=":", label="target at 1 stream")
    left.set_ylabel("aggregate ingest fps / engine fps")
    right.axhline(statistics.median(e["latency_p50_s"] * 1000 for e in engine), color="gray", linestyle="--",
                  label="engine")
    right.set_ylabel("answer latency p50 (ms)")
    left.legend()
    right.legend()
    fig.suptitle(f"{results['method']}, {results['size']} model, {results['frames_per_stream']} frames per stream")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
