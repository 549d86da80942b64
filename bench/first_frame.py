"""First-frame latency of a live upload: an MPEG-TS stream pushed in real time, one chunk per
second, into a push-mode decoder; the time from the first chunk to the first decoded frame, with
the decoder's probe (DecodeConfig.probe_s, 0.5 s) against FFmpeg's default (5 s), side by side
(both without FFmpeg's frame-rate estimate, which pushed streams skip since session 10).

    python -m bench.first_frame [--fps 1 4 15] [--rounds 3]

Writes bench/results/first_frame.json and .png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.engine import frames_for
from bench.figure import single_plot
from bench.load import encode_chunks
from pipeline.decode import DecodeConfig, PushBuffer, open_source

SECONDS = 8  # of video pushed
PROBES = {"probe_s=0.5 (streamkv)": 0.5, "probe_s=5 (FFmpeg's default)": 5.0}


def first_frame_s(fps: float, probe_s: float) -> float | None:
    """Seconds from the first pushed chunk to the first decoded frame (None: none while pushing)."""
    chunks, _ = encode_chunks(frames_for(int(SECONDS * fps)), fps, chunk_s=1.0)  # a keyframe each second
    push, got = PushBuffer(), threading.Event()

    def read():
        with open_source(push, DecodeConfig(read_timeout_s=30, probe_s=probe_s)) as source:
            next(iter(source))
            got.set()

    reader = threading.Thread(target=read, daemon=True)
    start = time.perf_counter()
    reader.start()
    for chunk in chunks:  # in real time: one second of video per second
        push.push(chunk)
        if got.wait(1.0):
            break
    latency = time.perf_counter() - start if got.is_set() else None
    push.close()
    reader.join(30)
    return latency


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fps", type=float, nargs="+", default=[1.0, 4.0, 15.0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    results = {str(fps): {name: [] for name in PROBES} for fps in args.fps}
    for _ in range(args.rounds):
        for fps in args.fps:
            for name, probe_s in PROBES.items():  # side by side, round after round
                results[str(fps)][name].append(first_frame_s(fps, probe_s))
    table = Table(title=f"First decoded frame of a live upload (1 chunk/s, medians of {args.rounds})")
    table.add_column("fps", justify="right")
    for name in PROBES:
        table.add_column(name, justify="right")
    for fps, row in results.items():
        table.add_row(fps, *[_shown(_median(row[name])) for name in PROBES])
    Console().print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "first_frame.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "first_frame.png")
    return results


def _median(latencies: list[float | None]) -> float:
    return statistics.median(float("inf") if s is None else s for s in latencies)


def _shown(seconds: float) -> str:
    return f"none in {SECONDS} s" if seconds == float("inf") else f"{seconds:.2f} s"


def plot(results: dict, path: Path) -> None:
    rates = list(results)
    width = 0.8 / len(PROBES)
    with single_plot(path) as ax:
        for i, name in enumerate(PROBES):
            heights = [min(_median(results[f][name]), SECONDS) for f in rates]  # none while pushing: drawn at the end
            ax.bar([r + i * width for r in range(len(rates))], heights, width, label=name)
        ax.set(xticks=[r + width / 2 for r in range(len(rates))], xticklabels=[f"{float(f):g} fps" for f in rates],
               ylabel=f"seconds to the first frame (at most {SECONDS}: none)", title="Live upload, one chunk per second")
        ax.legend()


if __name__ == "__main__":
    main()
