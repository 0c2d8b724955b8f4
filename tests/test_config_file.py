"""`dblocks-fast train --config FILE`: TOML, YAML and JSON settings files, under the flags."""

import dataclasses
import json

import pytest
import yaml

from dblocks_fast.cli import main, parse_args, train_config, train_parser
from dblocks_fast.config import GROUPS, TrainConfig, read_settings
from dblocks_fast.tasks import PRESETS

FAST = ["--steps-per-block", "2", "--batch-size", "16", "--warmup", "1", "--no-progress", "--no-eval"]


def _other_value(name: str, default, meta: dict):
    """A valid value of a setting that is not its default (so a setting the file drops would show)."""
    special = {
        "num_blocks": 2,
        "layers": [4, 8],
        "only_blocks": [1],
        "grad_clip": 0.5,
        "device": "cpu",
        "out_dir": "runs/from-file",
    }
    if name in special:
        return special[name]
    if "choices" in meta:
        return next(c for c in meta["choices"] if c != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 3
    if isinstance(default, float):
        return round(default * 0.5 + 0.125, 6)
    raise AssertionError(f"no test value for {name} = {default!r}")


def _every_setting() -> dict:
    out = {}
    for _, f in TrainConfig.fields():
        out[f.name] = _other_value(f.name, f.default, f.metadata)
    return out


def _toml(values: dict) -> str:
    """TrainConfig's nested form: top-level settings, then a table a group (JSON's scalars are TOML's)."""
    groups = {g: {f.name for f in dataclasses.fields(cls)} for g, cls in GROUPS.items()}
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items() if not any(k in n for n in groups.values())]
    for g, names in groups.items():
        lines.append(f"[{g}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items() if k in names]
    return "\n".join(lines) + "\n"


def _flags(values: dict) -> list[str]:
    actions = {a.dest: a for a in train_parser_of()._actions}
    argv = []
    for k, v in values.items():
        a = actions[k]
        if a.nargs == 0:
            assert v is False, k  # the switches of TrainConfig turn a setting off
            argv.append(a.option_strings[0])
        else:
            argv += [a.option_strings[0], ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return argv


def train_parser_of():
    from dblocks_fast.cli import build_parser

    return train_parser(build_parser())


def test_toml_yaml_json_and_flags_give_the_same_config_for_every_setting(tmp_path):
    values = _every_setting()
    (tmp_path / "run.toml").write_text(_toml(values))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(values))  # the flat form
    (tmp_path / "run.json").write_text(json.dumps(values))
    preset = PRESETS["digits-dit"]
    from_flags = train_config(parse_args(["train", *_flags(values)]), preset).flat()
    assert from_flags == values  # every setting differs from its default, so none was dropped
    for name in ("run.toml", "run.yaml", "run.json"):
        args = parse_args(["train", "--config", str(tmp_path / name)])
        assert train_config(args, preset).flat() == from_flags, name


def test_flags_override_the_file_and_the_file_overrides_the_preset(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("steps-per-block: 7\nlr: 0.002\nsampler: euler\nblocks: 2\nnoise: flow\nno_eval: true\n")
    args = parse_args(["train", "--config", str(f), "--lr", "0.01", "--sampler", "heun"])
    config = train_config(args, PRESETS["digits-dit"])
    assert config.optimizer.lr == 0.01 and args.sampler == "heun"  # the flags
    assert config.steps_per_block == 7 and config.num_blocks == 2 and config.noise.process == "flow"
    assert args.no_eval is True
    assert config.batch_size == PRESETS["digits-dit"].train_defaults["batch_size"]  # neither: the preset
    bare = train_config(parse_args(["train"]), PRESETS["digits-dit"])
    assert bare.steps_per_block == PRESETS["digits-dit"].train_defaults["steps_per_block"]


@pytest.mark.parametrize(
    "text, suffix, message",
    [
        ("lrr = 0.1\n", ".toml", "unknown setting 'lrr' (did you mean lr?)"),
        ("[optimizer]\npartition = 'uniform'\n", ".toml", "[optimizer] has no setting 'partition'; partition "
         "belongs in [noise]"),
        ("steps_per_block = 'many'\n", ".toml", "steps_per_block must be a whole number, got 'many'"),
        ("steps_per_block: 2.5\n", ".yaml", "steps_per_block must be a whole number, got 2.5"),
        ("schedule: diagonal\n", ".yaml", "schedule must be one of random, sequential, chunked, got 'diag"
         "onal'"),
        ("progress = 'no'\n", ".toml", "progress must be true or false"),
        ("layers = [2, 'x']\n", ".toml", "layers must be a list of whole numbers"),
        ("lr = 1\nlr = 2\n", ".toml", "not valid TOML"),
        ("lr: [1\n", ".yaml", "not valid YAML"),
        ("- lr\n", ".yaml", "expected a table of settings"),
        ("resume = true\n", ".toml", "unknown setting 'resume'"),
        ("lr = 0.1\n", ".ini", "use .toml, .yaml, .yml or .json"),
    ],
)  # fmt: skip
def test_a_bad_file_is_an_error_that_names_the_setting(tmp_path, capsys, text, suffix, message):
    f = tmp_path / f"run{suffix}"
    f.write_text(text)
    out = tmp_path / "run"
    assert main(["train", "--config", str(f), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(f) in err, err
    assert not out.exists()  # nothing was written


def test_read_settings_reads_hyphens_and_group_tables(tmp_path):
    f = tmp_path / "a.toml"
    f.write_text("steps-per-block = 3\n[storage]\nprefetch = false\n")
    assert read_settings(f) == {"steps_per_block": 3, "prefetch": False}
    f.write_text("steps_per_block = 3\n[io]\nsteps-per-block = 4\n")
    with pytest.raises(ValueError, match=r"\[io\] has no setting 'steps-per-block'"):
        read_settings(f)
    f.write_text("lr = 0.1\n[optimizer]\nlr = 0.2\n")
    with pytest.raises(ValueError, match=r"'lr' is set twice \(in \[optimizer\]\)"):
        read_settings(f)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_settings(tmp_path / "missing.toml")


def test_the_run_folder_keeps_the_resolved_config_and_resume_refuses_a_changed_one(tmp_path, capsys):
    run = tmp_path / "run"
    f = tmp_path / "run.toml"
    f.write_text(f'out = "{run}"\n[optimizer]\nlr = 0.002\n')
    assert main(["train", "--config", str(f), *FAST, "--blocks", "2"]) == 0
    saved = json.loads((run / "config.json").read_text())["train"]
    assert saved["optimizer"]["lr"] == 0.002 and saved["num_blocks"] == 2 and saved["steps_per_block"] == 2
    cli = json.loads((run / "cli.json").read_text())
    assert cli["preset"] == "digits-dit" and cli["data"] is None
    capsys.readouterr()

    f.write_text(f'out = "{run}"\n[optimizer]\nlr = 0.003\nweight_decay = 0.1\n')
    before = (run / "manifest.json").read_bytes()
    assert main(["train", "--config", str(f), *FAST, "--blocks", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "lr: saved 0.002, now 0.003" in err and "weight_decay: saved 0.0" in err
    assert main(["train", "--config", str(f), *FAST, "--blocks", "2", "--resume", "--lr", "0.002",
                 "--weight-decay", "0"]) == 0  # fmt: skip
    assert (run / "manifest.json").read_bytes() == before  # finished: nothing to do, nothing changed

    npz = tmp_path / "d.npz"
    from dblocks_fast.data import load_digits

    d = load_digits("all")
    import numpy as np

    np.savez(npz, images=d.images.numpy(), labels=d.labels.numpy())
    assert main(["train", "--out", str(run), *FAST, "--blocks", "2", "--lr", "0.002", "--data", str(npz),
                 "--resume"]) == 2  # fmt: skip
    assert f"data: saved None, now '{npz}'" in capsys.readouterr().err


def test_the_readme_example_is_a_valid_settings_file(tmp_path):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    f = tmp_path / "run.toml"
    f.write_text("\n".join(line.strip() for line in block.splitlines()))
    args = parse_args(["train", "--config", str(f)])
    config = train_config(args, PRESETS["digits-dit"])
    assert args.data == "digits_png" and config.io.log == "tensorboard" and config.optimizer.warmup == 100
