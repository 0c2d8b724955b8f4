"""--log tensorboard: the metric lines, throughput, memory and the eval's sample grid, read back from the
event files with tensorboard's own reader."""

import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from dblocks_fast.checkpoint import RunFolder
from dblocks_fast.cli import _log_eval, main
from dblocks_fast.train import TrainConfig

FAST = ["--steps-per-block", "3", "--batch-size", "16", "--warmup", "1", "--no-progress", "--log-every", "1"]


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_holds_every_metric_line_and_the_eval(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", *FAST, "--blocks", "2", "--no-eval", "--log", "tensorboard", "--out", str(run)]
    assert main(argv) == 0
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 3  # a line per block step (--log-every 1)
    acc = _events(run / "tensorboard")
    tags = set(acc.Tags()["scalars"])
    for rec in lines:
        b = rec["block"]
        for key in ("loss", "grad_norm", "lr", "sigma_lo", "sigma_hi"):
            events = {e.step: e.value for e in acc.Scalars(f"block{b}/{key}")}
            assert events[rec["step"]] == pytest.approx(rec[key], rel=1e-6, abs=1e-12), (b, key)
    for tag in ("speed/steps_per_s", "speed/samples_per_s", "memory/peak_host_bytes"):
        assert tag in tags
        values = [e.value for e in acc.Scalars(tag)]
        assert len(values) == len(lines) and all(v > 0 for v in values), tag
    steps = [e.value for e in acc.Scalars("speed/steps_per_s")]
    samples = [e.value for e in acc.Scalars("speed/samples_per_s")]
    assert samples == pytest.approx([16 * s for s in steps], rel=1e-6)  # batch size 16

    # what an eval sends (tests/test_cli.py runs a whole eval with --log tensorboard)
    figures = {"sample_accuracy": 0.25, "frechet_distance": 7.5, "sampler": "euler"}
    grid = np.random.default_rng(0).random((40, 88, 1))
    _log_eval(RunFolder(run), figures, grid)
    acc = _events(run / "tensorboard")
    assert {"eval/sample_accuracy", "eval/frechet_distance"} <= set(acc.Tags()["scalars"])
    accuracy = acc.Scalars("eval/sample_accuracy")
    assert [e.step for e in accuracy] == [3] and accuracy[0].value == 0.25  # at the blocks' last step
    (image,) = acc.Images("eval/samples")
    assert (image.height, image.width, image.step) == (40, 88, 3)
    png = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("L"), dtype=np.float64)
    assert np.abs(png / 255 - grid[..., 0]).max() <= 1 / 255 + 1e-9  # the grid's pixels, 8-bit


def test_a_logger_needs_a_run_folder_and_no_log_writes_no_events(tmp_path):
    with pytest.raises(ValueError, match="log='tensorboard' writes into the run folder: give out_dir"):
        TrainConfig(log="tensorboard").validate()
    run = tmp_path / "run"
    assert main(["train", *FAST, "--blocks", "1", "--no-eval", "--out", str(run)]) == 0
    assert not (run / "tensorboard").exists()


def test_wandb_offline_writes_a_run_in_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # optional: --log wandb works where wandb is installed
    from dblocks_fast.loggers import open_logger

    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default: no network, no account
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = open_logger("wandb", tmp_path, {"lr": 0.1})
    logger.scalars({"block0/loss": 1.5, "block0/lr": 0.1}, 1)
    logger.image("eval/samples", np.zeros((8, 8, 1)), 1)
    logger.close()
    (run,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    for _ in range(120):  # wandb's service may still be writing the file when finish() returns
        data = run.read_bytes()
        if b"block0/loss" in data and b"eval/samples" in data:
            break
        time.sleep(0.5)
    assert b"block0/loss" in data and b"eval/samples" in data


def test_a_missing_logger_package_is_an_error_before_the_run_folder_is_written(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    run = tmp_path / "run"
    assert main(["train", *FAST, "--blocks", "1", "--no-eval", "--log", "wandb", "--out", str(run)]) == 2
    assert "needs the wandb package: pip install wandb" in capsys.readouterr().err
    assert not run.exists()
