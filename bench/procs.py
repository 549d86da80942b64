"""The local Ray runtime's processes, read from /proc (psutil when installed): what the
benchmarks account memory and CPU time to."""

from __future__ import annotations

import os
from collections import Counter, defaultdict


def processes() -> list[tuple[int, int, str, int]]:
    """(pid, ppid, cmdline, rss bytes) of every process we can read."""
    try:
        import psutil

        out = []
        for p in psutil.process_iter(["pid", "ppid", "cmdline", "memory_info"]):
            info = p.info
            if info.get("memory_info") is None:
                continue
            out.append((info["pid"], info["ppid"] or 0, " ".join(info.get("cmdline") or []), info["memory_info"].rss))
        return out
    except ImportError:
        pass
    out = []
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            with open(f"/proc/{entry}/statm") as f:
                rss = int(f.read().split()[1]) * page
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue
        out.append((int(entry), ppid, cmd, rss))
    return out


def descendants(root: int, procs: list | None = None) -> set[int]:
    """Pids below `root`, from `procs` (a processes() listing; read now if not given)."""
    children = defaultdict(list)
    for pid, ppid, _, _ in procs if procs is not None else processes():
        children[ppid].append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def pss(pid: int) -> int | None:
    """Proportional set size (shared pages split among their users), from smaps_rollup."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def pss_uss(pid: int) -> tuple[int, int] | None:
    """(PSS, USS) bytes from smaps_rollup: PSS splits shared pages among their users; USS counts
    the pages only this process maps (Private_Clean + Private_Dirty), what its exit would free."""
    found = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Pss", "Private_Clean", "Private_Dirty"):
                    found[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        return None
    if "Pss" not in found:
        return None
    return found["Pss"], found.get("Private_Clean", 0) + found.get("Private_Dirty", 0)


def title(cmdline: str) -> str:
    """A process's name without its current task: "ray::PrefillWorker", "raylet", "python"."""
    first = cmdline.split()[0] if cmdline.strip() else "?"
    return first.split(".")[0].rstrip("()") if first.startswith("ray::") else first.rsplit("/", 1)[-1]


def cpu_seconds(root: int) -> Counter:
    """CPU seconds (user + system) used so far by `root` and its descendants (a driver that
    started a local Ray runtime: its raylet, GCS and workers), summed by process title
    ("ray::PrefillWorker", "raylet", ...). Linux only (/proc); elsewhere empty."""
    procs = processes()
    titles = {pid: title(cmd) for pid, _, cmd, _ in procs}
    ticks = os.sysconf("SC_CLK_TCK")
    used: Counter = Counter()
    for pid in descendants(root, procs) | {root}:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        utime, stime = stat[stat.rindex(")") + 2 :].split()[11:13]
        used[titles.get(pid, "?")] += (int(utime) + int(stime)) / ticks
    return used


def object_refs() -> dict:
    """What the local raylet's workers hold in Ray's object store and reference tables (ray's
    memory API, as `ray memory` reads it; works without the dashboard): per worker pid, the
    objects it owns and the references it has in scope, and the node's object-store totals."""
    import ray
    from ray._private.internal_api import node_stats

    node = next(n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] ==
                ray.util.get_node_ip_address())
    reply = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"], include_memory_info=True)
    workers = {w.pid: {"owned": w.num_owned_objects, "in_scope": w.num_object_refs_in_scope,
                       "store_bytes": w.used_object_store_memory} for w in reply.core_workers_stats}
    store = reply.store_stats
    return {"workers": workers, "store_objects": store.num_local_objects,
            "store_bytes": store.object_store_bytes_used}
