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


def test_kernel_benchmark_runs_and_never_invents_a_gpu_figure(tmp_path):
    import torch

    from benchmarks import bench_kernels

    record = bench_kernels.main(["--out", str(tmp_path)])
    name = "cuda" if torch.cuda.is_available() else "cpu"
    on_disk = json.loads((tmp_path / f"bench_kernels-{name}.json").read_text())
    assert {r["op"] for r in on_disk["rows"]} == {
        "adaln_modulate",
        "gated_residual_adaln",
        "edm_l2_loss",
        "weighted_linear_cross_entropy",
    }
    if not torch.cuda.is_available():
        assert on_disk["copy_GBps"] is None
        assert all("pending" in r["status"] and not any(k.endswith("_ms") for k in r) for r in record["rows"])
        assert "GPU figures are pending" in (tmp_path / "bench_kernels-cpu.md").read_text()


def test_distributed_benchmark_runs_torchrun_and_counts_no_bytes_between_blocks(tmp_path):
    from benchmarks import bench_distributed

    bench_distributed.main(["--quick", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "bench_distributed-cpu.json").read_text())
    for key in ("device", "versions", "commit", "date", "command", "settings", "rows", "cpu_cores"):
        assert key in record, key
    assert [r["world_size"] for r in record["rows"]] == [1, 2]
    assert [len(b) for b in record["rows"][1]["blocks_per_rank"]] == [2, 2]
    for r in record["rows"]:
        assert r["steps_per_s"] > 0 and r["bytes_sent"]["between_groups"] == 0
    assert record["rows"][1]["bytes_sent"]["control"] > 0  # the checkpoint's file names did travel
    assert (tmp_path / "bench_distributed-cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
