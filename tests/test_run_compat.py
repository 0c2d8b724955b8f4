"""Run folders written before the renovation (format 1: flat settings) still load, resume and merge.

tests/fixtures/run_v1/ was written by tests/fixtures/make_run_v1.py at commit b262692: `partial`, a run
interrupted after 6 of its 10 steps, `only0`, `only1`, each training one of the two blocks, and `mdm`, a
masked-diffusion LM.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dblocks_fast as dbf
from dblocks_fast import checkpoint
from dblocks_fast.checkpoint import RunFolder, merge_runs
from dblocks_fast.data import load_digits

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "run_v1"
_spec = importlib.util.spec_from_file_location("make_run_v1", FIXTURES.parent / "make_run_v1.py")
_make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_make)


@pytest.fixture
def v1(tmp_path):
    """A writable copy of the old run folders (resume and merge write into them)."""
    shutil.copytree(FIXTURES, tmp_path / "v1")
    return tmp_path / "v1"


@pytest.fixture(scope="module")
def setup():
    data = load_digits("train")
    return dbf.tasks.ImageGeneration.for_data(data, **_make.TASK), data


def _old_final():
    """The finished model as the old code trained it: block b is the only{b} run's file."""
    return {
        f"{b}/{k}": v
        for b in (0, 1)
        for k, v in load_file(next((FIXTURES / f"only{b}" / "blocks").iterdir())).items()
    }


def _tensors(trainer):
    return {f"{b}/{k}": v for b in range(2) for k, v in trainer.block_tensors(b).items()}


def test_the_fixtures_are_format_1_with_flat_settings():
    manifest = json.loads((FIXTURES / "partial" / "manifest.json").read_text())
    assert manifest["format"] == "dblocks_fast.run/1" and manifest["train"]["lr"] == 0.001
    assert [e["steps"] for e in manifest["blocks"]] == [3, 3] and not manifest["complete"]


def test_an_old_run_folder_loads():
    with pytest.warns(UserWarning, match="is not finished"):
        model = dbf.load(FIXTURES / "partial", device="cpu")
    assert model.num_blocks == 2 and model.layers == [1, 1]
    got = dict(model.blocks[1].named_parameters())
    want = load_file(FIXTURES / "partial" / "blocks" / "block001-step000000003.safetensors")
    assert all(torch.equal(p.detach(), want[f"param/{n}"]) for n, p in got.items())
    dbf.sample(model, [1, 2], num_steps=2, device="cpu")
    # its settings read back as the grouped config
    config = dbf.TrainConfig.from_dict(checkpoint.read_manifest(FIXTURES / "partial")["train"])
    assert config.optimizer.warmup == 2 and config.seed == 3 and config.storage.offload == "none"


@pytest.mark.parametrize("offload", ["none", "disk"])
def test_an_old_interrupted_run_resumes_to_the_same_model(setup, v1, offload):
    task, data = setup
    run = v1 / "partial"
    config = dbf.TrainConfig(**_make.CONFIG, out_dir=str(run), offload=offload)
    resumed = dbf.Trainer(task, data, config, resume=True)
    assert resumed.steps_done == [3, 3]
    resumed.fit()
    manifest = checkpoint.read_manifest(run)
    assert manifest["complete"] and manifest["format"] == checkpoint.FORMAT
    assert manifest["train"]["optimizer"]["lr"] == 0.001  # rewritten in the grouped form
    # the same bits as a run of the new code from scratch, on this machine
    fresh = dbf.Trainer(task, data, dbf.TrainConfig(**_make.CONFIG))
    fresh.fit()
    got, want = _tensors(resumed), _tensors(fresh)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # and the old code's own finished model (written on another machine: CPU matmuls may round otherwise)
    old = _old_final()
    assert old.keys() == got.keys()
    for k in old:
        torch.testing.assert_close(got[k], old[k], rtol=1e-5, atol=1e-7, msg=k)
    # metric lines after the checkpoint were trimmed and written again: one line per logged step
    lines = [json.loads(ln) for ln in (run / RunFolder.METRICS).read_text().splitlines()]
    assert sorted((r["block"], r["step"]) for r in lines) == [(0, 2), (0, 4), (0, 5), (1, 2), (1, 4), (1, 5)]


def test_an_old_run_refuses_to_resume_with_other_settings(setup, v1):
    task, data = setup
    config = dbf.TrainConfig(**{**_make.CONFIG, "lr": 0.002}, out_dir=str(v1 / "partial"))
    with pytest.raises(ValueError, match="lr: saved 0.001, now 0.002"):
        dbf.Trainer(task, data, config, resume=True)


def test_old_runs_merge_bit_for_bit(setup, v1, tmp_path):
    manifest = merge_runs([v1 / "only0", v1 / "only1"], tmp_path / "merged")
    assert manifest["complete"] and manifest["format"] == checkpoint.FORMAT
    assert manifest["train"]["only_blocks"] is None and manifest["train"]["optimizer"]["lr"] == 0.001
    model = dbf.load(tmp_path / "merged", device="cpu")
    old = _old_final()
    for b in (0, 1):
        for n, p in model.blocks[b].named_parameters():
            assert torch.equal(p.detach(), old[f"{b}/param/{n}"]), (b, n)
    config = RunFolder(tmp_path / "merged").read_json(RunFolder.CONFIG)
    assert config["train"]["optimizer"]["warmup"] == 2  # config.json in the grouped form too
    # an old run and a new one of the same settings merge: the format is not a setting
    task, data = setup
    new = tmp_path / "new1"
    dbf.train(task, data, dbf.TrainConfig(**_make.CONFIG, only_blocks=[1], out_dir=str(new)))
    mixed = merge_runs([v1 / "only0", new], tmp_path / "mixed")
    assert mixed["complete"]


def test_a_run_of_a_newer_format_is_refused_with_a_message(v1):
    path = v1 / "partial" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "format": "dblocks_fast.run/99"}))
    with pytest.raises(checkpoint.CheckpointError, match="format 'dblocks_fast.run/99'; this version reads"):
        checkpoint.read_manifest(v1 / "partial")


def test_an_old_masked_diffusion_run_loads_with_its_masking_process():
    """Its manifest recorded an EDM schedule (the masking levels came from the task's hooks then)."""
    from dblocks_fast.tasks.masked_diffusion import elbo_bits_per_byte, generate

    manifest = checkpoint.read_manifest(FIXTURES / "mdm")
    assert manifest["format"] == "dblocks_fast.run/1" and "kind" not in manifest["schedule"]
    model = dbf.load(FIXTURES / "mdm", device="cpu")
    assert model.task.config.rope is False  # it was trained before rotary positions: it runs without them
    assert model.schedule.kind == "masking" and model.schedule.num_blocks == 2
    assert model.schedule.to_dict() == dbf.Masking(2, 0.05, model.task.config.t_min).to_dict()
    data = _make.text_data()
    bpb = elbo_bits_per_byte(model, data, num_levels=4, max_windows=8)
    assert 0 < bpb < 8.5  # an ELBO in bits per byte of a briefly trained model (uniform logits give 8)
    assert generate(model, 2, num_steps=4, prompt=b"the").shape == (2, 8)


@pytest.mark.parametrize(
    "task,added",
    [
        (
            dbf.tasks.AutoregressiveLM(dbf.tasks.ARConfig()),
            {"cond_sigma_max": None, "prev_byte": False, "z_in_std": 0.02},
        ),
        (dbf.tasks.MaskedDiffusionLM(dbf.tasks.MDMConfig()), {"rope": False}),
    ],
)
def test_a_setting_added_since_a_run_was_saved_keeps_what_the_run_computed(task, added):
    """Settings whose new default changes what a block computes: a manifest without them is a run trained
    before them, so it loads with their old value; a manifest with them keeps its own."""
    from dblocks_fast.tasks import task_from_dict

    saved = task.to_dict()
    assert all(saved["config"][k] != v for k, v in added.items())  # today's defaults differ
    old = {**saved, "config": {k: v for k, v in saved["config"].items() if k not in added}}
    assert {k: getattr(task_from_dict(old).config, k) for k in added} == added
    assert task_from_dict(saved).config == task.config
