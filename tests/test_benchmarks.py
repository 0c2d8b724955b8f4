"""The benchmark scripts run end to end (on tiny sizes) and record where and how they were measured."""

import json

from benchmarks import quality_digits


def test_quality_benchmark_quick_run_writes_its_record(tmp_path):
    quality_digits.main(["--quick", "--out", str(tmp_path), "--device", "cpu"])
    record = json.loads((tmp_path / "quality_digits-cpu.json").read_text())
    for key in ("device", "versions", "commit", "date", "command", "settings", "summary", "runs"):
        assert key in record, key
    assert record["quick"] is True
    assert [r["num_blocks"] for r in record["summary"]] == [1, 2, 3, 4, 3]
    for r in record["runs"]:
        assert 0.0 <= r["sample_accuracy"] <= 1.0 and r["frechet_distance"] > 0 and r["train_s"] > 0
    md = (tmp_path / "quality_digits-cpu.md").read_text()
    assert "| B=3, uniform partition |" in md and record["device"] in md
