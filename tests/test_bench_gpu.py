"""The GPU benchmark script stays working where there is no GPU: its tiny CPU mode runs end to end
(the 7B run needs a CUDA device; BENCHMARKS.md says what was run where)."""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_the_tiny_cpu_mode_reports_every_figure(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.gpu", "--tiny", "--frames", "32", "--methods", "rekv",
                          "livevlm", "--out", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_tiny.json").read_text())
    assert (tmp_path / "gpu_tiny.png").stat().st_size > 0
    assert report["device"] == "cpu (tiny model)"
    assert [run["method"] for run in report["runs"]] == ["rekv", "livevlm"]
    for result in report["runs"]:
        assert (result["frames"], result["peak_gpu_bytes"], result["streams_by_memory"]) == (32, None, None)
        assert result["encode_fps"] > 0 and result["ttft_s"] > 0 and result["retained_kv_bytes"] > 0
        assert result["decode_tokens_per_s"] > 0  # the tiny random model does not stop at its first token
        assert result["realtime_streams_at_0.5fps"] == result["streams_by_compute"] == int(result["encode_fps"] / 0.5)
