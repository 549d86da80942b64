"""The multi-camera ingestion job: many sources into one coordinator, with progress.

A sources file (YAML) lists the cameras:

    model: models/demo            # checkpoint directory (or --model)
    defaults: {method: streamkv, fps: 0.5, policy: drop}
    sources:
      - {id: lobby, url: rtsp://10.0.0.5/stream}
      - {id: gate, url: http://10.0.0.6/live.ts, method: rekv}
      - {id: replay, url: /data/2026-11-21.mp4, policy: block}

Run it with `streamkv ingest sources.yaml` (or as a Ray job: `ray job submit -- streamkv ingest
sources.yaml --address auto`). The coordinator is a named, detached actor, so `streamkv ask`
and the HTTP service reach the same streams; Ray restarts it if its process dies, and it takes
its streams over again (actors/coordinator.py). `streamkv stop` ends it with every stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import yaml
from rich.progress import Progress

from actors.coordinator import NAMESPACE, StreamCoordinator
from actors.messages import is_terminal
from pipeline.decode import DecodeConfig
from pipeline.errors import ConfigError

COORDINATOR_NAME = "streamkv-coordinator"
# Pins actor kinds to ray_cluster.yaml's node types (their custom resources); the coordinator
# itself stays on the head node, and so does the compressor actor (it loads no model; the segment
# index's Redis runs there), so that idle decoder nodes can go.
CLUSTER_PLACEMENT = {
    "prefill": {"num_gpus": 1, "resources": {"gpu_worker": 0.5}},
    "answerer": {"num_gpus": 0.5, "resources": {"gpu_worker": 0.25}},
    "compressor": {"resources": {"head": 0.5}},
    "decoder": {"num_cpus": 1, "resources": {"decoder": 1}},
}
SOURCE_KEYS = {"id", "url", "method", "options", "fps", "size", "policy", "system_prompt"}


@dataclass(frozen=True)
class Source:
    id: str
    url: str
    method: str = "streamkv"
    options: dict = field(default_factory=dict)
    fps: float | None = 0.5
    size: tuple[int, int] | None = None
    policy: str = "drop"
    system_prompt: str | None = "You are a helpful assistant."


def read_sources(path: str | Path) -> tuple[str | None, list[Source]]:
    """The sources file: (model directory or None, sources), validated."""
    spec = yaml.safe_load(Path(path).read_text()) or {}
    defaults = spec.get("defaults", {})
    sources = []
    for entry in spec.get("sources", []):
        merged = {**defaults, **entry}
        unknown = set(merged) - SOURCE_KEYS
        if unknown or "id" not in merged or "url" not in merged:
            raise ConfigError(f"source {entry!r}: needs id and url; unknown keys {sorted(unknown)}")
        if merged.get("size") is not None:
            merged["size"] = tuple(merged["size"])
        sources.append(Source(**merged))
    if len({s.id for s in sources}) != len(sources):
        raise ConfigError("source ids must be unique")
    return spec.get("model"), sources


def coordinator(model_dir: str | None = None, **options):
    """The named coordinator: the running one, or a new detached one for `model_dir` (options go
    to StreamCoordinator, e.g. placement=CLUSTER_PLACEMENT, device="cuda")."""
    try:
        return ray.get_actor(COORDINATOR_NAME, namespace=NAMESPACE)
    except ValueError:
        if model_dir is None:
            raise ConfigError("no coordinator is running: give a model directory to start one") from None
        return named_coordinator(COORDINATOR_NAME, str(model_dir), **options)


def named_coordinator(name: str, *args, num_cpus: float = 0.1, **options):
    """The coordinator called `name`, started if none runs: detached, and restarted by Ray when
    its process dies (it then takes its streams over again). args, options: StreamCoordinator's."""
    return ray.remote(StreamCoordinator).options(
        name=name, namespace=NAMESPACE, lifetime="detached", num_cpus=num_cpus, get_if_exists=True, max_restarts=-1,
    ).remote(*args, **options)


def stop_coordinator(name: str = COORDINATOR_NAME) -> int:
    """End the coordinator called `name` with its model actors and every stream; returns how many
    streams it had (0 if none runs)."""
    try:
        handle = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return 0
    streams = ray.get(handle.shutdown.remote())
    ray.kill(handle)
    return streams


def run_ingest(handle, sources: list[Source], wait: bool = True, poll_s: float = 0.5) -> dict[str, dict]:
    """Create every stream, attach its source, and (with `wait`) show progress until all end.
    Streams the coordinator has already (a job run again, after a crash or to add cameras) are
    only watched: their sources were attached before, and their decoders outlive a coordinator
    restart (a file attached again would repeat its frames)."""
    existing = set(ray.get(handle.list_streams.remote()))
    for source in sources:
        if source.id in existing:
            continue
        ray.get(handle.create_stream.remote(source.id, source.method, source.options, source.system_prompt))
        ray.get(handle.attach_source.remote(source.id, source.url, DecodeConfig(fps=source.fps, size=source.size), source.policy))
    statuses = {s.id: ray.get(handle.status.remote(s.id)) for s in sources}
    if not wait:
        return statuses
    with Progress() as progress:
        tasks = {s.id: progress.add_task(s.id, total=None) for s in sources}
        while True:
            statuses = dict(zip(statuses, ray.get([handle.status.remote(sid) for sid in statuses])))
            for sid, status in statuses.items():
                progress.update(tasks[sid], completed=status["frames_ingested"],
                                description=f"{sid} [{status['source_state']}] dropped {status['frames_dropped']}")
            if all(is_terminal(s["source_state"]) for s in statuses.values()):
                return statuses
            time.sleep(poll_s)
