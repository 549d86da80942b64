"""What the Ray pipeline's data path costs on CPU (issue 19), measured from outside the coordinator:
Ray calls per ingested chunk by actor method, payload bytes through the coordinator's process per
frame, and the Ray processes' memory (PSS) against the streams' retained KV, by answer actors.

    python -m bench.pipeline_cost [--answerers 1 2 4] [--streams 4] [--frames 1200] [--method rekv] [--model models/demo]
    python -m bench.pipeline_cost --fast    # a CPU-fast check: 1 stream x 32 frames, 1 and 2 answer actors

One local Ray runtime (4 logical CPUs, actors at 0.1 CPU, one torch thread each, as bench.pipeline;
the dashboard on, since the state API reads Ray's task records through it). For each answer-actor
count: a coordinator with that many answer actors, a warm-up stream (2 chunks and a question,
deleted), the streams created, then three windows:
- idle (IDLE_S): nothing sent; the coordinator's TCP counters give its idle rate (heartbeats,
  metrics and task-event reports);
- ingest: every stream ingests its frames (synthetic world, a seed per stream) in numbered chunks
  of 8, four in flight per stream (bench.pipeline's driver, as a decoder actor for a file), then
  memory(sid) for each (it waits until every update reached every replica and the index);
- questions: one question per stream, one after another.
Then the coordinator and its actors are removed and the next count starts.

Calls: Ray's own task records (ray.util.state.list_tasks, per live actor), those created within a
window, by actor class and method, divided by the window's chunks (questions); the memory() calls
that close the ingest window are left out. Payload through the coordinator per frame: (a) bytes
sent and received on its process's TCP sockets (Ray's gRPC, which carries objects under 100 KiB
inline; framing and control messages included), minus the idle rate over the window; (b) what
its process serialized plus
deserialized (bench/serial_meter.py, a worker setup hook: every transport, the shared-memory
object store included). Memory: PSS of every process of the Ray runtime (this driver's
descendants) before the streams are created and once they hold their frames, against the streams'
retained KV (the sum of coordinator.memory(sid)["total"]). Writes bench/results/pipeline_cost.json
(pipeline_cost_<method>.json for another preset).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import ray
from rich.console import Console
from rich.table import Table

from actors.coordinator import StreamCoordinator
from bench import serial_meter
from bench.engine import CHUNK, QUESTIONS, frames_for
from bench.pipeline import IN_FLIGHT
from bench.procs import descendants, processes, pss, title

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "demo"
IDLE_S = 3.0
RECORDS_WAIT_S = 60.0  # workers report task events to the GCS every second (later on a loaded machine)
MEASUREMENT_CALLS = {"StreamCoordinator.memory", "AnswerWorker.memory"}  # this benchmark's, closing the window
ROLES = ("ray::StreamCoordinator", "ray::PrefillWorker", "ray::CompressorWorker", "ray::AnswerWorker")


def ray_pss(driver: int) -> dict[str, int]:
    """PSS bytes of every process of the runtime this driver started, summed by process title."""
    procs = processes()
    titles = {pid: title(cmd) for pid, _, cmd, _ in procs}
    by_title: Counter = Counter()
    for pid in descendants(driver, procs):
        by_title[titles.get(pid, "?")] += pss(pid) or 0
    return dict(by_title)


def socket_bytes(pid: int) -> int | None:
    """Bytes sent plus received so far on the process's open TCP sockets (the kernel's tcp_info,
    read with `ss`): Ray's gRPC between workers, which carries objects under 100 KiB inline.
    (/proc/<pid>/io's rchar/wchar do not count it: gRPC uses sendmsg/recvmsg.) None without ss."""
    try:
        out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    total, mine = 0, False
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):  # a socket's line, its users; its counters follow
            mine = f"pid={pid}," in line
        elif mine:
            total += sum(int(m) for m in re.findall(r"\bbytes_(?:sent|received):(\d+)", line))
    return total


def _delta(after: int | None, before: int | None) -> float:
    return math.nan if after is None or before is None else after - before


def _now_ms() -> float:
    """Wall-clock ms, comparable with Ray's task records (whole ms, truncated: a window opens
    1 ms early so that a call made in its first ms counts)."""
    return time.time() * 1000 - 1


def meter(folder: Path, pid: int) -> int:
    totals = serial_meter.settled(folder, pid)
    return totals["serialized_bytes"] + totals["deserialized_bytes"]


def task_counts(address: str, actors: list[str], start_ms: float, end_ms: float) -> Counter:
    """Tasks of these actors created in [start_ms, end_ms), by "Class.method" (Ray's records)."""
    from ray.util.state import list_tasks

    counts: Counter = Counter()
    for actor_id in actors:
        for task in list_tasks(address=address, filters=[("actor_id", "=", actor_id)], limit=10_000, detail=True,
                               raise_on_missing_output=False):
            if task.creation_time_ms is not None and start_ms <= task.creation_time_ms < end_ms:
                counts[task.func_or_class_name] += 1
    return counts


def records(address: str, actors: list[str], ingest_ms: tuple[float, float], asked_ms: tuple[float, float],
            chunks: int, streams: int) -> tuple[Counter, Counter]:
    """The ingest and question windows' task counts, once Ray's records hold them: every chunk's
    ingest call and every stream's question (the driver's), and the memory calls that closed the
    ingest window (the coordinator's last calls in it); incomplete after RECORDS_WAIT_S, as they are."""
    until = time.monotonic() + RECORDS_WAIT_S
    while True:
        time.sleep(2.0)
        calls, questions = task_counts(address, actors, *ingest_ms), task_counts(address, actors, *asked_ms)
        if ((calls["StreamCoordinator.ingest"] >= chunks and calls["AnswerWorker.memory"] >= streams
             and questions["StreamCoordinator.ask"] >= streams and questions["AnswerWorker.ask"] >= streams)
                or time.monotonic() > until):
            return calls, questions


def live_actors(address: str) -> dict[str, tuple[str, int]]:
    """actor id -> (class name, pid) of every live actor."""
    from ray.util.state import list_actors

    return {a.actor_id: (a.class_name, a.pid) for a in list_actors(address=address, filters=[("state", "=", "ALIVE")],
                                                                    limit=10_000, raise_on_missing_output=False)}


def ingest(coordinator, ids: list[str], videos: list[np.ndarray]) -> None:
    """Every stream's frames in numbered chunks, IN_FLIGHT unfinished per stream (bench.pipeline's)."""
    in_flight = []
    for seq, i in enumerate(range(0, len(videos[0]), CHUNK)):
        in_flight.append([coordinator.ingest.remote(sid, video[i : i + CHUNK], None, seq)
                          for sid, video in zip(ids, videos)])
        if len(in_flight) == IN_FLIGHT:
            ray.get(in_flight.pop(0))
    ray.get([ref for refs in in_flight for ref in refs])


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def measure(model_dir: Path, method: str, answerers: int, videos: list[np.ndarray], address: str,
            meter_dir: Path) -> dict:
    driver, frames = os.getpid(), sum(len(v) for v in videos)
    coordinator = ray.remote(StreamCoordinator).options(num_cpus=0.1).remote(str(model_dir), answerers=answerers)
    _log(f"{answerers} answer actor(s): starting the actors, warm-up")
    try:
        ray.get(coordinator.create_stream.remote("warm-up", method))  # every actor up, its model loaded
        ingest(coordinator, ["warm-up"], [videos[0][: 2 * CHUNK]])
        ray.get(coordinator.ask.remote("warm-up", QUESTIONS[0], 8))
        ray.get(coordinator.delete_stream.remote("warm-up"))
        actors = live_actors(address)
        [pid] = [p for cls, p in actors.values() if cls == "StreamCoordinator"]
        pss_before = ray_pss(driver)
        ids = [f"cost-{answerers}-{i}" for i in range(len(videos))]
        ray.get([coordinator.create_stream.remote(sid, method) for sid in ids])

        io_start, idle_start = socket_bytes(pid), time.perf_counter()
        time.sleep(IDLE_S)
        idle_rate = _delta(socket_bytes(pid), io_start) / (time.perf_counter() - idle_start)

        _log(f"ingesting {len(videos)} x {len(videos[0])} frames")
        io_start, serial_start = socket_bytes(pid), meter(meter_dir, pid)
        start_ms, start = _now_ms(), time.perf_counter()
        ingest(coordinator, ids, videos)
        ingest_s = time.perf_counter() - start
        retained = sum(m["total"] for m in ray.get([coordinator.memory.remote(sid) for sid in ids]))
        window_s, end_ms = time.perf_counter() - start, _now_ms()
        io_used, serial_used = _delta(socket_bytes(pid), io_start), meter(meter_dir, pid) - serial_start
        pss_after = ray_pss(driver)

        _log(f"ingested in {ingest_s:.1f} s; questions, then Ray's task records")
        asked_ms = _now_ms()
        for sid in ids:
            ray.get(coordinator.ask.remote(sid, QUESTIONS[1], 8))
        asked_end_ms = _now_ms()
        chunks = len(videos) * -(-len(videos[0]) // CHUNK)
        calls, question_calls = records(address, list(actors), (start_ms, end_ms), (asked_ms, asked_end_ms),
                                        chunks, len(ids))
        ray.get([coordinator.delete_stream.remote(sid) for sid in ids])
    finally:
        ray.get(coordinator.shutdown.remote())
        ray.kill(coordinator)
    for name in MEASUREMENT_CALLS:
        calls.pop(name, None)
    pss_growth = {name: pss_after.get(name, 0) - pss_before.get(name, 0) for name in pss_before | pss_after}
    return {
        "answerers": answerers, "streams": len(videos), "frames": frames, "chunks": chunks, "ingest_s": ingest_s,
        "calls": dict(calls.most_common()), "calls_per_chunk": sum(calls.values()) / chunks,
        # every chunk's ingest call is one record: fewer means task events were dropped
        "records_complete": calls.get("StreamCoordinator.ingest", 0) == chunks,
        "question_calls": dict(question_calls.most_common()),
        "calls_per_question": sum(question_calls.values()) / len(videos),
        "coordinator_socket_bytes": io_used, "coordinator_idle_socket_bytes_per_s": idle_rate,
        "coordinator_socket_bytes_per_frame": (io_used - idle_rate * window_s) / frames,
        "coordinator_serialized_bytes": serial_used, "coordinator_serialized_bytes_per_frame": serial_used / frames,
        "frame_bytes": int(videos[0][0].nbytes),
        "retained_kv_bytes": int(retained), "pss_before": pss_before, "pss_after": pss_after,
        "pss_growth_bytes": sum(pss_growth.values()), "pss_growth_by_process": pss_growth,
        "pss_growth_of_kv": sum(pss_growth.values()) / retained,
        "pss_growth_roles_of_kv": sum(pss_growth.get(r, 0) for r in ROLES) / retained,
    }


def wait_for_exit(driver: int, timeout_s: float = 60.0) -> None:
    """Until no process of a removed coordinator's kinds is left (the next baseline starts clean)."""
    until = time.monotonic() + timeout_s
    while time.monotonic() < until and any(ray_pss(driver).get(r) for r in ROLES):
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answerers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--frames", type=int, default=1200, help="per stream (a multiple of 8)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--size", choices=["tiny", "medium", "large"],
                        help="a bench.pipeline model instead of --model (large: 64 tokens and 64 KiB of KV per frame and "
                             "layer, as against the demo's 4 and 2 KiB: per-block bookkeeping weighs as on a real model)")
    parser.add_argument("--method", default="rekv", help="preset (streamkv: guided compression, 2 more calls a segment)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fast", action="store_true", help="1 stream x 32 frames, 1 and 2 answer actors")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.fast:
        args.answerers, args.streams, args.frames = [1, 2], 1, 32
    videos = [frames_for(args.frames, seed=90_000 + i) for i in range(args.streams)]
    repo = str(Path(__file__).resolve().parent.parent)
    runs = []
    with tempfile.TemporaryDirectory() as meter_dir, tempfile.TemporaryDirectory() as model_dir:
        if args.size:
            from bench.pipeline import SIZES
            from synthetic.checkpoint import build_checkpoint

            args.model = build_checkpoint(Path(model_dir) / args.size, SIZES[args.size])
        ray.init(num_cpus=4, include_dashboard=True, log_to_driver=False,
                 runtime_env={"worker_process_setup_hook": serial_meter.HOOK,
                              "env_vars": {"PYTHONPATH": repo, "OMP_NUM_THREADS": str(args.threads),
                                           serial_meter.METER_DIR_ENV: meter_dir}})
        try:
            address = ray.get_runtime_context().gcs_address
            for n in args.answerers:
                runs.append(measure(args.model, args.method, n, videos, address, Path(meter_dir)))
                wait_for_exit(os.getpid())
        finally:
            ray.shutdown()
    results = {"model": args.size or str(args.model), "method": args.method, "streams": args.streams, "frames_per_stream": args.frames,
               "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "pipeline_cost" if args.method == "rekv" else f"pipeline_cost_{args.method}"
    name += f"_{args.size}" if args.size else ""
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1))
    report(results)
    return runs


def report(results: dict) -> None:
    runs, console = results["runs"], Console(width=130)
    heads = [f"{r['answerers']} answer actor(s)" for r in runs]
    title_ = (f"{results['streams']} stream(s) x {results['frames_per_stream']} frames, {results['method']}, "
              f"{Path(results['model']).name}")
    calls = Table("Ray calls per ingested chunk", *heads, title=f"Ray calls ({title_})")
    names = sorted({n for r in runs for n in r["calls"]}, key=lambda n: -max(r["calls"].get(n, 0) for r in runs))
    for name in names:
        calls.add_row(name, *[f"{r['calls'].get(name, 0) / r['chunks']:.2f}" for r in runs])
    calls.add_row("total per chunk", *[f"{r['calls_per_chunk']:.2f}" for r in runs])
    calls.add_row("records complete (ingest calls = chunks)", *[str(r["records_complete"]) for r in runs])
    calls.add_row("total per question", *[f"{r['calls_per_question']:.2f}" for r in runs])
    console.print(calls)
    payload = Table("through the coordinator's process, per frame", *heads, title="Payload")
    payload.add_row("TCP bytes sent + received, idle rate subtracted",
                    *[f"{r['coordinator_socket_bytes_per_frame'] / 1024:.1f} KiB" for r in runs])
    payload.add_row("serialized + deserialized", *[f"{r['coordinator_serialized_bytes_per_frame'] / 1024:.1f} KiB" for r in runs])
    payload.add_row("(one frame's pixels)", *[f"{r['frame_bytes'] / 1024:.1f} KiB" for r in runs])
    payload.add_row("(idle TCP rate)", *[f"{r['coordinator_idle_socket_bytes_per_s'] / 1024:.1f} KiB/s" for r in runs])
    console.print(payload)
    memory = Table("", *heads, title="Memory: PSS of the Ray runtime's processes against the retained KV")
    memory.add_row("retained KV (all streams)", *[f"{r['retained_kv_bytes'] / 2**20:.1f} MiB" for r in runs])
    memory.add_row("PSS before the streams", *[f"{sum(r['pss_before'].values()) / 2**20:.0f} MiB" for r in runs])
    memory.add_row("PSS growth", *[f"{r['pss_growth_bytes'] / 2**20:.1f} MiB" for r in runs])
    memory.add_row("growth / retained KV", *[f"{r['pss_growth_of_kv']:.2f}x" for r in runs])
    memory.add_row("  of which the pipeline's actors", *[f"{r['pss_growth_roles_of_kv']:.2f}x" for r in runs])
    by_process = defaultdict(dict)
    for i, r in enumerate(runs):
        for name, grown in r["pss_growth_by_process"].items():
            by_process[name][i] = grown
    for name, grown in sorted(by_process.items(), key=lambda item: -max(abs(v) for v in item[1].values())):
        if max(abs(v) for v in grown.values()) >= 2**20:
            memory.add_row(f"  {name}", *[f"{grown.get(i, 0) / 2**20:+.1f} MiB" for i in range(len(runs))])
    console.print(memory)


if __name__ == "__main__":
    main()
