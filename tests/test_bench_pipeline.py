"""The Ray pipeline benchmark runs end to end at a small size (in a process of its own: it starts
and stops its own Ray runtime) and records what BENCHMARKS.md quotes."""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_a_small_run_records_every_stream_count_against_the_engine(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "bench.pipeline", "--streams", "1", "2", "--frames", "16", "--rounds", "1",
         "--answerers", "2", "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Ray pipeline vs engine" in run.stdout
    results = json.loads((tmp_path / "pipeline_tiny.json").read_text())
    assert results["answerers"] == 2 and len(results["engine"]) == 1
    assert set(results["pipeline"]) == {"1", "2"}
    for rows in results["pipeline"].values():
        assert rows[0]["aggregate_ingest_fps"] > 0 and rows[0]["latency_p50_s"] > 0
        # ingest CPU time by process: the model actors did the work, not the engine (this process)
        assert rows[0]["ingest_cpu_s"]["ray::PrefillWorker"] > 0 and "engine" not in rows[0]["ingest_cpu_s"]
    assert results["engine"][0]["ingest_cpu_s"]["engine"] > 0
    assert "ingest CPU seconds per 1,000 frames" in run.stdout
    assert (tmp_path / "pipeline_tiny.png").read_bytes().startswith(b"\x89PNG")


def test_the_restart_benchmark_records_takeover_against_a_cold_start(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "bench.restart", "--streams", "2", "--frames", "16", "--rounds", "1", "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    [row] = json.loads((tmp_path / "restart.json").read_text())["runs"]["2"]
    assert row["same_answers"] == 2  # every stream answers as before the kill
    assert 0 < row["cold_start_s"] and 0 < row["takeover_s"] < row["first_answer_s"]
    assert (tmp_path / "restart.png").read_bytes().startswith(b"\x89PNG")
