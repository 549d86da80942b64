"""One decoder host's memory over many sources (issue 23 item 4: what grew in bench.churn's host).

    python -m bench.host_memory [SOURCES]                     # as the pool starts hosts (FIX=1 by default)
    FIX=0 python -m bench.host_memory 200                     # glibc's default arenas
    FIX=0 HOST_ARENAS=2 python -m bench.host_memory 200       # MALLOC_ARENA_MAX=2 alone
    TRACE=1 python -m bench.host_memory 200                   # tracemalloc in the host: what Python grew

A local Ray runtime, a sink actor that only counts, and one DecoderHost (capacity 32); sources
go through it 4 at a time, as the coordinator runs them: open, start, push one 16-frame MPEG-TS,
close, wait until finished, drop. Every 20 sources, inside the host: USS; glibc's mallinfo2
(arena: heap bytes, uordblks: in use, fordblks: free but kept); Python's traced bytes; OS and
Python threads; gc objects. At the end one malloc_trim, sampled again; slopes after 20 sources.
Raw rows: $OUT (default bench/results/host_memory.json). FIX=1 starts the host with
actors/release.py FEW_ARENAS, as actors/decoder_pool.py does (DecoderHost.drop trims either way).
"""
import json, os, sys
import numpy as np
import ray

sys.path.insert(0, os.getcwd())
from actors.decoder_host import decoder_host_class
from pipeline.decode import DecodeConfig
from tests.stages import scene_video
from tests.test_http_api import mpegts
from bench.procs import pss_uss

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200
CONC = 4
EVERY = 20

@ray.remote(num_cpus=0.05)
class Sink:
    def ingest(self, sid, frames, times, seq=None):
        return len(frames)

def inside_probe(self):
    import ctypes, gc, os, threading, tracemalloc
    class M(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = M
    gc.collect()
    m = libc.mallinfo2()
    traced = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None
    with open(f"/proc/{os.getpid()}/status") as f:
        thr = [l for l in f if l.startswith("Threads")][0].split()[1]
    import collections
    counts = collections.Counter(type(o).__name__ for o in gc.get_objects())
    return {"pid": os.getpid(), "threads_os": int(thr), "threads_py": threading.active_count(),
            "arena": m.arena, "hblkhd": m.hblkhd, "uordblks": m.uordblks, "fordblks": m.fordblks,
            "traced": traced, "sources": len(self._sources), "objects": len(gc.get_objects()),
            "top": counts.most_common(12), "logging_loggers": len(__import__("logging").Logger.manager.loggerDict), "av": sum(1 for o in gc.get_objects() if str(getattr(type(o), "__module__", "")).startswith("av"))}

def start_trace(self):
    import tracemalloc
    tracemalloc.start(10)
    return True

def snap(self):
    import tracemalloc, gc
    gc.collect()
    return tracemalloc.take_snapshot()

def trim(self):
    import ctypes
    return ctypes.CDLL("libc.so.6").malloc_trim(0)

def main():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.getcwd(), **({"MALLOC_ARENA_MAX": os.environ["HOST_ARENAS"]} if os.environ.get("HOST_ARENAS") else {})}})
    sink = Sink.remote()
    from actors.release import FEW_ARENAS
    opts = {"runtime_env": {"env_vars": FEW_ARENAS}} if os.environ.get("FIX", "1") == "1" else {}
    host = decoder_host_class(32).options(num_cpus=0.05, **opts).remote(32)
    print("host env", ray.get(host.__ray_call__.remote(lambda self: (os.environ.get("MALLOC_ARENA_MAX"), os.environ.get("PYTHONPATH")))))
    data = mpegts(scene_video(16, seed=1))
    cfg = DecodeConfig(fps=4.0, probe_s=0.5)
    trace = os.environ.get("TRACE") == "1"
    if trace:
        ray.get(host.__ray_call__.remote(start_trace))
    rows = []
    def sample(n, label=""):
        info = ray.get(host.__ray_call__.remote(inside_probe))
        pss, uss = pss_uss(info["pid"])
        info.update(n=n, uss=uss, label=label)
        rows.append(info)
        print(n, label, f"uss {uss/2**20:.1f} MiB arena {info['arena']/2**20:.1f} mmap {info['hblkhd']/2**20:.1f} inuse {info['uordblks']/2**20:.2f} free {info['fordblks']/2**20:.2f} traced {(info['traced'] or 0)/1024:.0f} KiB thr {info['threads_os']}/{info['threads_py']} objs {info['objects']} src {info['sources']} loggers {info['logging_loggers']} av {info['av']}", flush=True)
    sample(0, "start")
    snaps = {}
    done = 0
    while done < N:
        keys = [f"s{done+i}.k" for i in range(CONC)]
        ray.get([host.open.remote(k, k, None, cfg, sink, 8, 2, "block", first_seq=0) for k in keys])
        ray.get([host.start.remote(k) for k in keys])
        ray.get([host.push.remote(k, data, 0) for k in keys])
        ray.get([host.close.remote(k, 1) for k in keys])
        st = ray.get([host.wait.remote(k, 60) for k in keys])
        assert all(s["state"] == "finished" and s["frames_sent"] > 0 for s in st), st
        ray.get([host.drop.remote(k) for k in keys])
        done += CONC
        if done % EVERY == 0:
            sample(done)
            if trace and done in (20, N):
                snaps[done] = ray.get(host.__ray_call__.remote(snap))
    if trace:
        for stat in snaps[N].compare_to(snaps[20], "traceback")[:8]:
            print(stat)
            for line in stat.traceback.format()[-6:]:
                print("   ", line)
    r = ray.get(host.__ray_call__.remote(trim))
    sample(N, f"trimmed({r})")
    xs = [r["n"] for r in rows if r["n"] >= 20 and not r["label"]]
    for key in ("uss", "arena", "uordblks", "fordblks", "hblkhd"):
        ys = [r[key] for r in rows if r["n"] >= 20 and not r["label"]]
        print(key, f"{np.polyfit(xs, ys, 1)[0]/1024:.1f} KiB/source")
    json.dump(rows, open(os.environ.get("OUT", "bench/results/host_memory.json"), "w"), indent=1, default=str)
    ray.shutdown()

if __name__ == "__main__":
    main()
