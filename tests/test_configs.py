"""Deployment configs agree with the code that relies on them."""

from pathlib import Path

import yaml
from typer.testing import CliRunner

from deploy.cli import app
from deploy.ingest import CLUSTER_PLACEMENT

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_config_offers_every_resource_the_placement_asks_for():
    cluster = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    offered = {name for node in cluster["available_node_types"].values() for name in node["resources"]}
    asked = {name for options in CLUSTER_PLACEMENT.values() for name in options.get("resources", {})}
    assert asked <= offered
    assert cluster["head_node_type"] in cluster["available_node_types"]
    for node in cluster["available_node_types"].values():
        assert node["min_workers"] <= node["max_workers"] <= cluster["max_workers"]
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--port=6380" in head_start  # Redis keeps 6379 on the head node


def test_cli_lists_its_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("demo", "serve", "ingest", "ask", "status", "bench"):
        assert command in result.output
    assert CliRunner().invoke(app, ["bench", "nonsense"]).exit_code != 0


def test_every_ray_start_caps_the_gcs_task_records_as_the_benchmarks_do():
    """The GCS's task records grew ~200 KiB per stream lifetime up to Ray's default cap
    (BENCHMARKS.md "Stream churn"): the cluster launcher, KubeRay and the local service all set
    the same smaller cap (bench/load.py RAY_SYSTEM_CONFIG)."""
    from bench.load import RAY_SYSTEM_CONFIG

    cap = RAY_SYSTEM_CONFIG["task_events_max_num_task_in_gcs"]
    cluster = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    assert f"RAY_task_events_max_num_task_in_gcs={cap} ray start --head" in " ".join(cluster["head_start_ray_commands"])
    manifest = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "RAY_task_events_max_num_task_in_gcs", "value": str(cap)} in head["env"]
