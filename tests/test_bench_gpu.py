"""The GPU benchmark script stays working where there is no GPU: its tiny CPU mode runs end to end
(the 7B run needs a CUDA device; BENCHMARKS.md says what was run where)."""

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_the_tiny_cpu_mode_reports_every_figure(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.gpu", "--tiny", "--frames", "32", "--out", str(tmp_path)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_tiny.json").read_text())
    assert (result["device"], result["frames"], result["peak_gpu_bytes"]) == ("cpu (tiny model)", 32, None)
    assert result["encode_fps"] > 0 and result["ttft_s"] > 0 and result["retained_kv_bytes"] > 0
    assert result["realtime_streams_at_0.5fps"] == int(result["encode_fps"] / 0.5)
