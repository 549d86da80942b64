"""Cluster autoscaling on one machine (issue 23, item 5): ray_cluster.yaml's node types under Ray's
autoscaler with the fake multi-node provider (bench/fake_cluster.py: every node a raylet process
here), driven through a named StreamCoordinator with the deployment's cluster placement
(deploy.ingest.CLUSTER_PLACEMENT) and the shipped demo model.

    python -m bench.autoscale [--out bench/results/autoscale.json]   # the default

Prints one JSON verdict (its last line of stdout): `ok`, each check, the timings, every node's
type and when it came and went. The steps:
1. model actors: the coordinator (on the head) starts prefill, compressor (on the head: it loads
   no model) and one answer actor, which ask for GPU-worker resources: the autoscaler adds
   gpu_workers nodes for them.
2. decoders: STREAMS_PER_DECODER_NODE + 1 streams take an upload each, kept open (a running
   source). Decoder hosts of one source each ask for the share of a cpu_decoders node that leaves
   room for STREAMS_PER_DECODER_NODE of them (the yaml sizes a node for 8 one-unit decoders; 2 a
   node keeps the processes few here), so the last one makes the autoscaler add a second
   decoder node.
3. node loss: the node holding the prefill actor is killed (its raylet stops at once, its actors'
   processes with it). The next frames of a stream fed directly (the probe) go through the
   restarted prefill actor (on a node the autoscaler adds), restored from an answer actor's
   replica. Answers must equal the single-process engine's on the same frames (as
   tests/test_ray_pipeline.py checks), and the decoder-fed streams answer as before the loss,
   with every decoded frame still counted.
4. answer pool: waves of concurrent questions (answer_target_ongoing=2) make the pool grow to
   max_answerers; the new answer actor does not fit beside the others, so the autoscaler adds a
   gpu_workers node for it; it receives every stream and answers like the engine.
5. scale down: the decoder streams are deleted (their decoders go) and an answer actor idle for
   ANSWER_IDLE_S is removed (the pool picks which: see use_in_order): the autoscaler removes the
   nodes left idle (idle_timeout_minutes), until every worker node left hosts an actor.
The cluster is stopped at the end and no process of it may be left.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import ray

from bench.engine import QUESTIONS, frames_for
from bench.fake_cluster import REPO_ROOT, FakeCluster, HeadStartError, cluster_spec, kill_node, node_type_of

MODEL_DIR = REPO_ROOT / "models" / "demo"
NAME = "autoscale-coordinator"
METHOD, OPTIONS = "rekv", {"top_k": 4, "n_local": 24}
CHUNK = 8  # probe frames per ingest
TOKENS = 8  # per answer
STREAMS_PER_DECODER_NODE = 2
ANSWER_IDLE_S = 10.0
IDLE_TIMEOUT_MINUTES = 0.1
MAX_WORKERS = {"cpu_decoders": 2, "gpu_workers": 4}
WAIT_S = 240.0  # the longest any one step may wait (a loaded 2-core machine starts nodes slowly)


def log(message: str) -> None:
    print(f"[autoscale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class NodeWatch(threading.Thread):
    """Polls the cluster's nodes: when each was first seen alive and first seen dead."""

    def __init__(self, spec, t0: float):
        super().__init__(daemon=True)
        self.spec, self.t0, self.nodes, self.stopped = spec, t0, {}, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.25):
            self.poll()

    def poll(self) -> None:
        now = time.monotonic() - self.t0
        for node in ray.nodes():
            entry = self.nodes.setdefault(node["NodeID"], {
                "type": node_type_of(node["Resources"], self.spec), "added_s": None, "removed_s": None})
            if node["Alive"] and entry["added_s"] is None:
                entry["added_s"] = round(now, 1)
            if not node["Alive"] and entry["removed_s"] is None:
                entry["removed_s"] = round(now, 1)

    def alive(self, node_type: str) -> list[str]:
        return [nid for nid, n in self.nodes.items() if n["type"] == node_type and n["removed_s"] is None
                and n["added_s"] is not None]


def wait_until(predicate, what: str, timeout_s: float = WAIT_S, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(poll_s)


def actor_nodes() -> dict[str, str]:
    """Alive named actors of the coordinator -> the node each runs on."""
    from ray._private.state import actors

    return {a["Name"]: a["Address"]["NodeID"] for a in actors().values()
            if a["State"] == "ALIVE" and a.get("Name", "").startswith(NAME)}


def cluster_snapshot(spec) -> dict:
    """Every alive node: its type, the actors on it, its resources in use (why a node stays)."""
    from ray._private.state import actors, available_resources_per_node

    available = available_resources_per_node()
    out = {}
    for node in ray.nodes():
        if node["Alive"]:
            free = available.get(node["NodeID"], {})
            out[node["NodeID"][-5:]] = {
                "type": node_type_of(node["Resources"], spec),
                "in_use": {k: round(v - free.get(k, 0), 3) for k, v in node["Resources"].items()
                           if not k.startswith("node:") and v - free.get(k, 0) > 0},
                "actors": sorted(a.get("Name") or a["ActorClassName"] for a in actors().values()
                                 if a["State"] == "ALIVE" and a["Address"]["NodeID"] == node["NodeID"])}
    return out


def use_in_order(coordinator, names: list[str], gap_s: float, attempts: int = 6) -> list[float] | None:
    """Make the answer actors `names` (pool() names) answer one question each, in this order, at
    least `gap_s` apart: ask single questions (each goes to the least recently used actor, so
    they alternate) until the wanted one answered. When each answered last (time.monotonic()), or
    None if one never did."""
    done = []
    for name in names:
        if done:
            time.sleep(gap_s)
        for _ in range(attempts):
            ref, served = coordinator.ask.remote("probe", QUESTIONS[1], 48), set()
            while not ray.wait([ref], timeout=0.02)[0]:
                served |= {a["name"] for a in ray.get(coordinator.pool.remote())["answerers"] if a["in_flight"]}
            ray.get(ref)
            if served == {name}:
                done.append(time.monotonic())
                break
        else:
            return None
    return done


def answer_key(answer) -> tuple:
    """What must match between the engine and the cluster: token ids and evidence frames."""
    if isinstance(answer, dict):
        return answer["token_ids"], [list(e["frames"]) for e in answer["evidence"]]
    return answer.token_ids, [list(e.frames) for e in answer.evidence]


def expected_answers(frames) -> list[tuple]:
    """The single-process engine's answers: QUESTIONS[0] after the first chunk, QUESTIONS[1] after both."""
    from pipeline import StreamSession, load_model

    session = StreamSession(load_model(str(MODEL_DIR)), method=METHOD, **OPTIONS)
    session.add_frames(frames[:CHUNK])
    first = answer_key(session.ask(QUESTIONS[0], max_new_tokens=TOKENS))
    session.add_frames(frames[CHUNK:])
    return [first, answer_key(session.ask(QUESTIONS[1], max_new_tokens=TOKENS))]


def placement(spec) -> dict:
    """The deployment's cluster placement, decoders sized so STREAMS_PER_DECODER_NODE fill a node,
    answer actors a GPU each."""
    from deploy.ingest import CLUSTER_PLACEMENT

    units = spec.worker_types["cpu_decoders"]["resources"]["decoder"] / STREAMS_PER_DECODER_NODE
    decoder = CLUSTER_PLACEMENT["decoder"]
    # answer actors on GPUs of their own (README: "Placement by cluster shape"), so that a grown
    # pool needs an added node: with fractional GPUs the second one fits beside the first
    answerer = {**CLUSTER_PLACEMENT["answerer"], "num_gpus": 1}
    return {**CLUSTER_PLACEMENT, "decoder": {**decoder, "resources": {**decoder["resources"], "decoder": units}},
            "answerer": answerer}


def coordinator_options(cluster: FakeCluster) -> dict:
    """StreamCoordinator's options here: the cluster placement, a pool of 1 to 2 answer actors that
    grows at two questions in flight each (so the single questions of the other steps leave it
    alone) and shrinks after ANSWER_IDLE_S; decoder hosts of one source each, removed 2 s after
    their source goes."""
    return {"placement": placement(cluster.spec), "answerers": 1, "max_answerers": 2, "answer_target_ongoing": 2,
            "answer_idle_s": ANSWER_IDLE_S, "answer_start_timeout_s": WAIT_S,
            # one source a decoder host, each host the share of a node above: hosts fill nodes
            "decoder_capacity": 1, "decoder_idle_s": 2.0}


def scenario(cluster: FakeCluster, t0: float, verdict: dict, workdir: Path) -> None:
    watch = NodeWatch(cluster.spec, t0)
    watch.poll()
    watch.start()
    verdict["nodes"] = watch.nodes
    try:
        _steps(coordinator_options(cluster), watch, t0, verdict, workdir)
    finally:
        watch.stopped.set()
        watch.join(timeout=5)


def _steps(options: dict, watch: NodeWatch, t0: float, verdict: dict, workdir: Path) -> None:
    from actors.coordinator import NAMESPACE, StreamCoordinator
    from pipeline.decode import DecodeConfig
    from pipeline.video_io import write_video

    checks, timings = verdict["checks"], verdict["timings_s"]
    frames = frames_for(2 * CHUNK)
    expected = expected_answers(frames)
    # cameras are uploads kept open (a source that runs; a finished file would free its decoder
    # host's slot at once, and no node would be needed for it)
    clip = workdir / "camera.ts"
    write_video(clip, frames_for(16, seed=7), fps=8, container_format="mpegts")
    clip_frames = 16

    # 1. model actors onto gpu_workers nodes
    start = time.monotonic()
    coordinator = ray.remote(StreamCoordinator).options(
        name=NAME, namespace=NAMESPACE, lifetime="detached", num_cpus=0.1, resources={"head": 0.01},
        max_restarts=-1,
    ).remote(str(MODEL_DIR), **options)
    ray.get(coordinator.create_stream.remote("probe", METHOD, OPTIONS), timeout=WAIT_S + 60)
    timings["model_actors_up"] = round(time.monotonic() - start, 1)
    placed = actor_nodes()
    checks["model_actors_on_gpu_nodes"] = all(  # (the compressor loads no model: it runs on the head node)
        watch.nodes.get(placed.get(f"{NAME}.{kind}"), {}).get("type") == "gpu_workers"
        for kind in ("prefill", "answerer0"))
    log(f"model actors up after {timings['model_actors_up']} s on {len(watch.alive('gpu_workers'))} gpu nodes")
    ray.get(coordinator.ingest.remote("probe", frames[:CHUNK]))
    answers = [answer_key(ray.get(coordinator.ask.remote("probe", QUESTIONS[0], TOKENS)))]

    # 2. one stream more than a decoder node holds: a second decoder node
    cams = [f"cam{i}" for i in range(STREAMS_PER_DECODER_NODE + 1)]
    for sid in cams:
        ray.get(coordinator.create_stream.remote(sid, METHOD, OPTIONS))
    attach_s = []
    for sid in cams:
        start = time.monotonic()
        ray.get(coordinator.attach_source.remote(sid, None, DecodeConfig(read_timeout_s=None), "block",
                                                 start_timeout_s=WAIT_S), timeout=WAIT_S + 30)
        ray.get(coordinator.push.remote(sid, clip.read_bytes(), 0), timeout=WAIT_S)
        attach_s.append(round(time.monotonic() - start, 1))
        if sid == cams[-1]:
            decoder_demand = start
    timings["decoder_attach"] = attach_s
    decoder_nodes = wait_until(lambda: len(watch.alive("cpu_decoders")) == 2 and watch.alive("cpu_decoders"),
                               "a second decoder node")
    added = max(watch.nodes[n]["added_s"] for n in decoder_nodes)
    timings["decoder_node_added"] = round(added - (decoder_demand - t0), 1)
    hosts = {name: node for name, node in actor_nodes().items() if ".decoder." in name}
    checks["decoder_node_added"] = (len(hosts) == len(cams) and len(set(hosts.values())) == 2
                                    and all(watch.nodes[n]["type"] == "cpu_decoders" for n in hosts.values()))
    log(f"decoders on {len(set(hosts.values()))} decoder nodes; the second added "
        f"{timings['decoder_node_added']} s after its stream's attach")
    for sid in cams:  # the uploads end now (a demuxer holds an open upload's last frames back)
        ray.get(coordinator.close_source.remote(sid), timeout=WAIT_S)

    def decoded():
        found = ray.get([coordinator.status.remote(sid) for sid in cams])
        return all(s["source_state"] == "finished" and s["frames_ingested"] == clip_frames for s in found) and found

    statuses = wait_until(decoded, "the camera uploads decoded")
    before = {sid: answer_key(ray.get(coordinator.ask.remote(sid, QUESTIONS[0], TOKENS))) for sid in cams}

    # 3. the node holding the prefill actor goes away
    victim = actor_nodes()[f"{NAME}.prefill"]
    verdict["killed_node_hosted"] = sorted(n.split(".", 1)[1] for n, node in actor_nodes().items() if node == victim)
    (node,) = [n for n in ray.nodes() if n["NodeID"] == victim]
    start = time.monotonic()
    kill_node(node)
    prefill = f"{NAME}.prefill"
    wait_until(lambda: actor_nodes().get(prefill, victim) != victim, "the prefill actor restarted elsewhere")
    timings["prefill_restarted"] = round(time.monotonic() - start, 1)
    ray.get(coordinator.ingest.remote("probe", frames[CHUNK:]), timeout=WAIT_S + 60)  # restored from a replica first
    timings["prefill_recovered"] = round(time.monotonic() - start, 1)
    answers.append(answer_key(ray.get(coordinator.ask.remote("probe", QUESTIONS[1], TOKENS))))
    after = {sid: answer_key(ray.get(coordinator.ask.remote(sid, QUESTIONS[0], TOKENS))) for sid in cams}
    statuses_after = ray.get([coordinator.status.remote(sid) for sid in cams])
    probe = ray.get(coordinator.status.remote("probe"))
    checks["node_loss_lost_nothing"] = (
        answers == expected and before == after and probe["restarts"]["prefill"] >= 1
        and probe["frames_ingested"] == 2 * CHUNK
        and all(a["frames_ingested"] == b["frames_ingested"] == b["frames_decoded"] - b["frames_dropped"] > 0
                for a, b in zip(statuses_after, statuses)))
    verdict["restarts"] = probe["restarts"]
    log(f"prefill restarted on another node {timings['prefill_restarted']} s after its node was killed, "
        f"restored and ingesting after {timings['prefill_recovered']} s; "
        f"answers equal the engine's: {answers == expected}, cameras as before: {before == after}")

    # 4. a question load grows the answer pool onto a node added for it
    start = time.monotonic()
    grown, pool_answers = None, []
    while grown is None:  # waves of 4 questions at once
        wave = [coordinator.ask.remote("probe", QUESTIONS[1], TOKENS) for _ in range(4)]
        pool_answers += [answer_key(a) for a in ray.get(wave, timeout=WAIT_S)]
        state = ray.get(coordinator.pool.remote())
        if state["answerers_added"] >= 1:
            grown = state
        elif state["answerers_unplaced"] or time.monotonic() - start > WAIT_S:
            raise TimeoutError(f"the answer pool did not grow: {state}")
        time.sleep(0.5)
    timings["answerer_ready"] = round(time.monotonic() - start, 1)
    # both actors take questions now (the least busy first)
    pool_answers += [answer_key(a) for a in ray.get([coordinator.ask.remote("probe", QUESTIONS[1], TOKENS)
                                                     for _ in range(4)])]
    placed = actor_nodes()
    new_node = placed.get(f"{NAME}.answerer1")
    others = {node for name, node in placed.items() if not name.endswith("answerer1")}
    answer_node = watch.nodes.get(new_node, {})
    timings["answer_node_added"] = round(answer_node.get("added_s", 0) - (start - t0), 1) if answer_node else None
    checks["answer_pool_grew_onto_new_node"] = (grown["answerers_added"] >= 1 and answer_node.get("type") == "gpu_workers"
                                                and new_node not in others)
    checks["pool_answers_match_engine"] = bool(pool_answers) and all(a == expected[1] for a in pool_answers)
    log(f"answer pool grew: answerer1 on a new gpu node ({checks['answer_pool_grew_onto_new_node']}), ready "
        f"{timings['answerer_ready']} s after the load began; {len(pool_answers)} answers equal the engine's: "
        f"{checks['pool_answers_match_engine']}")

    # 5. idle nodes are removed. The pool removes the first actor (in the order they were added)
    # idle for answer_idle_s at its check: the original one is used last, answer_idle_s after the
    # other, so that the one leaving is the one alone on the node added for it
    last_used = use_in_order(coordinator, ["answerer1", "answerer0"], gap_s=ANSWER_IDLE_S + 1)
    verdict["original_answerer_used_last"] = last_used is not None
    deleted = time.monotonic()
    for sid in cams:
        ray.get(coordinator.delete_stream.remote(sid))
    wait_until(lambda: not watch.alive("cpu_decoders"), "decoder nodes removed")
    timings["decoder_nodes_removed"] = round(max(watch.nodes[n]["removed_s"] for n in decoder_nodes)
                                             - (deleted - t0), 1)
    shrunk = wait_until(lambda: (s := ray.get(coordinator.pool.remote()))["answerers_removed"] >= 1 and s,
                        "the answer pool shrunk")
    (gone,) = {"answerer0", "answerer1"} - {a["name"] for a in shrunk["answerers"]}
    gone_node = placed[f"{NAME}.{gone}"]
    shared = any(node == gone_node for name, node in placed.items() if not name.endswith(gone))
    verdict["removed_answerer"] = {"name": gone, "shared_its_node": shared}
    if not shared:
        wait_until(lambda: watch.nodes[gone_node]["removed_s"] is not None, "the answer actor's node removed")
        if last_used is not None and gone == "answerer1":  # answer_idle_s, then idle_timeout_minutes
            timings["answer_node_removed_after_its_last_question"] = round(
                watch.nodes[gone_node]["removed_s"] - (last_used[0] - t0), 1)
    # and no worker node is left without an actor
    wait_until(lambda: all(n["actors"] for n in cluster_snapshot(watch.spec).values() if n["type"] != "head"),
               "every idle node removed")
    checks["idle_nodes_removed"] = not watch.alive("cpu_decoders") and shrunk["answerers_removed"] >= 1
    verdict["pool"] = shrunk
    log(f"decoder nodes removed {timings['decoder_nodes_removed']} s after their streams were deleted; {gone} "
        f"removed, its node " + ("kept (shared with other actors)" if shared else "removed " + str(
            timings.get("answer_node_removed_after_its_last_question")) + " s after the actor's last question"))
    ray.get(coordinator.delete_stream.remote("probe"))
    watch.poll()


def run(out: Path | None = None) -> dict:
    t0 = time.monotonic()
    spec = cluster_spec(max_workers=MAX_WORKERS)
    verdict = {"ok": False, "checks": {}, "timings_s": {}, "error": None,
               "node_types": {"head": spec.head_resources, **{k: v["resources"] for k, v in spec.worker_types.items()}}}
    cluster = FakeCluster(spec, idle_timeout_minutes=IDLE_TIMEOUT_MINUTES)
    try:
        with tempfile.TemporaryDirectory(prefix="autoscale-") as workdir:
            cluster.start()
            verdict["timings_s"]["head_up"] = round(time.monotonic() - t0, 1)
            cluster.connect()
            scenario(cluster, t0, verdict, Path(workdir))
    except Exception as error:  # noqa: BLE001 - the verdict says what failed; the cluster still goes
        verdict["error"] = f"{type(error).__name__}: {error}"
        verdict["head_did_not_start"] = isinstance(error, HeadStartError)
        verdict["traceback"] = traceback.format_exc()[-3000:]
        try:
            verdict["cluster"] = cluster_snapshot(spec)
        except Exception:  # noqa: BLE001 - diagnostics only
            pass
        log_text = cluster.monitor_log_tail(200_000) if cluster.temp_dir else ""
        verdict["autoscaler_log"] = [line for line in log_text.splitlines()
                                     if any(w in line for w in ("idle", "erminat", "aunch", "ailed", "rror"))][-60:]
    finally:
        try:
            from deploy.ingest import stop_coordinator

            if ray.is_initialized():
                stop_coordinator(NAME)
        except Exception:  # noqa: BLE001 - the cluster goes anyway
            pass
        ray.shutdown()
        cluster.stop()
    verdict["cluster_session"] = cluster.process.pid if cluster.process is not None else None
    verdict["checks"]["no_process_left"] = not cluster.left_behind()
    verdict["timings_s"]["total"] = round(time.monotonic() - t0, 1)
    verdict["ok"] = verdict["error"] is None and all(verdict["checks"].values())
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(verdict, indent=2))
    return verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "autoscale.json",
                        help="also write the verdict here (JSON)")
    args = parser.parse_args(argv)
    # a caller's SIGTERM (a timeout) unwinds through run(), which stops the cluster
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    verdict = run(args.out)
    print(json.dumps(verdict))
    return 0 if verdict["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
