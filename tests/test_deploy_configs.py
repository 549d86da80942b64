"""The deployment configs in deploy/ agree with each other, with Ray Serve, and with the code.

- deploy/kuberay/rayservice.yaml serves the same Serve applications as deploy/serve.yaml (only
  model_dir, device and placement differ) on a cluster that offers every custom resource CLUSTER_PLACEMENT asks for;
- deploy/serve.yaml is a valid Serve config, with no field Serve does not know (a typo fails);
- END-TO-END: `serve run deploy/serve.yaml` from the repository root starts the API, as the
  README says (test_serve_run_starts_the_api_from_the_repository_root, about a minute).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import httpx
import pytest
import yaml

from deploy.ingest import CLUSTER_PLACEMENT

ROOT = Path(__file__).resolve().parent.parent
SERVE_YAML = ROOT / "deploy" / "serve.yaml"
RAYSERVICE_YAML = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
# Application args allowed to differ between the two: paths that only exist in one place, and
# where the model actors run (a laptop's CPU vs the cluster's GPU node group).
ALLOWED_ARG_DIFFERENCES = {"model_dir", "device", "placement"}


def _serve_config() -> dict:
    return yaml.safe_load(SERVE_YAML.read_text())


def _rayservice() -> dict:
    return yaml.safe_load(RAYSERVICE_YAML.read_text())


def _custom_resources(ray_start_params: dict) -> dict[str, float]:
    """KubeRay's `resources` start param: the string '"{\\"decoder\\": 8}"' (outer quotes and
    backslashes are literal characters, as KubeRay's docs show) -> {"decoder": 8}."""
    raw = ray_start_params.get("resources")
    if raw is None:
        return {}
    text = raw.strip()
    assert text.startswith('"') and text.endswith('"'), f"KubeRay wants the JSON in literal quotes: {raw!r}"
    return json.loads(text[1:-1].replace('\\"', '"'))


def _without_allowed_differences(applications: list[dict]) -> list[dict]:
    out = []
    for app in applications:
        app = dict(app)
        app["args"] = {k: v for k, v in (app.get("args") or {}).items() if k not in ALLOWED_ARG_DIFFERENCES}
        out.append(app)
    return out


# ---- KubeRay RayService ------------------------------------------------------------------------
def test_rayservice_serves_the_same_applications_as_serve_yaml():
    manifest = _rayservice()
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayService"
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    local = _serve_config()

    # Everything but ALLOWED_ARG_DIFFERENCES is the same, so the two cannot drift apart.
    assert _without_allowed_differences(serve_config["applications"]) == \
        _without_allowed_differences(local["applications"])
    for app in serve_config["applications"]:
        assert Path(app["args"]["model_dir"]).is_absolute()  # a path inside the image, not the caller's cwd
    assert serve_config["http_options"]["port"] == 8000  # what KubeRay's serve Service targets
    _validate_serve_config(serve_config)


def test_rayservice_cluster_offers_what_the_placement_asks_for_and_autoscales():
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    for value in head["rayStartParams"].values():  # KubeRay takes every start param as a string
        assert isinstance(value, str)

    groups = cluster["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    offered = {}  # group -> what one of its Pods offers Ray
    for group in groups:
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1
        params = group.get("rayStartParams") or {}
        for value in params.values():
            assert isinstance(value, str)
        (container,) = [c for c in group["template"]["spec"]["containers"] if c["name"] == "ray-worker"]
        limits = container["resources"]["limits"]
        offered[group["groupName"]] = {
            "CPU": float(params.get("num-cpus", limits["cpu"])),
            "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
            **_custom_resources(params),
        }

    head_params = head["rayStartParams"]  # the head Pod too: the coordinator's and the compressor's node
    offered["head"] = {"CPU": float(head_params.get("num-cpus", 0)), "GPU": float(head_params.get("num-gpus", 0)),
                       **_custom_resources(head_params)}
    for kind, options in CLUSTER_PLACEMENT.items():
        asked = dict(options.get("resources", {}))
        asked["GPU"] = options.get("num_gpus", 0)
        asked["CPU"] = options.get("num_cpus", 0)
        custom = set(options.get("resources", {}))
        fitting = [name for name, offer in offered.items()
                   if custom <= set(offer) and all(offer.get(r, 0) >= amount for r, amount in asked.items())]
        assert fitting, f"no group offers what {kind!r} asks for: {asked} (groups offer {offered})"

    # The Serve deployment autoscales too.
    serve_config = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    for app in serve_config["applications"]:
        for deployment in app.get("deployments", []):
            scaling = deployment.get("autoscaling_config")
            if scaling:
                assert scaling["min_replicas"] <= scaling["max_replicas"]
                assert "num_replicas" not in deployment  # Serve refuses both at once


# ---- deploy/serve.yaml against Ray Serve's schema ----------------------------------------------------
def _unknown_keys(data: dict, model, where: str) -> list[str]:
    """Serve's schema models accept (and ignore) unknown fields, so a misspelt option would pass
    ServeDeploySchema silently: list the keys that no field of `model` takes."""
    names = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
    return [f"{where}.{key}" for key in data if key not in names]


def _validate_serve_config(config: dict) -> None:
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema, HTTPOptionsSchema, RayActorOptionsSchema, ServeApplicationSchema, ServeDeploySchema,
    )

    ServeDeploySchema.model_validate(config)  # types, ranges, duplicate names and routes
    unknown = _unknown_keys(config, ServeDeploySchema, "config")
    unknown += _unknown_keys(config.get("http_options") or {}, HTTPOptionsSchema, "http_options")
    for app in config["applications"]:
        unknown += _unknown_keys(app, ServeApplicationSchema, f"applications[{app['name']}]")
        for deployment in app.get("deployments") or []:
            where = f"applications[{app['name']}].deployments[{deployment['name']}]"
            unknown += _unknown_keys(deployment, DeploymentSchema, where)
            unknown += _unknown_keys(deployment.get("ray_actor_options") or {}, RayActorOptionsSchema,
                                     f"{where}.ray_actor_options")
            scaling = deployment.get("autoscaling_config")
            if scaling:
                AutoscalingConfig.model_validate(scaling)
                unknown += _unknown_keys(scaling, AutoscalingConfig, f"{where}.autoscaling_config")
    assert not unknown, f"fields Ray Serve does not know: {unknown}"


def test_serve_yaml_is_a_valid_serve_config():
    config = _serve_config()
    _validate_serve_config(config)
    (app,) = config["applications"]
    assert app["import_path"] == "deploy.app:build_app"
    assert app["args"]["model_dir"] == "models/demo" and (ROOT / "models" / "demo").is_dir()


def test_schema_check_catches_a_misspelt_field():
    config = _serve_config()
    config["applications"][0]["deployments"][0]["max_ongoing_request"] = 8
    with pytest.raises(AssertionError, match="max_ongoing_request"):
        _validate_serve_config(config)
    config = _serve_config()
    config["applications"][0]["deployments"][0]["autoscaling_config"]["max_replica"] = 8
    with pytest.raises(AssertionError, match="max_replica"):
        _validate_serve_config(config)


def test_serve_yaml_args_are_read_by_build_app():
    """Every `args:` key of the application is one build_app reads (an unread one is silently
    ignored: the YAML would promise a setting the service does not have)."""
    from deploy.app import Settings

    read = {f.name for f in fields(Settings)} - {"api_tokens"}
    read |= {"api_token", "api_cpus", "replicas"}  # read by build_app / settings_from_args under these names
    (app,) = _serve_config()["applications"]
    assert set(app["args"]) - read == set()


# ---- END-TO-END: `serve run deploy/serve.yaml` -------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`: everything `serve run` and its Ray started
    (Ray's workers get process groups of their own, but stay in the session)."""
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


def _stop(proc: subprocess.Popen, grace_s: float = 60) -> None:
    """Ctrl-C (serve run shuts Serve and its local Ray down), then the process group, then every
    remaining process of the run's session, by pid."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
    deadline = time.monotonic() + 30  # Ray's processes share the driver's fate, a moment later
    while (left := _session_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_serve_run_starts_the_api_from_the_repository_root(tmp_path):
    """END-TO-END (about a minute): `serve run deploy/serve.yaml`, run from the repository root
    with a NEW local Ray (no RAY_ADDRESS; not the test session's runtime), answers /healthz,
    creates and lists a push stream and serves the model `demo`; Ctrl-C leaves no process behind.
    The config is serve.yaml with only the HTTP port changed (to a free one)."""
    if sys.platform != "linux":
        pytest.skip("process clean-up is checked through /proc")
    config = _serve_config()
    port = _free_port()
    config["http_options"]["port"] = port
    run_yaml = tmp_path / "serve.yaml"
    run_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
    serve_cli = Path(sys.executable).with_name("serve")  # the console script next to this Python
    assert serve_cli.exists(), f"no `serve` script next to {sys.executable}"

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ctrl-C must reach serve run even when this test runs with SIGINT ignored (as background jobs
    # do, and children inherit): reset it to the default before exec'ing the real script.
    launcher = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                "os.execv(sys.argv[1], sys.argv[1:])")
    log_path = tmp_path / "serve-run.log"
    start = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", launcher, str(serve_cli), "run", str(run_yaml)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        # The first stream waits for the model actors to load: slow on a busy 2-core machine.
        with httpx.Client(base_url=base, timeout=120) as client:
            deadline = time.monotonic() + 180
            while True:
                assert proc.poll() is None, f"serve run exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}"
                try:
                    health = client.get("/healthz")
                    if health.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"no healthy /healthz in 180 s:\n{log_path.read_text()[-4000:]}"
                time.sleep(1)
            assert health.json()["model"] == "demo"
            started_s = time.monotonic() - start

            created = client.post("/v1/streams", json={"stream_id": "cfg"})
            assert created.status_code == 201, created.text
            assert created.json()["stream_id"] == "cfg"
            got = client.get("/v1/streams/cfg")
            assert got.status_code == 200, got.text
            assert got.json()["stream_id"] == "cfg" and got.json()["frames_ingested"] == 0
            models = client.get("/v1/models")
            assert models.status_code == 200, models.text
            assert [m["id"] for m in models.json()["data"]] == ["demo"]
            print(f"serve run healthy after {started_s:.1f} s")
    finally:
        _stop(proc)
    assert proc.returncode is not None
    assert _session_members(proc.pid) == [], "processes of the serve run were left behind"
