"""The data-path cost benchmark (issue 19) runs end to end in its CPU-fast mode (in a process of its
own: it starts and stops its own Ray runtime) and records calls by method, payload through the
coordinator and memory against the retained KV for each answer-actor count. Structure and
sanity only: the figures themselves are BENCHMARKS.md's, and they are meant to change."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_the_fast_mode_records_calls_by_method_payload_and_memory(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.pipeline_cost", "--fast", "--out", str(tmp_path)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    for title in ("Ray calls per ingested chunk", "Payload", "growth / retained KV"):
        assert title in run.stdout
    results = json.loads((tmp_path / "pipeline_cost.json").read_text())
    runs = results["runs"]
    assert [r["answerers"] for r in runs] == [1, 2]
    for r in runs:
        assert r["frames"] == r["streams"] * results["frames_per_stream"] and r["chunks"] == r["frames"] // 8
        # Ray's records hold every chunk's ingest call (none dropped), and calls to the model actors
        assert r["records_complete"] and r["calls"]["StreamCoordinator.ingest"] == r["chunks"]
        assert any(name.startswith("PrefillWorker.") for name in r["calls"])
        assert all("." in name and count > 0 for name, count in r["calls"].items())
        assert "StreamCoordinator.memory" not in r["calls"]  # the benchmark's own calls are left out
        assert math.isclose(r["calls_per_chunk"], sum(r["calls"].values()) / r["chunks"])
        assert r["calls_per_chunk"] >= 1 and r["calls_per_question"] >= 1
        assert any(name.startswith("AnswerWorker.") for name in r["question_calls"])
        # payload through the coordinator's process: measured (finite), not negative
        assert r["coordinator_serialized_bytes"] > 0 and r["coordinator_serialized_bytes_per_frame"] >= 0
        if shutil.which("ss"):
            assert r["coordinator_socket_bytes"] > 0 and math.isfinite(r["coordinator_socket_bytes_per_frame"])
        # memory: the streams hold KV, and the runtime's processes were found and read
        assert r["retained_kv_bytes"] > 0
        assert {"ray::StreamCoordinator", "ray::PrefillWorker", "ray::AnswerWorker"} <= set(r["pss_before"])
        assert all(v > 0 for v in r["pss_before"].values())
        assert math.isclose(r["pss_growth_of_kv"], r["pss_growth_bytes"] / r["retained_kv_bytes"])
