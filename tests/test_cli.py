import json
import shutil
import subprocess

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from dblocks_fast.checkpoint import FORMAT
from dblocks_fast.cli import build_parser, main
from dblocks_fast.tasks import PRESETS
from dblocks_fast.train import TrainConfig

FAST = ["--steps-per-block", "3", "--batch-size", "16", "--warmup", "1", "--no-progress"]
FAST_EVAL = ["--per-class", "2", "--num-steps", "3", "--sampler", "euler"]


def test_every_train_config_field_has_a_flag():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train._actions}
    assert set(TrainConfig.flat_names()) <= dests  # every setting, whatever group it is in
    args = train.parse_args(["--grad-clip", "none", "--layers", "2,2,2", "--blocks", "3", "--lr", "0.01"])
    assert args.grad_clip is None and args.layers == [2, 2, 2] and args.num_blocks == 3 and args.lr == 0.01
    assert not hasattr(train.parse_args([]), "lr")  # not given: the preset's value applies


def test_the_sample_seed_is_not_the_training_seed():
    from dblocks_fast.cli import parse_args, train_config

    args = parse_args(["train", "--sample-seed", "5"])  # they once shared args.seed
    assert args.sample_seed == 5 and train_config(args, PRESETS["digits-dit"]).seed == 0
    args = parse_args(["train", "--seed", "3"])
    assert args.sample_seed == 0 and train_config(args, PRESETS["digits-dit"]).seed == 3


def test_every_train_flag_has_help_from_the_config_field():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    helps = {a.dest: a.help for a in train._actions}
    for _, f in TrainConfig.fields():
        assert f.metadata.get("help"), f"TrainConfig field {f.name} has no help"
        assert helps[f.name] and len(helps[f.name]) > 10, f"the flag of {f.name} has no help"
    assert "independently trained blocks" in helps["num_blocks"]  # --blocks: the one that lost its help once


def test_every_flag_of_every_command_says_what_it_does():
    import argparse

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"train", "sample", "eval", "bench", "merge"} <= set(commands)
    for name, sub in commands.items():
        for action in sub._actions:
            what = f"dblocks-fast {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help != argparse.SUPPRESS, f"{what} has no help"
            assert len(action.help) >= 15, f"{what}: help {action.help!r} does not say what it does"
        text = sub.format_help()  # --help renders (a stray % in a help string would raise here)
        assert "--help" in text


def test_train_sample_eval_and_the_baseline_table(tmp_path, capsys):
    b3, b1 = tmp_path / "digits-dit-b3", tmp_path / "digits-dit-b1"
    assert main(["train", *FAST, *FAST_EVAL, "--log", "tensorboard", "--out", str(b3)]) == 0
    out = capsys.readouterr().out
    assert "no B=1 baseline found" in out and "--blocks 1" in out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(b3 / "tensorboard"))
    events.Reload()  # the eval's sample grid and scores went to TensorBoard (tests/test_logging.py: the rest)
    assert events.Tags()["images"] == ["eval/samples"] and "eval/sample_accuracy" in events.Tags()["scalars"]
    for name in ("manifest.json", "config.json", "cli.json", "metrics.jsonl", "eval.json", "samples.png"):
        assert (b3 / name).is_file(), name
    assert json.loads((b3 / "config.json").read_text())["train"]["num_blocks"] == 3
    assert plt.imread(b3 / "samples.png").shape[:2] == (
        10 * 10 * 4,
        2 * 10 * 4,
    )  # 10 classes x 2, 4x upscaled

    assert main(["train", *FAST, *FAST_EVAL, "--blocks", "1", "--out", str(b1)]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(b3), *FAST_EVAL]) == 0
    out = capsys.readouterr().out
    assert "B=3 (this run)" in out and "B=1 baseline" in out and "sample accuracy" in out
    assert "note: the baseline was scored" not in out
    assert main(["eval", "--run", str(b3), *FAST_EVAL[:2], "--num-steps", "6"]) == 0
    assert "note: the baseline was scored with other sampler, num_steps" in capsys.readouterr().out

    grid = tmp_path / "grid.png"
    assert main(["sample", "--run", str(b3), "--out", str(grid), "--per-class", "3", "--num-steps", "3"]) == 0
    assert plt.imread(grid).shape[:2] == (10 * 10 * 4, 3 * 10 * 4)


def test_user_data_from_npz(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 3, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", images=images, labels=np.arange(60) % 3)
    run = tmp_path / "mine-b2"
    argv = [
        "train",
        *FAST,
        *FAST_EVAL,
        "--data",
        str(tmp_path / "mine.npz"),
        "--blocks",
        "2",
        "--out",
        str(run),
    ]
    assert main(argv) == 0
    cfg = json.loads((run / "config.json").read_text())["task"]["config"]
    assert (cfg["channels"], cfg["image_size"], cfg["num_classes"]) == (3, 4, 3)
    assert plt.imread(run / "samples.png").shape[:2] == (3 * 6 * 4, 2 * 6 * 4)
    assert (
        main(["eval", "--run", str(run), "--per-class", "2", "--num-steps", "2"]) == 0
    )  # finds its data again


@pytest.mark.parametrize("preset,figure", [("pystdlib-ar", "bits_per_byte_first_block"),
                                           ("pystdlib-mdm", "elbo_bits_per_byte"),
                                           ("pystdlib-recurrent", "bits_per_byte_first_block")])  # fmt: skip
def test_language_model_presets_on_user_text(tmp_path, capsys, preset, figure):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):  # a folder of text files: split by file
        (src / f"m{i}.py").write_text("".join(f"def f{j}(x):\n    return x + {j}\n" for j in range(30)))
    run = tmp_path / "run"
    argv = ["train", "--preset", preset, *FAST, "--data", str(src), "--out", str(run), "--per-class", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads((run / "eval.json").read_text())
    assert 0 < result[figure] < 9 and f"{figure}: " in out and "--- sample 1 ---" in out
    assert json.loads((run / "cli.json").read_text())["data"] == str(src)
    assert main(["sample", "--run", str(run), "--per-class", "3", "--out", str(tmp_path / "s.txt")]) == 0
    assert (tmp_path / "s.txt").read_text(errors="replace").count("\n\n") >= 2
    assert main(["eval", "--run", str(run)]) == 0  # finds its data again
    assert json.loads((run / "eval.json").read_text())[figure] == result[figure]  # seeded: the same figure


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--layers", "1,2,2"], "sums to 5, but the model has 12 layers"),
        (["train", "--blocks", "13"], "larger than the number of layers"),
        (["train", "--blocks", "5"], "do not split evenly into 5 blocks; pass an explicit list"),
        (["train", "--data", "missing.npz"], "no such file"),
        (["train", "--resume"], "has no manifest.json"),
        (["eval", "--run", "nowhere"], "does not exist"),
        (["train", "--device", "tpu"], "device 'tpu' is not a device; use auto, cpu, cuda or cuda:N"),
        (["train", "--device", "cuda:99"], "'cuda:99' was requested but"),
        (["train", "--data", "empty.npz"], "empty.npz holds no images"),
        (
            ["train", "--data", "huge.npz"],
            "label 10000000 (of image 2) asks for 10000001 classes; this file may have at most 1000",
        ),
    ],
)
def test_errors_are_clear_and_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    np.savez("empty.npz", images=np.zeros((0, 8, 8), np.uint8), labels=np.zeros(0, np.int64))
    np.savez("huge.npz", images=np.zeros((5, 8, 8), np.uint8), labels=np.array([0, 1, 10**7, 0, 1]))
    if "--out" not in argv and argv[0] == "train":
        argv = [*argv, "--out", str(tmp_path / "run")]
        (tmp_path / "run").mkdir()
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.json").exists()  # refused before anything was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="the kernels may run here")
@pytest.mark.parametrize("kernels", ["triton", "cuda"])
def test_kernels_that_cannot_run_are_refused_before_the_run_folder_is_written(
    tmp_path, capsys, monkeypatch, kernels
):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the tests' interpreter would run Triton on the CPU
    run = tmp_path / "run"
    assert main(["train", *FAST, "--kernels", kernels, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"kernels='{kernels}' (--kernels {kernels}) cannot run on device cpu: it needs CUDA" in err
    assert "Use kernels='auto'" in err and not run.exists()


@pytest.mark.parametrize("command", ["train", "sample", "eval"])
@pytest.mark.parametrize("flag,value", [("--per-class", "-2"), ("--per-class", "0"), ("--num-steps", "0"),
                                        ("--num-steps", "-3"), ("--steps", "x")])  # fmt: skip
def test_sample_counts_below_one_are_refused(tmp_path, capsys, command, flag, value):
    run = tmp_path / "run"
    argv = [command, flag, value, *(["--out", str(run)] if command == "train" else ["--run", str(run)])]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and not run.exists()
    err = capsys.readouterr().err
    assert "error: argument --" in err and flag in err and "1 or more, got" in err


def test_flags_of_settings_with_fixed_values_offer_exactly_those():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    actions = {a.dest: a for a in train._actions}
    fixed = {f.name: f.metadata["choices"] for _, f in TrainConfig.fields() if "choices" in f.metadata}
    assert {"schedule", "partition", "precision", "kernels", "offload", "process"} <= set(fixed)
    for name, choices in fixed.items():
        assert tuple(actions[name].choices) == choices, name
    usage = train.format_help()
    for listed in ("{auto,cuda,triton,torch}", "{none,host,disk}", "{random,sequential,chunked}",
                   "{equiprob,uniform}", "{fp32,bf16}", "{auto,edm,flow,masking}", "'cuda:N'"):  # fmt: skip
        assert listed in usage, listed
    with pytest.raises(SystemExit):
        train.parse_args(["--offload", "tape"])
    with pytest.raises(ValueError, match="offload must be one of \\('none', 'host', 'disk'\\), got 'tape'"):
        TrainConfig(offload="tape").validate()


def test_unknown_preset_existing_run_and_a_preset_for_another_model(tmp_path, capsys):
    with pytest.raises(SystemExit, match="unknown preset 'cifar'; choose one of: digits-dit"):
        main(["train", "--preset", "cifar"])
    run = tmp_path / "r"
    assert main(["train", *FAST, "--no-eval", "--out", str(run)]) == 0
    assert main(["sample", "--run", str(run), "--device", "tpu"]) == 2
    assert "device 'tpu' is not a device; use auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    for command in ("sample", "eval"):  # a DiT run read as a ViT classifier: was KeyError: 'num_steps'
        assert main([command, "--run", str(run), "--preset", "digits-vit"]) == 2
        assert (
            f"{run} holds a model of kind 'image-generation' (trained with --preset digits-dit), but "
            f"--preset digits-vit is for models of kind 'image-classification': leave --preset out (the run "
            f"folder records digits-dit), or pass --preset digits-dit"
        ) in capsys.readouterr().err
    before = (run / "manifest.json").read_bytes()
    assert main(["train", *FAST, "--no-eval", "--out", str(run)]) == 2
    assert "already holds a run; pass resume=True (--resume)" in capsys.readouterr().err
    assert (run / "manifest.json").read_bytes() == before
    assert main(["train", *FAST, "--no-eval", "--out", str(run), "--resume"]) == 0  # finished: nothing to do


def test_console_script_is_installed():
    exe = shutil.which("dblocks-fast")
    assert exe, "the dblocks-fast console script is not on PATH: install the package (pip install -e .)"
    out = subprocess.run([exe, "train", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--steps-per-block" in out and "--resume" in out


def test_a_model_of_the_users_fits_the_presets_of_the_kind_it_was_trained_with(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": FORMAT, "task": {"kind": "custom"}}))
    (tmp_path / "cli.json").write_text(json.dumps({"preset": "pystdlib-ar", "data": None}))
    assert main(["sample", "--run", str(tmp_path), "--preset", "digits-dit"]) == 2
    assert "--preset pystdlib-ar or pystdlib-recurrent" in capsys.readouterr().err


def test_each_preset_says_the_kind_of_task_it_builds(digits):
    from dblocks_fast.data import TextData

    text = TextData(torch.arange(64 * 40, dtype=torch.int64).remainder(256).to(torch.uint8), 64)
    for name, preset in PRESETS.items():
        data = digits if name.startswith("digits") else text
        assert preset.make_task(data).kind == preset.task_kind, name
