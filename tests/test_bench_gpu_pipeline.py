"""The GPU pipeline benchmark's CPU mode runs end to end (real Ray, the coordinator and its model
actors with the tiny random-weight model built inside them by the setup hook), and its JSON holds
every figure the device run will report. Numbers are checked for sanity, never for speed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_pipeline")
    # a budget far above what this takes, so that a slow machine cuts nothing short: the ramp ends
    # by its range (at most 2 streams), not by the clock
    run = subprocess.run(
        [sys.executable, "-m", "bench.gpu_pipeline", "--device", "cpu", "--methods", "livevlm", "rekv",
         "--budget-s", "400", "--window-s", "3", "--burst-s", "1", "--max-streams", "2", "--question-rate", "1",
         "--context-frames", "8", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "real-time 0.5 fps streams sustained" in run.stdout  # the goals table
    return json.loads((out / "gpu_pipeline_cpu.json").read_text()), out, run.stdout


def test_every_method_ran_a_burst_and_ramp_steps(report):
    result, out, _ = report
    assert (out / "gpu_pipeline_cpu.png").read_bytes().startswith(b"\x89PNG")
    assert result["device"].startswith("cpu") and result["model"] == "tiny-random" and "error" not in result
    assert list(result["methods"]) == ["livevlm", "rekv"]
    for method, run in result["methods"].items():
        assert run["burst"]["frames"] > 0 and run["burst"]["fps"] > 0
        assert run["context"]["frames"] == 8  # one question stream, fed 8 frames before the ramp
        assert run["steps"] and run["stopped"] == "bracket narrow enough or range used up"
        for step in run["steps"]:
            assert 1 <= step["streams"] <= 2 and step["offered_fps"] == step["streams"] * 0.5
            assert 0 < step["frames_pushed"] and 0 <= step["frames_ingested"] <= step["frames_pushed"]
            if step["sustained"]:
                assert step["frames_ingested"] == step["frames_pushed"] and not step["errors"]
                assert step["lag_p95_s"] <= result["config"]["max_lag_s"]
            assert step["questions"] >= 1 and step["host"]["pss_bytes"] > 0
        sustained = [s["streams"] for s in run["steps"] if s["sustained"]]
        assert run["max_sustained_streams"] == max(sustained, default=0)


def test_answers_report_time_to_first_token_and_decode_rate(report):
    result, _, _ = report
    for run in result["methods"].values():
        answered = [s for s in run["steps"] if s["ttft_p50_s"] is not None]
        assert answered, "no question produced text"
        for step in answered:
            assert 0 < step["ttft_p50_s"] <= step["ttft_p99_s"]
            # the tiny random model does not stop at its first token: a decode rate exists
            assert step["decode_tokens_per_s_p50"] is None or step["decode_tokens_per_s_p50"] > 0


def test_model_copies_and_memory_are_read_inside_the_actors(report):
    result, _, stdout = report
    kinds = [a["kind"] for a in result["actors"]]
    assert kinds[:2] == ["prefill", "compressor"] and kinds[2:] == ["answerer0"]
    # one per model-holding role: the prefill and the answer actor (the compressor loads none)
    assert result["model_copies"] == sum(1 for a in result["actors"] if a["model_bytes"] > 0) == 2
    assert [a["model_bytes"] for a in result["actors"] if a["kind"] == "compressor"] == [0]
    assert len({a["model_bytes"] for a in result["actors"] if a["model_bytes"]}) == 1  # the same model in each
    assert all(a["gpu_max_allocated_bytes"] is None for a in result["actors"])  # CPU: no CUDA figures
    assert result["host_idle"]["pss_bytes"] > 0 and "ray::PrefillWorker" in result["host_idle"]["pss_by_title"]
    assert result["host_idle"]["pss_exact"]  # (Linux here: smaps_rollup)
    summary = result["summary"]
    assert set(summary) == {"livevlm", "rekv"}
    assert summary["livevlm"]["goals"]["streams"] == 100 and summary["rekv"]["goals"]["streams"] == 60
    for method in summary.values():
        assert method["figures"]["encode_fps"] > 0 and method["met"]["streams"] is False  # 2 streams at most
    assert "model copies" in stdout


def test_the_ramp_doubles_then_bisects_to_the_resolution():
    """The stream counts tried against a pipeline that sustains up to `capacity` streams."""
    from types import SimpleNamespace

    from bench.gpu_pipeline import next_count

    args = SimpleNamespace(max_streams=512, resolution=0.1, question_streams=2)

    def tried(capacity: int, start: int = 84) -> tuple[list[int], int, int | None]:
        n, lo, hi, counts = start, 0, None, []
        while n is not None:
            counts.append(n)
            n, lo, hi = next_count(n, n <= capacity, lo, hi, args)
        return counts, lo, hi

    assert tried(100) == ([84, 168, 126, 105, 94, 99], 99, 105)  # within 10% of the capacity
    assert tried(37) == ([84, 42, 21, 31, 36, 39], 36, 39)
    assert tried(1) == ([84, 42, 21, 10, 5, 2], 0, 2)  # fewer than the question streams: none sustained
    assert tried(10_000) == ([84, 168, 336, 512], 512, None)  # the range ends at --max-streams
