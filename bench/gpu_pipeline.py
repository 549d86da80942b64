"""The Ray pipeline itself on one GPU: how many real-time 0.5 fps streams one StreamCoordinator
(prefill, compressor and answer actors on one device) sustains, per method, within a hard time
budget that fits one device call.

    python -m bench.gpu_pipeline --out $OUT                    # CUDA: LLaVA-OV-7B architecture, random bf16
    python -m bench.gpu_pipeline --device cpu                 # anywhere: the tiny model on CPU (tests: small)
    bash bench/device_gpu_pipeline.sh                          # the one command for a lent GPU machine

The model: the LLaVA-OneVision-7B architecture with seeded random bf16 weights, built inside each
model actor on the device (bench/random_weights.py; weights cannot be downloaded here), or on CPU
the tiny BENCH_SPEC model (or any checkpoint directory, --checkpoint). Per method (default livevlm,
then rekv), with the remaining budget split between the methods still to run:
1. burst: --burst-streams fresh streams fed as fast as the pipeline takes them (chunks of 8, 4 in
   flight per stream, as bench.pipeline) for --burst-s: the aggregate encode frames/s;
2. context: --question-streams streams get --context-frames frames the same way (questions go to
   them, so answers read a stream longer than rekv's 76-frame local window: retrieval runs);
3. ramp: N real-time streams (the question streams plus N - Q fresh ones), one frame per stream
   every 2 s through coordinator.ingest, staggered, for --window-s, questions through ask_stream
   at --question-rate; bench/realtime.py says when a step counts as sustained. Fresh streams get
   0..7 frames at once first (realtime.stagger), so that their segments (8 frames = 16 s: the
   language model's prefill) close at spread times in the window, as in a steady state. N starts
   from the burst's rate (0.7 x frames/s / 0.5), doubles (or halves) until the verdict flips, then
   bisects to --resolution, while the method's share of the budget lasts. Fresh streams are deleted after
   each step (the actors keep every stream's KV on the device).
Then: model copies (actors holding model weights, read inside each actor through Ray's
__ray_call__, as is torch.cuda.max_memory_allocated), peak GPU memory per actor, host memory
(PSS of every process of the Ray runtime) and object-store use at the largest sustained step.
Writes <out>/gpu_pipeline[_cpu].json and .png; prints a line per phase and step.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the budget counts from here: the imports below take seconds too

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import ray

from bench import random_weights
from bench.engine import QUESTIONS
from bench.gpu_pipeline_report import GOALS, goals_table, host_memory, plot, probe_actors, summary
from bench.realtime import FramePool, Stream, feed, run_step, stagger
from pipeline.config import make_config

FPS = 0.5
CHUNK = 8


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--methods", nargs="+", default=["livevlm", "rekv"])
    parser.add_argument("--model", choices=sorted(random_weights.SPECS), help="random-weight architecture "
                        "(default: llava-ov-7b on CUDA, tiny on CPU)")
    parser.add_argument("--checkpoint", type=Path, help="a real checkpoint directory instead (e.g. models/demo)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="hard limit for the whole run, setup included")
    parser.add_argument("--window-s", type=float, default=20.0,
                        help="seconds per ramp step (longer than a segment: 8 frames at 0.5 fps)")
    parser.add_argument("--burst-s", type=float, help="seconds of the saturating burst (default 10 / 3)")
    parser.add_argument("--burst-streams", type=int, help="(default 16 / 2)")
    parser.add_argument("--question-streams", type=int, help="streams that take the questions (default 2 / 1)")
    parser.add_argument("--context-frames", type=int, help="frames each question stream gets first (default 120 / 8)")
    parser.add_argument("--question-rate", type=float, help="questions per second, in all (default 0.5 / 0.25)")
    parser.add_argument("--max-new-tokens", type=int, help="(default 32 / 8)")
    parser.add_argument("--start-streams", type=int, help="first ramp step (default: from the burst's rate)")
    parser.add_argument("--max-streams", type=int, help="largest step tried (default 512 / 16)")
    parser.add_argument("--resolution", type=float, default=0.1, help="stop bisecting at this relative gap")
    parser.add_argument("--max-lag-s", type=float, default=2 / FPS, help="lag bound (p95, second half of a window)")
    parser.add_argument("--max-slope", type=float, default=0.05, help="lag growth bound (s per s)")
    parser.add_argument("--grace-s", type=float, default=1 / FPS, help="after a window, time for its last frames")
    parser.add_argument("--answerers", type=int, default=1)
    parser.add_argument("--actor-cpus", type=float, help="CPUs per model actor (default 2 / 0.25)")
    parser.add_argument("--threads", type=int, help="torch threads per actor (default 4 / 1)")
    parser.add_argument("--num-cpus", type=float, help="Ray's logical CPUs (default: the machine's / 4)")
    parser.add_argument("--object-store-gib", type=float, help="(default 16 / 0.5)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    defaults = dict(burst_s=(10, 3), burst_streams=(16, 2), question_streams=(2, 1),
                    context_frames=(120, 8), question_rate=(0.5, 0.25), max_new_tokens=(32, 8), max_streams=(512, 16),
                    actor_cpus=(2, 0.25), threads=(4, 1), num_cpus=(os.cpu_count(), 4), object_store_gib=(16, 0.5),
                    model=("llava-ov-7b", "tiny"))
    for name, (gpu, cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, gpu if cuda else cpu)
    if args.question_streams < 1 or args.budget_s <= 0 or args.window_s <= 0:
        parser.error("need --question-streams >= 1 and positive --budget-s, --window-s")
    return args


class Clock:
    """The run's hard budget: what is left, and a per-method share of it."""

    RESERVE_S = 15.0  # for the report, the plot and Ray's shutdown

    def __init__(self, budget_s: float, start: float):
        self.start, self.budget_s = start, budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.RESERVE_S - self.elapsed()


def start(args, clock: Clock, log) -> tuple:
    """Ray, the coordinator and its model actors (loaded once the first stream is created)."""
    from actors.coordinator import StreamCoordinator

    repo = str(Path(__file__).resolve().parent.parent)
    if args.checkpoint:
        model_dir, size = str(args.checkpoint.resolve()), _checkpoint_frame_size(args.checkpoint)
    else:
        model_dir = str(random_weights.write_marker(Path(tempfile.mkdtemp()) / f"{args.model}-random", args.model))
        size = random_weights.frame_size(args.model)
    gpus = 1 if args.device == "cuda" else 0
    # a container's /dev/shm may be smaller than the store: Ray then refuses a store over 10 GB
    # unless told that a file-backed one will do
    os.environ.setdefault("RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE", "1")
    pythonpath = os.pathsep.join(p for p in [repo, *os.environ.get("PYTHONPATH", "").split(os.pathsep)] if p)
    ray.init(num_cpus=args.num_cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=int(args.object_store_gib * 2**30),
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath,
                                       "OMP_NUM_THREADS": str(args.threads), "RAY_USAGE_STATS_ENABLED": "0"},
                          "worker_process_setup_hook": random_weights.HOOK})
    share = 0.99 / (1 + args.answerers)  # prefill and answer actors on the one GPU (the compressor loads no model)
    placement = {kind: {"num_gpus": share} for kind in ("prefill", "answerer")} if gpus else {}
    coordinator = ray.remote(StreamCoordinator).options(num_cpus=min(1.0, args.actor_cpus), max_concurrency=10_000).remote(
        model_dir, device=args.device, answerers=args.answerers, actor_cpus=args.actor_cpus, placement=placement)
    log(f"Ray up, coordinator started ({clock.elapsed():.0f} s); loading the model actors ({model_dir})")
    # the first creation waits for every model actor to load its model; then a warm-up stream
    ray.get(coordinator.create_stream.remote("warmup", "rekv"), timeout=max(1.0, clock.left()))
    log(f"model actors loaded ({clock.elapsed():.0f} s)")
    pool = FramePool(size)
    feed(coordinator, [Stream("warmup", interval=1 / FPS)], pool, CHUNK, per_stream=2 * CHUNK)
    list(coordinator.ask_stream.options(num_returns="streaming").remote("warmup", QUESTIONS[0], 4))
    ray.get(coordinator.delete_stream.remote("warmup"))
    log(f"warmed up ({clock.elapsed():.0f} s)")
    return coordinator, pool, size


def _checkpoint_frame_size(path: Path) -> int:
    return json.loads((path / "config.json").read_text())["vision_config"]["image_size"]


class Streams:
    """Creates and deletes a method's streams through the coordinator (fresh ids every time)."""

    def __init__(self, coordinator, method: str):
        self.coordinator, self.method, self.ids = coordinator, method, iter(range(1 << 30))

    def create(self, count: int) -> tuple[list[Stream], float]:
        streams = [Stream(f"{self.method}-{next(self.ids)}", interval=1 / FPS) for _ in range(count)]
        began = time.perf_counter()
        ray.get([self.coordinator.create_stream.remote(s.stream_id, self.method) for s in streams])
        return streams, time.perf_counter() - began

    def delete(self, streams: list[Stream]) -> float:
        """Delete streams, some of which may be lost already (their deletion's error is ignored)."""
        began = time.perf_counter()
        for ref in [self.coordinator.delete_stream.remote(s.stream_id) for s in streams]:
            try:
                ray.get(ref, timeout=120)
            except Exception:  # noqa: BLE001, S110 - a lost stream is gone anyway
                pass
        return time.perf_counter() - began


def next_count(n: int, sustained: bool, lo: int, hi: int | None, args) -> tuple[int | None, int, int | None]:
    """Doubling (halving) until the verdict flips, then bisection: the next stream count, or None
    when the bracket [lo sustained, hi not] is narrow enough or the range is used up."""
    if sustained:
        lo = max(lo, n)
        n = (lo + hi) // 2 if hi else min(2 * n, args.max_streams)
    else:
        hi = min(hi or n, n)
        n = (lo + hi) // 2 if lo else n // 2
    narrow = lo and hi and hi - lo <= max(1, args.resolution * lo)
    return (None if narrow or n < args.question_streams or n in (lo, hi) else n), lo, hi


def measure_method(coordinator, method: str, args, clock: Clock, deadline: float, pool: FramePool, log) -> dict:
    """Burst, context, then the ramp, until `deadline` (clock.elapsed() seconds)."""
    streams = Streams(coordinator, method)
    config = make_config(method)
    segment = config.segment_frames if config.segmentation == "uniform" else config.min_frames
    out: dict = {"method": method, "steps": [], "segment_frames": segment}
    if args.window_s < segment / FPS:
        log(f"{method}: the window ({args.window_s:g} s) is shorter than a segment ({segment / FPS:g} s of frames): "
            "streams close fewer segments in it than in steady state")
    burst, _ = streams.create(args.burst_streams)
    out["burst"] = feed(coordinator, burst, pool, CHUNK, seconds=args.burst_s)
    streams.delete(burst)
    log(f"{method}: burst of {args.burst_streams} streams: {out['burst']['fps']:.1f} frames/s aggregate encode")

    def question_streams() -> list[Stream]:
        asked, _ = streams.create(args.question_streams)
        out["context"] = feed(coordinator, asked, pool, CHUNK, per_stream=args.context_frames)
        return asked

    asked = question_streams()
    log(f"{method}: {len(asked)} question stream(s) hold {asked[0].frames} frames each")
    n = args.start_streams or int(0.7 * out["burst"]["fps"] / FPS)
    n: int | None = min(max(n, len(asked)), args.max_streams)
    lo, hi, step_cost = 0, None, args.window_s + args.grace_s + 5
    while n is not None:
        if clock.elapsed() + step_cost > deadline:
            out["stopped"] = "method's budget spent"
            break
        began, fresh = time.perf_counter(), []
        try:
            fresh, create_s = streams.create(n - len(asked))
            stagger_s = stagger(coordinator, fresh, pool, segment)
            probe_actors(coordinator, reset=True, empty=True)
            result = run_step(coordinator, asked + fresh, pool, args.window_s, fps=FPS, question_streams=asked,
                              question_rate=args.question_rate, questions=QUESTIONS, max_new_tokens=args.max_new_tokens,
                              grace_s=args.grace_s, max_lag_s=args.max_lag_s, max_slope=args.max_slope,
                              abort_backlog=int(4 * args.max_lag_s * FPS) + 1,
                              drain_timeout_s=max(5.0, min(60.0, deadline - clock.elapsed())), log=log).to_dict()
            result.update(create_s=create_s, stagger_s=stagger_s, actors=probe_actors(coordinator), host=host_memory())
        except Exception as error:  # noqa: BLE001 - e.g. a device out of memory while creating streams
            result = {"streams": n, "sustained": False, "errors": [f"{type(error).__name__}: {error}"[:300]],
                      "drain_s": 0.0, "reason": "the step failed"}
            log(f"  {n} streams: step failed: {result['errors'][0]}")
        result["delete_s"] = streams.delete(fresh)
        result["wall_s"] = step_cost = time.perf_counter() - began
        out["steps"].append(result)
        if result["drain_s"] is None:
            out["stopped"] = "a step's backlog did not drain: later steps would not start clean"
            break
        if result["errors"]:  # the question streams may be lost with it: they start afresh
            streams.delete(asked)
            asked = question_streams()
        n, lo, hi = next_count(n, result["sustained"], lo, hi, args)
    out.setdefault("stopped", "bracket narrow enough or range used up")
    streams.delete(asked)
    best = [s for s in out["steps"] if s["sustained"] and s["streams"] == lo]
    out.update(max_sustained_streams=lo, bracket=[lo, hi], at_max=best[-1] if best else None)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    clock = Clock(args.budget_s, STARTED)
    log = lambda message: print(f"[{clock.elapsed():6.1f} s] {message}", flush=True)  # noqa: E731
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu_pipeline{'' if args.device == 'cuda' else '_cpu'}.json"
    report: dict = {"command": " ".join([Path(sys.executable).name, "-m", "bench.gpu_pipeline", *(argv or sys.argv[1:])]),
                    "device": _device_name(args.device), "host": platform.node(), "fps": FPS, "goals": GOALS,
                    "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "methods": {}}
    try:
        coordinator, pool, size = start(args, clock, log)
        report.update(model=args.checkpoint.name if args.checkpoint else f"{args.model}-random", frame_size=size,
                      setup_s=clock.elapsed(), actors=probe_actors(coordinator), host_idle=host_memory())
        report["model_copies"] = sum(1 for a in report["actors"] if a["model_bytes"])
        log(f"model copies: {report['model_copies']} ({', '.join(a['kind'] for a in report['actors'] if a['model_bytes'])})")
        for i, method in enumerate(args.methods):
            deadline = clock.elapsed() + clock.left() / (len(args.methods) - i)
            log(f"{method}: until {deadline:.0f} s")
            report["methods"][method] = measure_method(coordinator, method, args, clock, deadline, pool, log)
            path.write_text(json.dumps(report, indent=1, default=str))
    except Exception as error:  # noqa: BLE001 - what was measured is still written
        report["error"] = f"{type(error).__name__}: {error}"
        log(f"FAILED: {report['error']}")
    finally:
        report["elapsed_s"] = clock.elapsed()
        report["summary"] = summary(report)
        path.write_text(json.dumps(report, indent=1, default=str))
        if report["methods"]:
            plot(report, path.with_suffix(".png"))
        print(goals_table(report), flush=True)
        ray.shutdown()
        log("Ray shut down")
    log(f"wrote {path}" + (f" and {path.with_suffix('.png').name}" if report["methods"] else ""))
    if "error" in report:
        sys.exit(1)
    return report


def _device_name(device: str) -> str:
    if device != "cuda":
        return f"cpu ({os.cpu_count()} cores)"
    from bench.gpu_pipeline_report import gpu_name

    return gpu_name() or "cuda"


if __name__ == "__main__":
    main()
