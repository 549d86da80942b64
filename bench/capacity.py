"""Live-stream capacity: bench.load, with the CPU each process of the local runtime used meanwhile.

    python -m bench.capacity --streams 100 --fps 0.5 --chunk-s 2 --duration 60 --question-rate 0.25 \\
        --poll-s 10 --server-arg max_streams=256 --ready-timeout 120 --name capacity_100

Every argument is bench.load's (it runs bench.load.main in this process, which starts the local
Ray runtime as its descendants). A thread samples every 2 s the CPU seconds used so far by this
process and its descendants, by process title (bench.procs.cpu_seconds: "ray::DecoderHost",
"ray::ProxyActor", "python" for this driver, ...), the node's load average and the CPU the whole
machine used (/proc/stat: other users' processes too). Written to <out>/<name>_cpu.json and
printed: for the live window (the workload clock's 0 to --duration, bench.load's "t0_wall"), CPU
cores used by each title, in all, per stream and per frame ingested in the window, and the share of
the machine's busy time that was this runtime's. CPU seconds per frame is the figure that does
not depend on how busy the machine was (a shared machine slows the run but does not, to first
order, change the work per frame); cores / (per-stream cores) is then what a quiet machine of
this many cores would hold, if nothing else limits it first.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from bench.procs import cpu_seconds

SAMPLE_S = 2.0


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [float(v) for v in f.readline().split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return (sum(fields) - idle) / ticks, sum(fields) / ticks


class Sampler(threading.Thread):
    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.samples, self.stop = root, [], threading.Event()

    def sample(self) -> None:
        busy, total = machine_cpu()
        self.samples.append({"t": time.time(), "load": os.getloadavg(), "machine_busy_s": busy,
                             "machine_total_s": total, "cpu": dict(cpu_seconds(self.root))})

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(SAMPLE_S)


def nearest(samples: list[dict], t: float) -> dict:
    return min(samples, key=lambda s: abs(s["t"] - t))


def window_figures(samples: list[dict], load: dict) -> dict:
    """CPU by title over the live window, per stream and per frame ingested in it."""
    t0, duration = load["t0_wall"], load["config"]["duration"]
    a, b = nearest(samples, t0), nearest(samples, t0 + duration)
    seconds = b["t"] - a["t"]
    if seconds <= 0:
        return {}
    cores = {k: (v - a["cpu"].get(k, 0.0)) / seconds for k, v in b["cpu"].items()}
    cores = {k: round(v, 4) for k, v in sorted(cores.items(), key=lambda kv: -kv[1]) if v > 0.0005}
    polls = load["samples"]
    ingested = None
    if polls:
        first = nearest(polls, a["t"] - t0)
        last = nearest(polls, b["t"] - t0)
        ingested = sum((v.get("frames_ingested") or 0) for v in last["streams"].values()) - \
            sum((v.get("frames_ingested") or 0) for v in first["streams"].values())
    # chunks whose push completed in the window: the work the window did (ingest lags pushes by
    # up to a decoder chunk, so frames ingested undercount it while the pushes run late)
    pushed = sum(1 for r in load["requests"] if r["kind"] in ("push", "first_push") and r["error"] is None
                 and a["t"] - t0 <= r["t"] + (r["latency_s"] or 0.0) <= b["t"] - t0)
    streams = load["config"]["streams"]
    total = sum(cores.values())
    machine = (b["machine_busy_s"] - a["machine_busy_s"]) / seconds
    return {
        "window_s": round(seconds, 1), "cores_by_process": cores, "cores_total": round(total, 3),
        "cores_per_stream": round(total / streams, 5),
        "frames_ingested_in_window": ingested,
        "cpu_ms_per_frame_ingested": round(1000 * total * seconds / ingested, 1) if ingested else None,
        "chunks_pushed_in_window": pushed,
        "cpu_ms_per_chunk_pushed": round(1000 * total * seconds / pushed, 1) if pushed else None,
        "machine_busy_cores": round(machine, 3), "share_of_machine": round(total / machine, 3) if machine else None,
        "load_average_start": a["load"], "load_average_end": b["load"],
    }


def main(argv: list[str] | None = None) -> int:
    from bench import load as bench_load

    argv = list(sys.argv[1:] if argv is None else argv)
    args = bench_load.parse(argv)
    sampler = Sampler(os.getpid())
    sampler.sample()
    started = {"t": time.time(), "load": os.getloadavg()}
    sampler.start()
    try:
        code = bench_load.main(argv)
    finally:
        sampler.stop.set()
        sampler.join()
    out = {"command": "python -m bench.capacity " + " ".join(argv), "started": started,
           "ended": {"t": time.time(), "load": os.getloadavg()}, "exit_status": code}
    result = Path(args.out) / f"{args.name}.json"
    if result.exists() and code in (0, 1):
        load = json.loads(result.read_text())
        out["live_window"] = window_figures(sampler.samples, load)
        out["summary"] = load["summary"]
    out["samples"] = sampler.samples
    (Path(args.out) / f"{args.name}_cpu.json").write_text(json.dumps(out, indent=1))
    figures = out.get("live_window", {})
    print(json.dumps({k: v for k, v in figures.items()}, indent=1))
    print(f"load average at the start {started['load']}, at the end {out['ended']['load']}")
    return code


if __name__ == "__main__":
    sys.exit(main())
