"""HTTP load benchmark: N live push-mode streams plus questions at a fixed rate, for a bounded time.

    python -m bench.load [--streams 4] [--duration 60] [--question-rate 1.0] [--fps 4] [--method rekv]
    python -m bench.load --url http://host:8000 [--token T] ...   # load a server that is already running

Service. By default the benchmark starts everything itself: a local Ray runtime (`--num-cpus`
logical CPUs, every actor at a fraction of one, as deploy/serve.yaml and the tests do), Serve on a
free port, and `deploy.app.build_app` with the shipped demo model (`--model`), its own coordinator;
all of it is shut down at the end. With `--url` nothing is started and only the HTTP API is used.

Workload (httpx, a client per 16 streams (bench/http_pool.py), one event loop, open loop):
- N push-mode streams (`POST /v1/streams`, `--method`, options scaled to the model's tokens per
  frame as in bench.qa). Each is a synthetic-world video (held-out seed 90000 + i) encoded as ONE
  MPEG-TS container at `--fps`, split into byte chunks of ~`--chunk-s` seconds of frames at packet
  boundaries (what a camera pushes), and pushed in real time: chunk k (numbered `?seq=k`) goes out
  once its last frame is "captured", at t0 + (k + 1) * chunk_s. Chunk 0 of every stream is pushed
  before the clock starts (`--no-prime`: on the clock): the first chunk starts the stream's decoder
  actor, a new process, which takes seconds to tens of seconds on a small machine (`first_push`).
- Questions at `--question-rate` per second in aggregate (evenly spaced, or `--arrivals poisson`),
  round-robin over the streams, with the world's question texts (one whose frames have been
  pushed), via POST /v1/chat/completions; a fraction `--sse-fraction` with `stream: true`
  (time to the first content chunk, and total). They start once every stream has ingested frames
  (a stream with none yet answers 409 by design) and are not held back by slow answers.
- A poller reads GET /v1/streams/{id} every `--poll-s` (ingest progress, drops, retained KV).
- At the deadline pushing and asking stop; the sources are closed and drained (bounded by
  `--drain-timeout`), then the streams are deleted.

Measured: answer latency p50/p95/p99 (and TTFT for SSE), every request's status by route and
errors by status / exception (target zero), chunk push latency and lateness, frames pushed /
decoded / ingested / dropped per stream, ingest lag at the deadline and the drain time; memory at
the start (server up and warm, no streams), the peak (streams drained, before deletion) and the
end (streams deleted): retained KV summed over streams (API), object-store use (Ray resources,
local runtime only) and the resident memory of the runtime's Ray worker processes (`ray::*`).

Fault (local service only): `--kill-coordinator-at T` kills the coordinator's process at T s on
the workload clock (Ray restarts it, and it takes its streams over): the figures then say how
many requests failed after it and for how long, and how many frames each stream ingested after.

Writes bench/results/<name>.json, <name>.md and <name>_latency.png (answer latency over time per
stream, plus memory over time). Exit status 1 if any request failed (before the fault, if one was
asked for), so it doubles as a smoke test;
2 if the server could not be used at all (no figures written).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import shlex
import socket
import statistics
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from actors.messages import is_terminal
from bench.http_pool import ClientShards
from bench.procs import descendants, processes, pss, title

REPO = Path(__file__).resolve().parent.parent
HELD_OUT_SEED = 90_000
APP_NAME = "streamkv-load"
MiB = 2**20


# ---- video: one MPEG-TS container per stream, cut into ~chunk_s byte chunks ------------------------
@dataclass
class Video:
    chunks: list[bytes]  # consecutive byte ranges of ONE container
    frames: list[int]  # frames (packets) starting in each chunk
    questions: list  # synthetic.world.Question, sorted by ask_at
    seed: int


def encode_chunks(frames: np.ndarray, fps: float, chunk_s: float) -> tuple[list[bytes], list[int]]:
    """Encode `frames` as one MPEG-TS byte stream and cut it where the packets of second
    k * chunk_s begin (packet positions from the demuxer, in decode order). Any cut of the byte
    stream is valid for the receiver; cutting at packets keeps ~chunk_s of frames per chunk."""
    import av

    from pipeline.video_io import write_video

    buf = io.BytesIO()
    write_video(buf, frames, fps, container_format="mpegts", gop_size=max(1, round(fps * chunk_s)))
    data = buf.getvalue()
    marks = []  # (byte position, seconds) of each video packet
    with av.open(io.BytesIO(data), format="mpegts") as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            stamp = packet.dts if packet.dts is not None else packet.pts
            if packet.pos is None or packet.pos < 0 or stamp is None:
                marks = []
                break
            marks.append((int(packet.pos), float(stamp * packet.time_base)))
    n_chunks = max(1, math.ceil(len(frames) / max(1, round(fps * chunk_s))))
    if len(marks) != len(frames):  # no usable positions: even cuts on TS packet boundaries
        step = max(188, (len(data) // n_chunks) // 188 * 188)
        cuts = [min(len(data), k * step) for k in range(n_chunks)] + [len(data)]
        per = [len(frames) // n_chunks] * n_chunks
        per[-1] += len(frames) - sum(per)
        return [data[a:b] for a, b in zip(cuts, cuts[1:])], per
    first = marks[0][1]
    index = [min(n_chunks - 1, int((t - first) / chunk_s + 1e-6)) for _, t in marks]
    starts = {}
    for (pos, _), k in zip(marks, index):
        starts.setdefault(k, pos)
    cuts = [0] + [starts[k] for k in range(1, n_chunks) if k in starts] + [len(data)]
    counts = Counter(index)
    per = [counts.get(k, 0) for k in range(n_chunks)]
    chunks = [data[a:b] for a, b in zip(cuts, cuts[1:])]
    if len(chunks) != len(per):  # an empty second (cannot happen at a constant rate): merge counts
        per = per[: len(chunks) - 1] + [sum(per[len(chunks) - 1 :])]
    return chunks, per


def make_video(seed: int, n_frames: int, fps: float, chunk_s: float) -> Video:
    from synthetic.world import WorldConfig, generate_stream, questions

    stream = generate_stream(n_frames, seed, WorldConfig())
    chunks, per = encode_chunks(stream.frames, fps, chunk_s)
    return Video(chunks, per, questions(stream, 48, seed), seed)


def question_for(video: Video, frames_pushed: int, turn: int) -> str:
    ready = [q.text for q in video.questions if q.ask_at <= frames_pushed]
    return ready[turn % len(ready)] if ready else "what is on screen now ?"


def ray_rss(root_pid: int | None) -> dict:
    """Resident memory of the Ray runtime: `ray::*` worker processes (actors, Serve, idle
    workers), by name, and every process of the runtime (raylet, GCS, ... too). RSS counts shared
    pages (torch's libraries) once per process; PSS splits them, so its sum is the real total.
    With `root_pid` (this driver, which started the runtime) only its descendants count; without,
    every `ray::` process on the host."""
    procs = processes()
    if root_pid is not None:
        mine = descendants(root_pid, procs)
        procs = [p for p in procs if p[0] in mine]
    by_name: dict[str, int] = defaultdict(int)
    by_name_pss: dict[str, int] = defaultdict(int)
    workers = workers_pss = total = count = 0
    for pid, _, cmd, rss in procs:
        if cmd.startswith("ray::"):
            name, proportional = title(cmd), pss(pid) or 0
            by_name[name] += rss
            by_name_pss[name] += proportional
            workers += rss
            workers_pss += proportional
            count += 1
        total += rss
    return {"workers_bytes": workers, "workers_pss_bytes": workers_pss, "workers": count,
            "runtime_bytes": total if root_pid is not None else None,
            "by_name": dict(sorted(by_name.items())), "by_name_pss": dict(sorted(by_name_pss.items())),
            "count_by_name": dict(Counter(title(c) for _, _, c, _ in procs if c.startswith("ray::")))}


def object_store_used() -> int | None:
    try:
        import ray

        if not ray.is_initialized():
            return None
        return int(ray.cluster_resources().get("object_store_memory", 0)
                   - ray.available_resources().get("object_store_memory", 0))
    except Exception:  # noqa: BLE001 - a figure, not a failure
        return None


# ---- the local service ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray's settings for a runtime that serves streams (the same as ray_cluster.yaml's and
# deploy/kuberay/rayservice.yaml's RAY_task_events_max_num_task_in_gcs): the GCS keeps a record of
# every task (call) for the dashboard and `ray list tasks`, ~4 KiB each, and a stream's lifetime
# makes ~50 calls, so with Ray's default cap (100,000 tasks) it grew ~200 KiB per stream up to
# ~400 MB. 10,000 keeps the latest ~10,000 calls (~40 MB) (BENCHMARKS.md "Stream churn").
RAY_SYSTEM_CONFIG = {"task_events_max_num_task_in_gcs": 10_000}


class LocalService:
    """Ray + Serve + the streamkv app, started by this process and torn down by `close`."""

    def __init__(self, args):
        self.args = args
        self.coordinator = f"load-{uuid.uuid4().hex[:8]}"
        self.url: str | None = None
        self.started = False

    def start(self, console) -> str:
        import ray
        from ray import serve

        from deploy.app import build_app

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        env = {"PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
               "OMP_NUM_THREADS": str(self.args.threads)}
        ray.init(num_cpus=self.args.num_cpus, num_gpus=0, object_store_memory=self.args.object_store_mib * MiB,
                 include_dashboard=False, log_to_driver=False, configure_logging=False, runtime_env={"env_vars": env},
                 _system_config={**RAY_SYSTEM_CONFIG, **(getattr(self.args, "ray_config", None) or {})})
        self.started = True
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 300})
        server_args = {
            "model_dir": str(Path(self.args.model).resolve()), "coordinator_name": self.coordinator,
            "answerers": self.args.answerers, "actor_cpus": self.args.actor_cpus,
            "coordinator_cpus": self.args.coordinator_cpus, "api_cpus": self.args.api_cpus,
            "max_upload_bytes": 64 * MiB, **dict(kv.split("=", 1) for kv in self.args.server_arg),
        }
        if self.args.token:
            server_args["api_token"] = self.args.token
        console.log(f"starting Serve app on :{port} ({server_args})")
        serve.run(build_app(server_args), name=APP_NAME, route_prefix="/")
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def kill_coordinator(self) -> None:
        """Kill the coordinator's process (Ray restarts it)."""
        import ray

        from actors.coordinator import NAMESPACE

        ray.kill(ray.get_actor(self.coordinator, namespace=NAMESPACE), no_restart=False)

    def close(self) -> None:
        if not self.started:
            return
        import ray
        from ray import serve

        from deploy.ingest import stop_coordinator

        for step in (lambda: serve.delete(APP_NAME),
                     lambda: stop_coordinator(self.coordinator),
                     serve.shutdown):
            try:
                step()
            except Exception:  # noqa: BLE001 - best effort; ray.shutdown below ends everything
                pass
        ray.shutdown()
        self.started = False


# ---- the load ---------------------------------------------------------------------------------------
@dataclass
class Request:
    kind: str
    t: float  # sent, seconds since the workload started
    latency_s: float | None
    status: int | None
    error: str | None = None
    stream: int | None = None
    ttft_s: float | None = None


@dataclass
class State:
    t0: float
    requests: list[Request] = field(default_factory=list)
    frames_pushed: list[int] = field(default_factory=list)
    chunks_pushed: list[int] = field(default_factory=list)
    push_lateness: list[float] = field(default_factory=list)
    ready: list[bool] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)  # poller time series
    answers: list[dict] = field(default_factory=list)  # a few (question, answer) pairs
    asked: int = 0
    in_flight: int = 0
    killed_at: float | None = None  # the coordinator's process, on the workload clock

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def record(self, request: Request) -> Request:
        self.requests.append(request)
        return request


def _error_of(response) -> str:
    try:
        body = response.json()
        return f"{response.status_code} {body['error']['type']}: {body['error']['message'][:160]}"
    except Exception:  # noqa: BLE001
        return f"{response.status_code} {response.text[:160]!r}"


async def call(state: State, client, kind: str, method: str, url: str, stream: int | None = None, ok=(200,), **kw):
    """One timed request; anything but an `ok` status or an exception is an error."""
    start = state.now()
    try:
        response = await client.request(method, url, **kw)
    except Exception as exc:  # noqa: BLE001 - counted, the load goes on
        state.record(Request(kind, start, state.now() - start, None, f"{type(exc).__name__}: {exc}"[:200], stream))
        return None
    error = None if response.status_code in ok else _error_of(response)
    state.record(Request(kind, start, state.now() - start, response.status_code, error, stream))
    return response if error is None else None


def ask_body(model: str, stream_id: str, question: str, max_tokens: int, sse: bool) -> dict:
    return {"model": model, "max_tokens": max_tokens, "stream": sse, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"stream://{stream_id}"}}, {"type": "text", "text": question}]}]}


async def ask(state: State, client, model: str, index: int, stream_id: str, question: str, max_tokens: int,
              sse: bool) -> None:
    state.in_flight += 1
    body = ask_body(model, stream_id, question, max_tokens, sse)
    start = state.now()
    try:
        if not sse:
            response = await call(state, client, "ask", "POST", "/v1/chat/completions", index, json=body)
            if response is not None:
                try:
                    text = response.json()["choices"][0]["message"]["content"]
                    assert isinstance(text, str)
                except Exception:  # noqa: BLE001
                    state.requests[-1].error = "malformed chat.completion body"
                    return
                if len(state.answers) < 40:
                    state.answers.append({"stream": stream_id, "t": round(start, 2), "question": question,
                                          "answer": text})
            return
        first = None
        text, done = "", False
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    state.record(Request("ask_sse", start, state.now() - start, response.status_code,
                                         _error_of(response), index))
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    payload = line[len("data: "):]
                    if payload.strip() == "[DONE]":
                        done = True
                        break
                    event = json.loads(payload)
                    if "error" in event:  # a failure after the first event
                        error = event["error"]
                        state.record(Request("ask_sse", start, state.now() - start, 200,
                                             f"error event {error.get('type')}: {str(error.get('message'))[:160]}",
                                             index, first))
                        return
                    piece = event["choices"][0]["delta"].get("content")
                    if piece and first is None:
                        first = state.now() - start
                    text += piece or ""
        except Exception as exc:  # noqa: BLE001
            state.record(Request("ask_sse", start, state.now() - start, None, f"{type(exc).__name__}: {exc}"[:200],
                                 index))
            return
        state.record(Request("ask_sse", start, state.now() - start, 200,
                             None if done else "event stream ended without [DONE]", index, first))
        if len(state.answers) < 40:
            state.answers.append({"stream": stream_id, "t": round(start, 2), "question": question, "answer": text,
                                  "sse": True})
    finally:
        state.in_flight -= 1


async def pusher(state: State, client, index: int, stream_id: str, video: Video, chunk_s: float,
                 deadline: float, start: int = 0, only: int | None = None, kind: str = "push") -> None:
    """Push chunk k at t0 + (k + 1) * chunk_s, one at a time (a camera's single connection);
    `only`: push that one chunk now."""
    headers = {"Content-Type": "video/mp2t"}
    for k in ([only] if only is not None else range(start, len(video.chunks))):
        chunk, frames = video.chunks[k], video.frames[k]
        if only is None:
            due = (k + 1) * chunk_s
            if due > deadline:
                return
            wait = due - state.now()
            if wait > 0:
                await asyncio.sleep(wait)
            state.push_lateness.append(max(0.0, state.now() - due))
        response = await call(state, client, kind, "POST", f"/v1/streams/{stream_id}/chunks", index, ok=(202,),
                              params={"seq": k}, content=chunk, headers=headers)
        if response is not None:
            state.chunks_pushed[index] += 1
            state.frames_pushed[index] += frames


async def poller(state: State, shards: ClientShards, ids: list[str], poll_s: float, rss: str | None,
                 stop: asyncio.Event) -> None:
    while not stop.is_set():
        sample = {"t": state.now(), "streams": {}}
        rows = await asyncio.gather(*[call(state, shards.for_stream(i), "status", "GET", f"/v1/streams/{sid}", i)
                                      for i, sid in enumerate(ids)])
        for i, r in enumerate(rows):
            if r is None:
                continue
            status = r.json()
            sample["streams"][ids[i]] = {k: status.get(k) for k in (
                "frames_ingested", "frames_decoded", "frames_dropped", "frames_pending", "retained_bytes",
                "source_state", "segments")}
            if status.get("frames_ingested"):
                state.ready[i] = True
        if rss is not None:
            r = ray_rss(_rss_root(rss))
            sample["rss_workers_bytes"], sample["pss_workers_bytes"] = r["workers_bytes"], r["workers_pss_bytes"]
            sample["object_store_bytes"] = object_store_used()
        state.samples.append(sample)
        try:
            await asyncio.wait_for(stop.wait(), poll_s)
        except asyncio.TimeoutError:
            pass


def _rss_root(rss: str) -> int | None:
    """rss "local": the runtime this process started (its descendants); "host": every ray:: process."""
    return os.getpid() if rss == "local" else None


async def memory_snapshot(state: State, client, ids: list[str], rss: str | None, label: str,
                          shards: ClientShards | None = None) -> dict:
    rows = await asyncio.gather(*[call(state, shards.for_stream(i) if shards else client, f"status_{label}", "GET",
                                       f"/v1/streams/{sid}", i,
                                       ok=(200, 404)) for i, sid in enumerate(ids)])
    retained = [r.json().get("retained_bytes") for r in rows if r is not None and r.status_code == 200]
    listed = await call(state, client, f"list_{label}", "GET", "/v1/streams")  # (/healthz says nothing of streams)
    metrics = await call(state, client, f"metrics_{label}", "GET", "/metrics")
    metric_retained = metric_rows = None
    if metrics is not None:
        lines = [ln for ln in metrics.text.splitlines() if ln.startswith("streamkv_retained_kv_bytes{")]
        metric_rows = len(lines)
        metric_retained = int(sum(float(ln.rsplit(" ", 1)[1]) for ln in lines))
    snap = {
        "t": state.now(), "streams": len(retained), "retained_kv_bytes": int(sum(r or 0 for r in retained)),
        "server_streams": None if listed is None else len(listed.json()["data"]),
        "metrics_streams": metric_rows, "metrics_retained_kv_bytes": metric_retained,
    }
    snap["object_store_bytes"] = object_store_used()
    if rss is not None:
        snap["rss"] = ray_rss(_rss_root(rss))
    return snap


async def warm_up(client, model: str, method: str, options: dict, fps: float) -> None:
    """A throwaway stream through every actor, so the start figures include loaded models."""
    from synthetic.world import WorldConfig, generate_stream

    def check(response, what: str):
        if response.status_code >= 400:
            raise RuntimeError(f"warm-up {what}: {_error_of(response)}")
        return response

    sid = f"warmup-{uuid.uuid4().hex[:6]}"
    check(await client.post("/v1/streams", json={"stream_id": sid, "method": method, "options": options}), "create")
    try:
        frames = generate_stream(int(4 * fps), HELD_OUT_SEED - 1, WorldConfig()).frames
        chunks, _ = encode_chunks(frames, fps, 4.0)
        for k, chunk in enumerate(chunks):
            check(await client.post(f"/v1/streams/{sid}/chunks", params={"seq": k}, content=chunk,
                                    headers={"Content-Type": "video/mp2t"}), "push")
        check(await client.post(f"/v1/streams/{sid}/close", params={"wait_s": 120}), "close")
        check(await client.post("/v1/chat/completions", json=ask_body(model, sid, "what is on screen now ?", 4, False)),
              "question")
    finally:
        await client.delete(f"/v1/streams/{sid}")


async def workload(args, url: str, rss: str | None, console, kill=None) -> dict:
    """The run; if it fails half-way, the streams it created are deleted (a shared server keeps
    nothing). kill: kills the coordinator's process (at --kill-coordinator-at)."""
    import httpx

    created: list[str] = []
    try:
        return await _workload(args, url, rss, console, created, kill)
    except BaseException:
        if created:
            headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
                for sid in created:
                    try:
                        await client.delete(f"/v1/streams/{sid}")
                    except httpx.HTTPError:
                        pass
        raise


async def fault(state: State, at_s: float, kill) -> None:
    await asyncio.sleep(max(0.0, at_s - state.now()))
    state.killed_at = state.now()
    await asyncio.to_thread(kill)


async def _workload(args, url: str, rss: str | None, console, created: list[str], kill=None) -> dict:
    import httpx
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from pipeline.config import frame_scaled_options

    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    options = frame_scaled_options(args.method, args.tokens_per_frame) if args.tokens_per_frame else {}
    options.update(json.loads(args.options))
    per_chunk = max(1, round(args.fps * args.chunk_s))
    n_chunks = max(1, int(args.duration / args.chunk_s + 1e-9))
    console.log(f"encoding {args.streams} videos of {n_chunks * per_chunk} frames ({args.duration:g} s at {args.fps:g} fps)")
    videos = [make_video(args.seed + i, n_chunks * per_chunk, args.fps, args.chunk_s) for i in range(args.streams)]
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    # the streams' requests go through a client per PER_CLIENT streams (bench/http_pool.py: one pool
    # for hundreds of streams costs this process more CPU per request than the service spends)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.request_timeout, limits=limits) as client, \
            ClientShards(args.streams, base_url=url, headers=headers, timeout=args.request_timeout) as shards:
        deadline_up = time.monotonic() + 180
        while True:  # the server answers (and its coordinator is up)
            try:
                if (await client.get("/healthz")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline_up:
                raise RuntimeError(f"{url}/healthz did not answer 200 within 180 s")
            await asyncio.sleep(1)
        listed = await client.get("/v1/models")
        if listed.status_code != 200:
            raise RuntimeError(f"GET /v1/models: {_error_of(listed)}")
        model = listed.json()["data"][0]["id"]
        if args.warmup:
            console.log("warm-up stream (loads every actor's model)")
            await warm_up(client, model, args.method, options, args.fps)
        await asyncio.sleep(2)
        if rss is not None:  # the warm-up stream's decoder process exits some seconds after its deletion
            until = time.monotonic() + 60
            while ray_rss(_rss_root(rss))["count_by_name"].get("ray::StreamDecoder") and time.monotonic() < until:
                await asyncio.sleep(1)
        state = State(time.perf_counter())
        state.frames_pushed = [0] * args.streams
        state.chunks_pushed = [0] * args.streams
        state.ready = [False] * args.streams
        memory = {"start": await memory_snapshot(state, client, [], rss, "start")}
        run = uuid.uuid4().hex[:6]
        ids = [f"load-{run}-{i}" for i in range(args.streams)]
        for i, sid in enumerate(ids):
            body = {"stream_id": sid, "method": args.method, "options": options, "fps": args.fps,
                    "policy": args.policy}
            if await call(state, client, "create", "POST", "/v1/streams", i, ok=(201,), json=body) is None:
                raise RuntimeError(f"could not create stream {sid}: {state.requests[-1].error}")
            created.append(sid)
        first = 0
        if args.prime:  # chunk 0 of every stream goes out before the clock starts: it attaches the decoder
            await asyncio.gather(*[pusher(state, shards.for_stream(i), i, sid, videos[i], args.chunk_s, math.inf, only=0,
                                          kind="first_push")
                                   for i, sid in enumerate(ids)])
            first = 1
        # the workload clock: chunk k is captured by t = (k + 1) * chunk_s; with priming, chunk 0 was just pushed
        state.t0 = time.perf_counter() - first * args.chunk_s
        deadline = args.duration
        stop_poll = asyncio.Event()
        tasks = [asyncio.create_task(pusher(state, shards.for_stream(i), i, sid, videos[i], args.chunk_s, deadline,
                                                      start=first))
                 for i, sid in enumerate(ids)]
        poll_task = asyncio.create_task(poller(state, shards, ids, args.poll_s, rss, stop_poll))
        if kill is not None and args.kill_coordinator_at is not None:
            tasks.append(asyncio.create_task(fault(state, args.kill_coordinator_at, kill)))
        questions: list[asyncio.Task] = []
        question_start = None
        rng = np.random.default_rng([args.seed, 7])
        columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
                   TimeElapsedColumn(), TextColumn("{task.fields[info]}")]

        def info() -> str:
            asks = [r for r in state.requests if r.kind.startswith("ask")]
            ok = [r.latency_s for r in asks if r.error is None]
            errors = sum(r.error is not None for r in state.requests)
            p50 = f"{1000 * statistics.median(ok):.0f} ms" if ok else "-"
            return (f"chunks {sum(state.chunks_pushed)}  asked {state.asked} answered {len(ok)} "
                    f"in flight {state.in_flight}  p50 {p50}  errors {errors}")

        with Progress(*columns, console=console) as progress:
            bar = progress.add_task("load", total=args.duration, info="")

            async def ticker():
                while True:
                    progress.update(bar, completed=min(args.duration, state.now()), info=info())
                    await asyncio.sleep(0.5)

            tick = asyncio.create_task(ticker())
            # questions start once every stream has frames (409 NoFramesError before, by design)
            while not all(state.ready) and state.now() < min(deadline, args.ready_timeout):
                await asyncio.sleep(0.2)
            question_start = state.now()
            if not all(state.ready):
                console.log(f"[yellow]not every stream had frames after {question_start:.1f} s: asking anyway")
            t_next, turn = question_start, 0
            while args.question_rate > 0:
                gap = (rng.exponential(1 / args.question_rate) if args.arrivals == "poisson"
                       else 1 / args.question_rate)
                if turn:
                    t_next += gap
                if t_next >= deadline:
                    break
                wait = t_next - state.now()
                if wait > 0:
                    await asyncio.sleep(wait)
                index = turn % args.streams
                text = question_for(videos[index], state.frames_pushed[index], turn // args.streams)
                sse = rng.random() < args.sse_fraction
                state.asked += 1
                questions.append(asyncio.create_task(
                    ask(state, client, model, index, ids[index], text, args.max_tokens, sse)))
                turn += 1
            await asyncio.gather(*tasks)
            while state.now() < deadline:
                await asyncio.sleep(0.1)
            progress.update(bar, completed=args.duration, description="answers", info=info())
            # the deadline: pushing and asking have stopped; lag = pushed - ingested now
            at_deadline = await asyncio.gather(*[call(state, shards.for_stream(i), "status", "GET", f"/v1/streams/{sid}", i)
                                                 for i, sid in enumerate(ids)])
            await asyncio.gather(*questions)
            progress.update(bar, description="drain", info=info())
            close_at = state.now()
            await asyncio.gather(*[call(state, shards.for_stream(i), "close", "POST", f"/v1/streams/{sid}/close", i)
                                   for i, sid in enumerate(ids)])
            final: dict[int, dict] = {}
            drained_at: dict[int, float] = {}
            while len(drained_at) < len(ids) and state.now() - close_at < args.drain_timeout:
                rows = await asyncio.gather(*[call(state, shards.for_stream(i), "status", "GET", f"/v1/streams/{sid}", i)
                                              for i, sid in enumerate(ids) if i not in drained_at])
                for r in rows:
                    if r is None:
                        continue
                    status = r.json()
                    i = ids.index(status["stream_id"])
                    final[i] = status
                    if is_terminal(status.get("source_state")) and not status.get("frames_pending"):
                        drained_at[i] = state.now() - close_at
                if len(drained_at) < len(ids):
                    await asyncio.sleep(0.5)
            stop_poll.set()
            await poll_task
            tick.cancel()
        memory["peak"] = await memory_snapshot(state, client, ids, rss, "peak", shards)
        for i, sid in enumerate(ids):
            await call(state, client, "delete", "DELETE", f"/v1/streams/{sid}", i)
        deleted_at = state.now()
        after_delete = []  # how the runtime's processes wind down after the deletion
        back_at = None  # when the runtime had no more ray:: processes than at the start
        while state.now() - deleted_at < args.settle_s:
            await asyncio.sleep(1.0)
            if rss is None:
                continue
            r = ray_rss(_rss_root(rss))
            after_delete.append({"t": state.now() - deleted_at, "workers": r["workers"],
                                 "workers_bytes": r["workers_bytes"], "count_by_name": r["count_by_name"]})
            if back_at is None and r["workers"] <= memory["start"]["rss"]["workers"]:
                back_at = state.now() - deleted_at
            if back_at is not None and state.now() - deleted_at > back_at + 3:
                break
        memory["end"] = await memory_snapshot(state, client, ids, rss, "end", shards)
        memory["after_delete"] = after_delete
        memory["processes_back_to_start_after_s"] = back_at

    per_stream = []
    for i, sid in enumerate(ids):
        dl = at_deadline[i].json() if at_deadline[i] is not None else {}
        fin = final.get(i, {})
        per_stream.append({
            "stream_id": sid, "seed": videos[i].seed, "chunks_pushed": state.chunks_pushed[i],
            "frames_pushed": state.frames_pushed[i],
            "at_deadline": {k: dl.get(k) for k in ("frames_ingested", "frames_decoded", "frames_dropped",
                                                   "frames_pending", "source_state")},
            "lag_frames_at_deadline": None if not dl else state.frames_pushed[i] - dl.get("frames_ingested", 0),
            "final": {k: fin.get(k) for k in ("frames_ingested", "frames_decoded", "frames_dropped", "frames_pending",
                                              "source_state", "segments", "retained_bytes", "recoveries",
                                              "last_error")},
            "drain_s": drained_at.get(i),
        })
    return {"state": state, "per_stream": per_stream, "memory": memory, "question_start_s": question_start,
            "t0_wall": time.time() - state.now(),  # the workload clock's 0, as time.time() (bench.capacity)
            "options": options, "model": model, "ids": ids}


# ---- figures ----------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(args, out: dict, url: str, local: bool) -> dict:
    state: State = out["state"]
    requests = state.requests
    asks = [r for r in requests if r.kind in ("ask", "ask_sse")]
    ok = [r for r in asks if r.error is None]
    lat = [r.latency_s for r in ok]
    sse = [r for r in ok if r.kind == "ask_sse"]
    ttft = [r.ttft_s for r in sse if r.ttft_s is not None]
    pushes = [r for r in requests if r.kind == "push"]
    by_kind: dict[str, dict] = {}
    for r in requests:
        row = by_kind.setdefault(r.kind, {"requests": 0, "errors": 0, "status": Counter()})
        row["requests"] += 1
        row["errors"] += r.error is not None
        row["status"][str(r.status) if r.status is not None else "exception"] += 1
    for row in by_kind.values():
        row["status"] = dict(row["status"])
    errors = Counter(f"{r.kind}: {r.error.split(':')[0] if r.status is None else r.error[:120]}"
                     for r in requests if r.error is not None)
    window = args.duration - (out["question_start_s"] or 0)
    summary = {
        "requests": len(requests), "errors": sum(errors.values()), "errors_by_kind": dict(errors),
        "questions_sent": state.asked, "answers_ok": len(ok), "answers_sse_ok": len(sse),
        "question_window_s": window, "achieved_question_rate": len(asks) / window if window > 0 else None,
        "answer_latency_s": {"p50": pct(lat, 50), "p95": pct(lat, 95), "p99": pct(lat, 99),
                             "mean": statistics.fmean(lat) if lat else None, "max": max(lat) if lat else None},
        "ttft_s": {"p50": pct(ttft, 50), "p95": pct(ttft, 95), "p99": pct(ttft, 99)},
        "push_latency_s": {"p50": pct([r.latency_s for r in pushes if r.error is None], 50),
                           "p99": pct([r.latency_s for r in pushes if r.error is None], 99),
                           "max": max([r.latency_s for r in pushes if r.error is None], default=None)},
        "first_push_s": [r.latency_s for r in requests if r.kind == "first_push"],
        "push_lateness_s": {"p50": pct(state.push_lateness, 50), "max": max(state.push_lateness, default=None)},
        "chunks_pushed": sum(state.chunks_pushed), "frames_pushed": sum(state.frames_pushed),
        "frames_ingested": sum((s["final"]["frames_ingested"] or 0) for s in out["per_stream"]),
        "frames_dropped": sum((s["final"]["frames_dropped"] or 0) for s in out["per_stream"]),
        "lag_frames_at_deadline_max": max((s["lag_frames_at_deadline"] or 0) for s in out["per_stream"]),
        "drain_s_max": max((s["drain_s"] for s in out["per_stream"] if s["drain_s"] is not None), default=None),
        "streams_not_drained": sum(s["drain_s"] is None for s in out["per_stream"]),
        "errors_before_fault": sum(r.error is not None and (state.killed_at is None or _ended(r) < state.killed_at)
                                   for r in requests),
    }
    if state.killed_at is not None:
        summary["coordinator_kill"] = coordinator_kill(state, out["per_stream"])
    per_stream_lat = defaultdict(list)
    for r in ok:
        per_stream_lat[r.stream].append(r.latency_s)
    for i, s in enumerate(out["per_stream"]):
        s["answers_ok"] = len(per_stream_lat[i])
        s["answer_p50_s"] = pct(per_stream_lat[i], 50)
    return {
        "command": "python -m bench.load " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "token"},
        "server": url if not local else "local (started by the benchmark)", "model": out["model"],
        "options": out["options"], "question_start_s": out["question_start_s"], "t0_wall": out["t0_wall"],
        "summary": summary, "by_kind": by_kind, "per_stream": out["per_stream"], "memory": out["memory"],
        "samples": state.samples, "answers_sample": state.answers,
        "requests": [{"kind": r.kind, "t": round(r.t, 3), "latency_s": None if r.latency_s is None else round(r.latency_s, 4),
                      "status": r.status, "error": r.error, "stream": r.stream,
                      "ttft_s": None if r.ttft_s is None else round(r.ttft_s, 4)}
                     for r in requests if r.kind in ("ask", "ask_sse", "push", "first_push") or r.error is not None],
    }


def _ended(request: Request) -> float:
    return request.t + (request.latency_s or 0)


def coordinator_kill(state: State, per_stream: list[dict]) -> dict:
    """What the coordinator's death cost the clients: the requests that failed after it (that
    ended after it, by status) and until when, and each stream's frames ingested after it (from the poller's last
    sample before the kill to the end)."""
    failed = [r for r in state.requests if r.error is not None and _ended(r) >= state.killed_at]
    before = [s for s in state.samples if s["t"] <= state.killed_at]
    at_kill = before[-1]["streams"] if before else {}
    return {
        "at_s": state.killed_at, "failed_requests": len(failed),
        "failed_by_status": dict(Counter(str(r.status) for r in failed)),
        "failures_until_s": max((_ended(r) for r in failed), default=None),
        "frames_ingested_after": [(s["final"]["frames_ingested"] or 0)
                                  - ((at_kill.get(s["stream_id"]) or {}).get("frames_ingested") or 0)
                                  for s in per_stream],
    }


def _ms(v) -> str:
    return "-" if v is None else f"{1000 * v:.0f} ms"


def _mib(v) -> str:
    return "-" if v is None else f"{v / MiB:.1f} MiB"


def report(results: dict, console) -> str:
    from rich.table import Table

    s, mem, cfg = results["summary"], results["memory"], results["config"]
    title = (f"HTTP load: {cfg['streams']} streams x {cfg['fps']:g} fps, {cfg['question_rate']:g} q/s "
             f"({cfg['arrivals']}), {cfg['duration']:g} s, {cfg['method']}")
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("questions sent / answered", f"{s['questions_sent']} / {s['answers_ok']} ({s['answers_sse_ok']} SSE)"),
        ("answer latency p50 / p95 / p99", " / ".join(_ms(s["answer_latency_s"][q]) for q in ("p50", "p95", "p99"))),
        ("SSE time to first content p50 / p99", f"{_ms(s['ttft_s']['p50'])} / {_ms(s['ttft_s']['p99'])}"),
        ("requests / errors", f"{s['requests']} / {s['errors']}"),
        ("first chunk (attaches the decoder), max", _ms(max(s["first_push_s"], default=None))),
        ("chunks pushed (push p50 / p99)", f"{s['chunks_pushed']} ({_ms(s['push_latency_s']['p50'])} / "
                                           f"{_ms(s['push_latency_s']['p99'])})"),
        ("frames pushed / ingested / dropped", f"{s['frames_pushed']} / {s['frames_ingested']} / {s['frames_dropped']}"),
        ("ingest lag at deadline (max, frames)", str(s["lag_frames_at_deadline_max"])),
        ("drain after close (max)", "-" if s["drain_s_max"] is None else f"{s['drain_s_max']:.1f} s"),
    ]
    for label, key in (("retained KV", "retained_kv_bytes"), ("object store", "object_store_bytes")):
        rows.append((f"{label} start / peak / end", " / ".join(_mib(mem[p].get(key)) for p in ("start", "peak", "end"))))
    if "rss" in mem["start"]:
        rows.append(("ray:: workers RSS start / peak / end",
                     " / ".join(_mib(mem[p]["rss"]["workers_bytes"]) for p in ("start", "peak", "end"))))
        rows.append(("ray:: workers PSS start / peak / end",
                     " / ".join(_mib(mem[p]["rss"]["workers_pss_bytes"]) for p in ("start", "peak", "end"))))
        rows.append(("ray:: processes start / peak / end",
                     " / ".join(str(mem[p]["rss"]["workers"]) for p in ("start", "peak", "end"))))
        rows.append(("Ray runtime RSS start / peak / end",
                     " / ".join(_mib(mem[p]["rss"]["runtime_bytes"]) for p in ("start", "peak", "end"))))
    if "rss" in mem["start"]:
        back = mem.get("processes_back_to_start_after_s")
        rows.append(("ray:: processes back to the start count after delete",
                     "not within --settle-s" if back is None else f"{back:.1f} s"))
    rows.append(("streams on the server at the end", str(mem["end"].get("server_streams"))))
    if "coordinator_kill" in s:
        kill = s["coordinator_kill"]
        until = "-" if kill["failures_until_s"] is None else f"{kill['failures_until_s'] - kill['at_s']:.1f} s after"
        rows += [("coordinator killed at", f"{kill['at_s']:.1f} s"),
                 ("requests failed after it (by status), last ending",
                  f"{kill['failed_requests']} ({kill['failed_by_status']}), {until}"),
                 ("frames ingested after it, per stream", str(kill["frames_ingested_after"]))]
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)
    if s["errors"]:
        errors = Table(title="errors")
        errors.add_column("kind: error")
        errors.add_column("count", justify="right")
        for key, n in sorted(s["errors_by_kind"].items(), key=lambda kv: -kv[1]):
            errors.add_row(key, str(n))
        console.print(errors)
    lines = [f"# {title}", "", "```bash", results["command"], "```", "", "| figure | value |", "|---|---:|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    lines += ["", "| stream | chunks | frames pushed | ingested | dropped | lag at deadline | drain | answers | p50 |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for st in results["per_stream"]:
        fin = st["final"]
        lines.append(f"| {st['stream_id']} | {st['chunks_pushed']} | {st['frames_pushed']} | {fin['frames_ingested']} | "
                     f"{fin['frames_dropped']} | {st['lag_frames_at_deadline']} | "
                     f"{'-' if st['drain_s'] is None else format(st['drain_s'], '.1f') + ' s'} | "
                     f"{st['answers_ok']} | {_ms(st['answer_p50_s'])} |")
    if s["errors"]:
        lines += ["", "| errors (kind: status type: message) | count |", "|---|---:|"]
        lines += [f"| {k.replace('|', '/')} | {n} |" for k, n in sorted(s["errors_by_kind"].items(), key=lambda kv: -kv[1])]
    if "rss" in mem["start"]:
        names = sorted(set(mem["start"]["rss"]["by_name"]) | set(mem["peak"]["rss"]["by_name"])
                       | set(mem["end"]["rss"]["by_name"]))
        lines += ["", "| Ray process (count) | RSS start | peak | end | PSS start | peak | end |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name in names:
            counts = "/".join(str(mem[p]["rss"]["count_by_name"].get(name, 0)) for p in ("start", "peak", "end"))
            lines.append(f"| {name} ({counts}) | "
                         + " | ".join(_mib(mem[p]["rss"]["by_name"].get(name)) for p in ("start", "peak", "end")) + " | "
                         + " | ".join(_mib(mem[p]["rss"]["by_name_pss"].get(name)) for p in ("start", "peak", "end"))
                         + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    asks = [r for r in results["requests"] if r["kind"] in ("ask", "ask_sse")]
    ids = [s["stream_id"] for s in results["per_stream"]]
    for i, sid in enumerate(ids):
        mine = sorted((r for r in asks if r["stream"] == i and r["error"] is None), key=lambda r: r["t"])
        if mine:
            top.plot([r["t"] for r in mine], [1000 * r["latency_s"] for r in mine], marker="o", ms=3, lw=0.8,
                     label=sid.rsplit("-", 1)[-1])
    failed = [r for r in asks if r["error"] is not None]
    if failed:
        top.scatter([r["t"] for r in failed], [1000 * (r["latency_s"] or 0) for r in failed], marker="x", c="red",
                    label="error", zorder=3)
    sse = [r for r in asks if r["kind"] == "ask_sse" and r["ttft_s"] is not None]
    if sse:
        top.scatter([r["t"] for r in sse], [1000 * r["ttft_s"] for r in sse], marker="^", s=14, c="k",
                    label="SSE first content", zorder=3)
    top.set_ylabel("answer latency (ms)")
    top.set_yscale("log")
    top.set_title(f"{results['config']['streams']} streams, {results['config']['question_rate']:g} questions/s: "
                  "latency by send time (stream = line)")
    if top.get_legend_handles_labels()[0]:
        top.legend(fontsize=7, ncol=4)
    samples = results["samples"]
    t = [s["t"] for s in samples]
    kv = [sum((v.get("retained_bytes") or 0) for v in s["streams"].values()) / MiB for s in samples]
    bottom.plot(t, kv, label="retained KV, all streams", color="tab:blue")
    bottom.set_ylabel("retained KV (MiB)")
    for axis in (top, bottom):
        axis.axvline(results["config"]["duration"], color="grey", ls="--", lw=0.8)
        axis.grid(alpha=0.3)
    bottom.set_xlabel("seconds since the first capture (dashed: deadline)")
    handles, labels = bottom.get_legend_handles_labels()
    memory = results["memory"]
    if samples and "pss_workers_bytes" in samples[0]:
        right = bottom.twinx()
        right.plot(t, [s["pss_workers_bytes"] / MiB for s in samples], color="tab:red", label="ray:: workers PSS")
        for when, style in (("start", ":"), ("end", "-.")):
            right.axhline(memory[when]["rss"]["workers_pss_bytes"] / MiB, color="tab:red", ls=style, lw=1,
                          label=f"PSS at {when} ({'no streams yet' if when == 'start' else 'streams deleted'})")
        right.set_ylabel("Ray worker PSS (MiB)")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    bottom.legend(handles, labels, fontsize=8, loc="upper left")
    frames = sum((st["final"]["frames_ingested"] or 0) for st in results["per_stream"])
    bottom.set_title(f"memory; {frames} frames ingested in all", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- entry ----------------------------------------------------------------------------------------
def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of pushing and asking")
    parser.add_argument("--question-rate", type=float, default=1.0, help="questions per second, all streams together")
    parser.add_argument("--arrivals", choices=("uniform", "poisson"), default="uniform")
    parser.add_argument("--sse-fraction", type=float, default=0.25, help="share of questions asked with stream=true")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--fps", type=float, default=4.0, help="frame rate of the pushed videos")
    parser.add_argument("--chunk-s", type=float, default=1.0, help="seconds of video per pushed chunk")
    parser.add_argument("--method", default="rekv")
    parser.add_argument("--options", default="{}", help="JSON engine options, over the scaled preset")
    parser.add_argument("--tokens-per-frame", type=int, default=4,
                        help="scale the preset's token-valued knobs to this model (demo: 4; 0: send none)")
    parser.add_argument("--policy", choices=("block", "drop"), default="block", help="push backpressure policy")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="first held-out world seed (>= 90000)")
    parser.add_argument("--poll-s", type=float, default=2.0)
    parser.add_argument("--ready-timeout", type=float, default=30.0,
                        help="ask from this time on even if some stream has no frames yet")
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--settle-s", type=float, default=30.0,
                        help="after deleting, wait up to this long for the runtime's process count to return to "
                             "the start's (deleted streams' decoder processes exit some seconds later)")
    parser.add_argument("--no-prime", dest="prime", action="store_false",
                        help="do not push every stream's first chunk (which attaches its decoder) before the clock starts")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument("--url", help="an already running server; nothing is started")
    parser.add_argument("--token", help="bearer token (with --url; or the token the local server requires)")
    parser.add_argument("--local-rss", action="store_true",
                        help="with --url: sum the RSS of every ray:: process on this host (same-host servers)")
    local = parser.add_argument_group("the local service (without --url)")
    local.add_argument("--model", type=Path, default=REPO / "models" / "demo")
    local.add_argument("--num-cpus", type=float, default=4)
    local.add_argument("--object-store-mib", type=int, default=512)
    local.add_argument("--answerers", type=int, default=1)
    local.add_argument("--actor-cpus", type=float, default=0.25)
    local.add_argument("--coordinator-cpus", type=float, default=0.1)
    local.add_argument("--api-cpus", type=float, default=0.1)
    local.add_argument("--threads", type=int, default=1, help="torch threads per actor (OMP_NUM_THREADS)")
    local.add_argument("--server-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="extra build_app args, e.g. max_answerers=4")
    local.add_argument("--kill-coordinator-at", type=float, metavar="SECONDS",
                       help="kill the coordinator's process at this time on the workload clock (Ray restarts it)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", default="load", help="result files: <name>.json, <name>.md, <name>_latency.png")
    args = parser.parse_args(argv)
    if args.seed < HELD_OUT_SEED:
        parser.error(f"--seed must be a held-out seed >= {HELD_OUT_SEED}")
    if args.streams < 1 or args.duration <= 0 or args.fps <= 0 or args.chunk_s <= 0:
        parser.error("need --streams >= 1 and positive --duration, --fps, --chunk-s")
    return args


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = parse(argv)
    console = Console(stderr=True)
    service = None if args.url else LocalService(args)
    rss = "local" if service is not None else ("host" if args.local_rss else None)
    try:
        url = args.url.rstrip("/") if args.url else service.start(console)
        try:
            out = asyncio.run(workload(args, url, rss, console, service and service.kill_coordinator))
        except RuntimeError as exc:  # the server is not usable: no figures to write
            console.log(f"[red]{exc}")
            return 2
        results = summarize(args, out, url, service is not None)
    finally:
        if service is not None:
            console.log("shutting down the local Serve app and Ray")
            service.close()
    if service is not None:  # nothing of the runtime may outlive it
        time.sleep(2)
        procs = processes()
        mine = descendants(os.getpid(), procs)
        left = [(pid, cmd[:80]) for pid, _, cmd, _ in procs if pid in mine]
        results["leftover_processes"] = left
        if left:
            console.log(f"[red]processes left after ray.shutdown: {left}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / f"{args.name}.md").write_text(report(results, Console()))
    plot(results, args.out / f"{args.name}_latency.png")
    console.log(f"wrote {args.out / args.name}.json, .md, _latency.png")
    return 1 if results["summary"]["errors_before_fault"] else 0



if __name__ == "__main__":
    sys.exit(main())
