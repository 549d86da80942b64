"""What bench.gpu_pipeline reads from the running pipeline besides timings (model copies, GPU and
host memory), and how it reports: the goals of issue 19 beside the figures, and one plot."""

from __future__ import annotations

import os
import shutil
import subprocess

import ray

from bench.figure import single_plot
from bench.procs import descendants, processes, pss, title

# Issue 19's goals for one GPU (LLaVA-OV-7B architecture)
GOALS = {"streams": {"livevlm": 100, "rekv": 60}, "ttft_p50_s": 0.5, "decode_tokens_per_s": 150.0, "encode_fps": 150.0}
MiB = 2**20


def _probe(instance, reset: bool, empty: bool = False) -> dict:
    """Runs inside a model actor (Ray's __ray_call__): its process, the bytes of the model weights
    it holds (0: it loaded none), and torch's CUDA allocator figures (peak since the last reset).
    empty: first hand the allocator's cached blocks back to the device (processes sharing a GPU
    cannot use each other's cache: a step after a burst would start with less free memory)."""
    import sys

    info = {"pid": os.getpid(), "model_bytes": 0, "gpu_max_allocated_bytes": None, "gpu_allocated_bytes": None,
            "gpu_reserved_bytes": None}
    torch = sys.modules.get("torch")
    if torch is None:
        return info
    seen: set[int] = set()
    for value in vars(instance).values():
        module = value if isinstance(value, torch.nn.Module) else getattr(value, "model", None)
        if isinstance(module, torch.nn.Module):
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    info["model_bytes"] += p.numel() * p.element_size()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        if empty:
            torch.cuda.empty_cache()
        if reset:
            torch.cuda.reset_peak_memory_stats()
        info.update(gpu_max_allocated_bytes=torch.cuda.max_memory_allocated(),
                    gpu_allocated_bytes=torch.cuda.memory_allocated(), gpu_reserved_bytes=torch.cuda.memory_reserved())
    return info


def probe_actors(coordinator, reset: bool = False, empty: bool = False, timeout_s: float = 60.0) -> list[dict]:
    """Every model actor the coordinator has (workers(): prefill, compressor, answerers), probed;
    with `reset`, their CUDA peak counters start again (`empty`: see _probe). nvidia-smi's per-process figure is added
    where it can be matched by pid."""
    workers = ray.get(coordinator.workers.remote(), timeout=timeout_s)
    handles = []
    for kind, value in workers.items():
        if kind not in ("prefill", "compressor", "answerers"):  # decoders and their hosts: no model
            continue
        for i, handle in enumerate(value if isinstance(value, list) else [value]):
            handles.append((kind if not isinstance(value, list) else f"{kind.rstrip('s')}{i}", handle))
    infos = ray.get([handle.__ray_call__.remote(_probe, reset, empty) for _, handle in handles], timeout=timeout_s)
    smi = gpu_processes()
    return [{"kind": kind, **info, "nvidia_smi_used_bytes": smi.get(info["pid"])} for (kind, _), info in zip(handles, infos)]


def gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi (the driver process creates no CUDA context)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
        return out[0].strip() if out else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def gpu_processes() -> dict[int, int]:
    """pid -> GPU memory used (nvidia-smi), {} without nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return {int(pid): int(used) * MiB for pid, used in (line.split(",") for line in out.strip().splitlines())}
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}


def host_memory() -> dict:
    """PSS of this driver and every process of its Ray runtime, by process title, and the
    object store's use. Where /proc has no smaps_rollup (some sandboxes), RSS stands in
    ("pss_exact": False): it counts shared pages, the object store's included, once per process."""
    procs = processes()
    rss = {pid: size for pid, _, _, size in procs}
    names = {pid: title(cmd) for pid, _, cmd, _ in procs}
    by_title: dict[str, int] = {}
    exact = True
    for pid in descendants(os.getpid(), procs) | {os.getpid()}:
        size = pss(pid)
        if size is None:
            size, exact = rss.get(pid, 0), False
        name = "driver" if pid == os.getpid() else names.get(pid, "?")
        by_title[name] = by_title.get(name, 0) + size
    store = ray.cluster_resources().get("object_store_memory", 0) - ray.available_resources().get("object_store_memory", 0)
    return {"pss_bytes": sum(v for k, v in by_title.items() if k != "driver"), "pss_by_title": by_title,
            "pss_exact": exact, "object_store_bytes": store}


def summary(report: dict) -> dict:
    """Per method: the figures the goals are about, at the largest sustained step, and whether
    each goal is met."""
    out = {}
    for method, run in report.get("methods", {}).items():
        best = run.get("at_max") or {}
        actors = best.get("actors") or report.get("actors") or []
        figures = {
            "streams": run.get("max_sustained_streams", 0),
            "ttft_p50_s": best.get("ttft_p50_s"), "ttft_p99_s": best.get("ttft_p99_s"),
            "decode_tokens_per_s": best.get("decode_tokens_per_s_p50"),
            "encode_fps": (run.get("burst") or {}).get("fps"),
            "realtime_ingest_fps": best.get("ingested_fps"),
            "gpu_peak_bytes": {a["kind"]: a["gpu_max_allocated_bytes"] for a in actors},
            "host_pss_bytes": (best.get("host") or {}).get("pss_bytes"),
            "object_store_bytes": (best.get("host") or {}).get("object_store_bytes"),
        }
        goal = {"streams": GOALS["streams"].get(method), "ttft_p50_s": GOALS["ttft_p50_s"],
                "decode_tokens_per_s": GOALS["decode_tokens_per_s"], "encode_fps": GOALS["encode_fps"]}
        met = {k: None if g is None or figures[k] is None else (figures[k] <= g if k == "ttft_p50_s" else figures[k] >= g)
               for k, g in goal.items()}
        out[method] = {"figures": figures, "goals": goal, "met": met}
    return out


def goals_table(report: dict) -> str:
    """A Markdown table: each goal beside each method's figure (met / missed)."""
    methods = report.get("summary") or summary(report)
    if not methods:
        return f"no method measured ({report.get('error', 'nothing ran')})"
    mark = lambda met: "" if met is None else (" (met)" if met else " (missed)")  # noqa: E731
    fmt = {"streams": "{:.0f}", "ttft_p50_s": "{:.3f} s", "ttft_p99_s": "{:.3f} s", "decode_tokens_per_s": "{:.1f}",
           "encode_fps": "{:.1f}", "realtime_ingest_fps": "{:.1f}"}
    goal_text = {"streams": lambda g: f">= {g}", "ttft_p50_s": lambda g: f"<= {g} s",
                 "decode_tokens_per_s": lambda g: f">= {g:g}", "encode_fps": lambda g: f">= {g:g}"}
    names = list(methods)
    weights = ", ".join(f"{a['kind']} {_size(a['model_bytes'])}" for a in report.get("actors", []) if a["model_bytes"])
    lines = [f"Ray pipeline on {report.get('device')}, {report.get('model')}: {report.get('model_copies')} model copies "
             f"({weights or '-'})",
             "", "| figure | " + " | ".join(f"{m} (goal) | {m}" for m in names) + " |",
             "|---|" + "---:|---:|" * len(names)]
    for key, label in (("streams", "real-time 0.5 fps streams sustained"), ("ttft_p50_s", "TTFT p50 at that load"),
                       ("ttft_p99_s", "TTFT p99 at that load"), ("decode_tokens_per_s", "decode tokens/s (p50)"),
                       ("encode_fps", "aggregate encode frames/s (burst)"),
                       ("realtime_ingest_fps", "real-time frames/s ingested at that load")):
        cells = []
        for m in names:
            value, goal = methods[m]["figures"][key], methods[m]["goals"].get(key)
            cells.append(goal_text[key](goal) if goal is not None and key in goal_text else "")
            cells.append("-" if value is None else fmt[key].format(value) + mark(methods[m]["met"].get(key)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for m in names:
        f = methods[m]["figures"]
        peaks = ", ".join(f"{k} {_size(v)}" for k, v in f["gpu_peak_bytes"].items() if v is not None) or "-"
        pss_text, store = _size(f["host_pss_bytes"]), _size(f["object_store_bytes"])
        lines.append(f"\n{m}: GPU peak per actor: {peaks}; host PSS of the Ray processes: {pss_text}; object store: {store}")
    return "\n".join(lines)


def _size(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 2**30:.1f} GiB" if value >= 2**30 else f"{value / MiB:.1f} MiB"


def plot(report: dict, path) -> None:
    """Lag p95 of every ramp step against its stream count, per method (o: sustained, x: not)."""
    with single_plot(path, size=(7, 4.5)) as ax:
        for color, (method, run) in zip(("tab:blue", "tab:orange", "tab:green", "tab:red"), report["methods"].items()):
            steps = sorted(run["steps"], key=lambda s: s["streams"])
            xs = [s["streams"] for s in steps]
            ys = [s["lag_p95_s"] if s.get("lag_p95_s") is not None else float("nan") for s in steps]
            ax.plot(xs, ys, color=color, lw=0.8, alpha=0.6)
            for s, y in zip(steps, ys):
                ax.scatter([s["streams"]], [y], color=color, marker="o" if s["sustained"] else "x", zorder=3)
            goal = GOALS["streams"].get(method)
            ax.plot([], [], color=color, marker="o", label=f"{method}: {run.get('max_sustained_streams', 0)} sustained "
                                                           f"(goal {goal}), burst {run['burst']['fps']:.0f} frames/s")
            if goal:
                ax.axvline(goal, color=color, ls=":", lw=1)
        ax.axhline(report["config"]["max_lag_s"], color="grey", ls="--", lw=1, label="lag bound")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        counts = sorted({s["streams"] for run in report["methods"].values() for s in run["steps"]})
        if counts:
            ax.set_xticks(counts, [str(c) for c in counts], fontsize=7)
        ax.set_xlabel("concurrent real-time streams (0.5 fps); o sustained, x not")
        ax.set_ylabel("ingest lag p95 (s)")
        ax.set_title(f"Ray pipeline on {report['device']}, {report.get('model')}, "
                     f"{report.get('model_copies')} model copies", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
