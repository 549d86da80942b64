"""A fake multi-node autoscaling Ray cluster on one machine, with ray_cluster.yaml's node types.

Ray's autoscaler can run against the `fake_multinode` node provider: a "node" it launches is a
raylet process (with its agents) started on this machine with the node type's resources, and a
node it removes has its processes killed. `ray.cluster_utils.AutoscalingCluster` wraps that for
Ray's own tests, but cannot be used on a machine shared with other Ray sessions, so this module
starts the same thing by hand:
- its start() and shutdown() run `ray stop --force`, which kills EVERY Ray process on the machine
  (other test sessions' included); here only the processes of our own `ray start` session go;
- its head takes port 6379 (Redis's port; taken on these machines) and the provider, without a
  `gcs_address` in its config, assumes 6379; here both get a free port;
- `ray start` records the head in <temp dir>/ray_current_cluster, and a plain `ray.init()` anywhere
  on the machine connects to the cluster named there: here the head gets a temp dir of its own;
- Ray 2.60's wheel lacks the example.yaml the wrapper builds its config from.

Node types come from the cluster launcher config (ray_cluster.yaml): names and resources as they
are, the head's as the fake provider's `ray.head.default`; the cloud parts (node_config, setup and
start commands) have no meaning here and are dropped. Worker counts are the caller's (nodes are
processes on this machine, so keep them few).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
RAY_CLUSTER_YAML = REPO_ROOT / "ray_cluster.yaml"
FAKE_HEAD_TYPE = "ray.head.default"  # the fake provider's name for the head's node type
# Find a lost node within seconds (Ray's defaults: 5 missed checks of 3 s each, then 30 s more
# before the autoscaler drops the node from its own books and may launch another)
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                 "health_check_timeout_ms": 1000}
HEARTBEAT_TIMEOUT_S = 8
# Ray 2.60 turns token authentication on for a head started where ~/.ray/auth_token exists (a
# local ray.init() writes one): the head, its nodes and the driver say so explicitly, alike.
AUTH_MODE = "token"


class HeadStartError(RuntimeError):
    """`ray start --head` failed (on this machine: too loaded to start Ray in time)."""


@dataclass(frozen=True)
class ClusterSpec:
    """What the fake cluster runs: the head's resources and the worker node types (autoscaler
    `available_node_types` entries: resources, min_workers, max_workers)."""

    head_resources: dict[str, float]
    worker_types: dict[str, dict]
    upscaling_speed: float = 1.0


def cluster_spec(path: Path = RAY_CLUSTER_YAML, max_workers: dict[str, int] | None = None,
                 min_workers: int | None = 0, object_store_bytes: int = 100 * 2**20) -> ClusterSpec:
    """ray_cluster.yaml's node types for the fake provider. max_workers: per type (default: the
    yaml's); min_workers: every worker type's (None: the yaml's; 0 by default, so that every
    worker node is one the autoscaler added for a demand). Each node's object store gets
    `object_store_bytes` (Ray would take 30% of RAM per node)."""
    config = yaml.safe_load(Path(path).read_text())
    types = config["available_node_types"]
    head = dict(types[config["head_node_type"]]["resources"])
    workers = {}
    for name, node_type in types.items():
        if name == config["head_node_type"]:
            continue
        workers[name] = {
            "resources": {**node_type["resources"], "object_store_memory": object_store_bytes},
            "node_config": {},
            "min_workers": node_type.get("min_workers", 0) if min_workers is None else min_workers,
            "max_workers": (max_workers or {}).get(name, node_type.get("max_workers", 1)),
        }
    return ClusterSpec(head, workers, float(config.get("upscaling_speed", 1.0)))


def node_type_of(resources: dict[str, float], spec: ClusterSpec) -> str:
    """The node type whose custom resources a node offers (its total resources)."""
    def custom(offer):
        return {k for k in offer if k not in ("CPU", "GPU", "memory", "object_store_memory")
                and not k.startswith("node:") and not k.startswith("accelerator_type")}

    offered = custom(resources)
    if custom(spec.head_resources) <= offered and custom(spec.head_resources):
        return "head"
    for name, node_type in spec.worker_types.items():
        if custom(node_type["resources"]) == offered:
            return name
    return "unknown"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_members(sid: int) -> list[int]:
    """Live processes of session `sid` (through /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        if int(session) == sid and state != "Z":
            pids.append(int(entry.name))
    return pids


@dataclass
class FakeCluster:
    """`ray start --head --block` with the fake provider's autoscaler, in a session of its own:
    every process of the cluster (the head's, the monitor's worker nodes, their workers) belongs
    to it, and stop() ends exactly those, by pid."""

    spec: ClusterSpec
    idle_timeout_minutes: float = 0.1
    address: str = ""
    temp_dir: str = ""
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    _config: dict = field(default_factory=dict)

    def start(self, timeout_s: float = 120.0, attempts: int = 5, pause_s: float = 10.0) -> str:
        """Start the head (and its autoscaler); returns the address to ray.init. A start that
        fails is tried again after `pause_s`: on a loaded machine `ray start` gives up when its
        raylet has not registered within 30 s (a fixed limit in Ray), and a port we picked may
        be taken before Ray binds it. After `attempts`: HeadStartError."""
        for attempt in range(attempts):
            try:
                return self._start(timeout_s)
            except HeadStartError:
                if attempt == attempts - 1:
                    raise
                time.sleep(pause_s)
        raise AssertionError("unreachable")

    def _start(self, timeout_s: float) -> str:
        import ray._private.services as services

        port = free_port()
        ip = services.get_node_ip_address()
        self.address = f"{ip}:{port}"
        # short: Ray's unix socket paths under it must stay below 108 characters
        self.temp_dir = tempfile.mkdtemp(prefix="skvfc-", dir="/tmp")
        self._config = {
            "cluster_name": "streamkv-fake",
            "max_workers": sum(t["max_workers"] for t in self.spec.worker_types.values()),
            "upscaling_speed": self.spec.upscaling_speed,
            "idle_timeout_minutes": self.idle_timeout_minutes,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.address},
            "available_node_types": {
                FAKE_HEAD_TYPE: {"resources": dict(self.spec.head_resources), "node_config": {}, "max_workers": 0},
                **self.spec.worker_types},
            "head_node_type": FAKE_HEAD_TYPE,
            "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        }
        config_path = Path(self.temp_dir) / "autoscaling.json"
        config_path.write_text(json.dumps(self._config))
        head = dict(self.spec.head_resources)
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
               f"--port={port}", f"--temp-dir={self.temp_dir}", f"--autoscaling-config={config_path}",
               "--include-dashboard=false", "--disable-usage-stats",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--num-cpus={int(head.pop('CPU', 1))}", f"--num-gpus={int(head.pop('GPU', 0))}",
               f"--object-store-memory={150 * 2**20}", f"--resources={json.dumps(head)}",
               f"--system-config={json.dumps(SYSTEM_CONFIG, separators=(',', ':'))}"]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update({"RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": AUTH_MODE, "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                    "AUTOSCALER_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
                    "AUTOSCALER_METRIC_PORT": str(free_port()), "RAY_USAGE_STATS_ENABLED": "0",
                    "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])})
        self.log_path = Path(self.temp_dir) / "ray-start.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=REPO_ROOT)
        marker = Path(self.temp_dir) / "ray_current_cluster"  # written once the head is up
        deadline = time.monotonic() + timeout_s
        while not marker.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise HeadStartError(f"the fake cluster's head did not start (exit code {self.process.returncode}):\n{tail}")
            time.sleep(0.2)
        return self.address

    def connect(self, **init_options) -> None:
        """ray.init this process to the cluster (its repository root on the workers' path)."""
        import ray
        from ray._raylet import Config

        os.environ["RAY_AUTH_MODE"] = AUTH_MODE
        Config.initialize("")  # Ray read the mode when it was imported: read it again
        ray.init(address=self.address, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}, **init_options)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:] if self.log_path else ""
        except OSError:
            return ""

    def monitor_log_tail(self, chars: int = 3000) -> str:
        """The autoscaler's log (what it launched and terminated, and why)."""
        logs = sorted(Path(self.temp_dir).glob("session_*/logs/monitor.log"))
        return logs[-1].read_text(errors="replace")[-chars:] if logs else ""

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to `ray start` (it stops the head's processes), then every process left in
        its session (the worker nodes the monitor started), by pid; the temp dir goes too."""
        if self.process is not None:
            sid = self.process.pid  # a session leader: its pid is the session id
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
            deadline = time.monotonic() + 10
            while (left := session_members(sid)) and time.monotonic() < deadline:
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGTERM if time.monotonic() < deadline - 5 else signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.5)
            for pid in session_members(sid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def left_behind(self) -> list[int]:
        """Processes of the cluster's session still alive (none after stop)."""
        return session_members(self.process.pid) if self.process is not None else []


def kill_node(node: dict) -> None:
    """End a node as a crash would: its raylet stops at once (not drained), and the actors'
    worker processes on it with it. `node`: its ray.nodes() entry."""
    from ray._private.test_utils import kill_raylet

    kill_raylet(node, graceful=False)
