"""The long-stream QA benchmark runs end to end at a small size, and its intervals mean what they say."""

import json

from bench.qa import main, stream_bootstrap


def test_the_interval_resamples_whole_streams():
    assert stream_bootstrap([[1, 0, 1, 0]] * 5) == (0.5, 0.5)  # every resample has the same mean
    # two streams, all right and all wrong: a quarter of the resamples draw only one of them
    assert stream_bootstrap([[1] * 10, [0] * 10]) == (0.0, 1.0)


def test_a_small_run_reports_intervals_and_paired_differences(tmp_path):
    methods = ["uniform-32", "rekv", "streamkv keep=1.0", "streamkv keep=0.4"]  # in bench.qa.METHODS order
    results = main(["--frames", "80", "--streams", "2", "--questions", "3", "--methods", *methods,
                    "--readers", "0", "--out", str(tmp_path)])
    assert list(results["methods"]) == methods and results["questions"] == 6
    for r in results["methods"].values():
        low, high = r["accuracy_ci95"]
        assert low <= r["accuracy"] <= high and len(r["correct"]) == 6
    paired = {(p["method"], p["reference"]): p for p in results["paired"]}
    assert set(paired) == {("streamkv keep=0.4", "streamkv keep=1.0"), ("rekv", "uniform-32")}
    for p in paired.values():
        assert p["ci95"][0] <= p["difference"] <= p["ci95"][1]
    assert json.loads((tmp_path / "qa.json").read_text())["paired"] == json.loads(json.dumps(results["paired"]))
    assert "Paired differences" in (tmp_path / "qa.md").read_text()
    assert (tmp_path / "qa_accuracy_vs_memory.png").stat().st_size > 0
