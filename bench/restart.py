"""Coordinator restart benchmark: how long N streams are unavailable when the coordinator's
process dies, against starting a coordinator from nothing, in one run.

    python -m bench.restart [--streams 1 4 16] [--frames 64] [--size tiny] [--rounds 3]

Per round and stream count: a named coordinator is started (cold start: until it has created the
first stream, i.e. its prefill, compressor and answer actors are up with the model loaded);
every stream ingests the same frames (chunks of 8, all streams at once) and asks bench.engine's
first question; then the coordinator's process is killed and Ray restarts it. Takeover: from the
kill until the new process answers with every stream's status; first answer: until every stream
has answered the question again (each answer must equal the one before the kill). Writes
bench/results/restart.json and .png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import ray
from rich.console import Console
from rich.progress import track
from rich.table import Table

from bench.engine import CHUNK, QUESTIONS, frames_for
from bench.figure import single_plot
from bench.pipeline import SIZES
from deploy.ingest import named_coordinator, stop_coordinator
from synthetic.checkpoint import build_checkpoint


def _wait(probe, timeout_s: float = 300.0):
    """probe() once the coordinator answers it (ray.kill returns before the old process is gone:
    the probe says whether the answer came from the new one)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = probe()
            if result is not None:
                return result
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            pass
        time.sleep(0.05)
    raise TimeoutError("the coordinator did not come back")


def restart_run(model_dir: Path, streams: int, method: str, options: dict, frames: np.ndarray) -> dict:
    name = f"bench-restart-{uuid.uuid4().hex[:8]}"
    ids = [f"s{i}" for i in range(streams)]
    start = time.perf_counter()
    handle = named_coordinator(name, str(model_dir))
    try:
        ray.get(handle.create_stream.remote(ids[0], method, options))
        cold_start = time.perf_counter() - start
        ray.get([handle.create_stream.remote(sid, method, options) for sid in ids[1:]])
        for i in range(0, len(frames), CHUNK):
            ray.get([handle.ingest.remote(sid, frames[i : i + CHUNK]) for sid in ids])
        before = ray.get([handle.ask.remote(sid, QUESTIONS[0], 8) for sid in ids])
        start = time.perf_counter()
        ray.kill(handle, no_restart=False)
        _wait(lambda: [ray.get(handle.status.remote(sid)) for sid in ids]
              if ray.get(handle.status.remote(ids[0]))["adopted"] else None)
        takeover = time.perf_counter() - start
        after = ray.get([handle.ask.remote(sid, QUESTIONS[0], 8) for sid in ids])
        first_answer = time.perf_counter() - start
    finally:
        stop_coordinator(name)
    same = sum(a["token_ids"] == b["token_ids"] and a["evidence"] == b["evidence"] for a, b in zip(before, after))
    return {"cold_start_s": cold_start, "takeover_s": takeover, "first_answer_s": first_answer,
            "same_answers": same, "streams": streams}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--frames", type=int, default=64, help="frames per stream")
    parser.add_argument("--method", default="rekv")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    frames = frames_for(args.frames)
    results = {"method": args.method, "size": args.size, "frames_per_stream": args.frames,
               "runs": {n: [] for n in args.streams}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_checkpoint(Path(tmp) / "bench", SIZES[args.size])
        options = {}  # the preset as it is: the actors scale it to their model (make_config)
        repo = str(Path(__file__).resolve().parent.parent)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}})
        try:
            for _ in track(range(args.rounds), description="rounds"):
                for n in args.streams:
                    results["runs"][n].append(restart_run(model_dir, n, args.method, options, frames))
        finally:
            ray.shutdown()
    print_table(results, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "restart.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "restart.png")
    return results


def print_table(results: dict, args) -> None:
    table = Table(title=f"Coordinator restart ({args.method}, {args.size} model, {args.frames} frames per stream, "
                        f"medians of {args.rounds} rounds)")
    for column in ("streams", "cold start", "takeover", "takeover / cold start", "first answers", "same answers"):
        table.add_column(column, justify="right")
    for n, runs in results["runs"].items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("cold_start_s", "takeover_s", "first_answer_s")}
        ratio = statistics.median(r["takeover_s"] / r["cold_start_s"] for r in runs)
        table.add_row(str(n), f"{med['cold_start_s']:.2f} s", f"{med['takeover_s']:.2f} s", f"{ratio:.2f}x",
                      f"{med['first_answer_s']:.2f} s", f"{sum(r['same_answers'] for r in runs)}/{n * len(runs)}")
    Console().print(table)


def plot(results: dict, path: Path) -> None:
    counts = [int(n) for n in results["runs"]]  # (str keys once read back from the JSON)
    with single_plot(path) as ax:
        for key, label in (("cold_start_s", "cold start (no streams)"), ("takeover_s", "takeover after a kill"),
                           ("first_answer_s", "every stream answered again")):
            ax.plot(counts, [statistics.median(r[key] for r in runs) for runs in results["runs"].values()],
                    marker="o", label=label)
        ax.set(xscale="log", xticks=counts, xticklabels=[str(n) for n in counts], xlabel="streams", ylabel="seconds",
               title=f"Coordinator restart ({results['size']} model, {results['frames_per_stream']} frames per stream)")
        ax.legend()


if __name__ == "__main__":
    main()
