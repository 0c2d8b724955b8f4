"""A network written outside the package (tests/own_models.py), trained block-wise with the package's
guarantees: any order, one block alone, resume, paging tiers, the same bits; its run folder reloads; bad
models are refused with a message before any training."""

import json

import pytest
import torch

import dblocks_fast as dbf
from dblocks_fast import checkpoint
from dblocks_fast.cli import main as cli
from dblocks_fast.model import build_block, layer_ranges
from dblocks_fast.testing import check_task
from tests.invariants import assert_a_step_touches_only_its_block, block_states


def _task(digits, mode="independent", factory="tests.own_models:residual", **settings):
    return dbf.CustomTask.for_data(digits, factory, settings, mode=mode)


def _config(**kw):
    base = dict(
        num_blocks=2, steps_per_block=6, batch_size=8, warmup=2, log_every=2, ckpt_every=0, progress=False,
        device="cpu", process="flow", out_dir=None,
    )  # fmt: skip
    return dbf.TrainConfig(**{**base, **kw})


def _fit(task, data, cfg, **kw):
    t = dbf.Trainer(task, data, cfg, **kw)
    t.fit()
    return t


def _tensors(trainer):
    return {f"{b}/{k}": v.clone() for b in trainer.owned for k, v in trainer.block_tensors(b).items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.mark.parametrize("mode", ["independent", "shared"])
def test_any_order_one_block_alone_and_a_step_of_b_only_touch_b(digits, mode):
    task = _task(digits, mode)
    seq = _fit(task, digits, _config(schedule="sequential"))
    rnd = _fit(task, digits, _config(schedule="random"))
    _assert_same(_tensors(seq), _tensors(rnd))
    alone = _fit(task, digits, _config(only_blocks=[1]))
    want = {k: v for k, v in _tensors(seq).items() if k.startswith("1/")}
    _assert_same(_tensors(alone), want)
    assert_a_step_touches_only_its_block(dbf.Trainer(task, digits, _config()), 2)
    if mode == "shared":  # the blocks own their layers only; the stem and head are the task's, frozen
        names = {n.split(".")[0] for n in dict(seq.model.blocks[0].named_parameters())}
        assert names == {"layers"}
        stem, head = task._shared_parts(torch.device("cpu"))
        assert not any(p.requires_grad for p in [*stem.parameters(), *head.parameters()])


@pytest.mark.parametrize("mode, tier", [("independent", "host"), ("independent", "disk"), ("shared", "disk")])
def test_paged_tiers_and_resume_mid_block_give_the_same_bits(digits, tmp_path, mode, tier):
    task = _task(digits, mode)
    ref = _fit(task, digits, _config(schedule="sequential"))

    class Stop(Exception):
        pass

    def stop(trainer, b):
        if sum(trainer.steps_done) == 9:  # saved at 8: block 1 at its step 2
            raise Stop

    run = tmp_path / "run"
    cfg = _config(schedule="sequential", offload=tier, out_dir=str(run), ckpt_every=2)
    with pytest.raises(Stop):
        _fit(task, digits, cfg, callback=stop)
    resumed = dbf.Trainer(task, digits, cfg, resume=True)
    assert resumed.steps_done == [6, 2]
    resumed.fit()
    _assert_same(_tensors(resumed), _tensors(ref))


def test_a_block_factory_trains_too_and_a_dit_trains_flow_in_any_order(digits, tiny_task, tiny_config):
    task = _task(digits, factory="tests.own_models:blocks")
    assert task.num_layers == 4 and not task.split
    seq = _fit(task, digits, _config(schedule="sequential"))
    rnd = _fit(task, digits, _config(schedule="random"))
    _assert_same(_tensors(seq), _tensors(rnd))
    seq = _fit(tiny_task, digits, tiny_config(schedule="sequential", process="flow"))
    rnd = _fit(tiny_task, digits, tiny_config(schedule="random", process="flow"))
    _assert_same(block_states(seq), block_states(rnd))
    assert seq.model.schedule.kind == "flow"


def test_uneven_splits_hand_each_block_exactly_its_own_layers(digits):
    task = _task(digits, num_layers=12)
    ranges = layer_ranges([2, 8, 2])
    assert ranges == [range(0, 2), range(2, 10), range(10, 12)]
    for b, r in enumerate(ranges):
        block = build_block(task, b, r, seed=0)
        assert [layer.index for layer in block.layers] == list(r)
    t = dbf.Trainer(task, digits, _config(num_blocks=3, layers=[2, 8, 2]))
    assert [[layer.index for layer in blk.layers] for blk in t.model.blocks] == [
        [0, 1],
        list(range(2, 10)),
        [10, 11],
    ]


def test_the_run_folder_reloads_and_samples_and_a_missing_module_is_a_clear_error(digits, tmp_path):
    task = _task(digits, mode="shared")
    run = tmp_path / "run"
    model = dbf.train(task, digits, _config(out_dir=str(run)))
    labels = torch.arange(10)
    a = dbf.sample(model, labels, num_steps=4, cfg_scale=1.5, seed=3)
    again = dbf.load(run, device="cpu")
    assert again.task.to_dict() == task.to_dict() and again.schedule.kind == "flow"
    b = dbf.sample(again, labels, num_steps=4, cfg_scale=1.5, seed=3)
    assert torch.equal(a, b)  # the shared stem and head were rebuilt by the factory, the same weights
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["task"]["config"]["factory"] == "tests.own_models:residual"
    manifest["task"]["config"]["factory"] = "no_such_package.models:residual"
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ImportError, match="install the package that provides 'no_such_package.models'"):
        dbf.load(run, device="cpu")


def test_bad_models_are_refused_before_any_training(digits, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"output has shape \(2, 2, 8, 8\), its input \(2, 1, 8, 8\)"):
        dbf.Trainer(_task(digits, factory="tests.own_models:wrong_shape"), digits, _config(out_dir=str(run)))
    with pytest.raises(
        ValueError, match="raised RuntimeError when called with {}: the weights file is missing"
    ):
        _task(digits, factory="tests.own_models:raises")
    with pytest.raises(ValueError, match="layers=\\[2, 8, 2\\] sums to 12, but the model has 4 layers"):
        dbf.Trainer(_task(digits), digits, _config(num_blocks=3, layers=[2, 8, 2]))
    with pytest.raises(ImportError, match="has no 'nothing'"):
        _task(digits, factory="tests.own_models:nothing")
    with pytest.raises(ValueError, match="cannot be imported again from a run folder"):
        dbf.CustomTask.for_data(digits, lambda: None)
    with pytest.raises(ValueError, match="flow matching|edm or flow|'edm' or 'flow'"):
        dbf.Trainer(_task(digits), digits, _config(process="masking"))
    assert not run.exists()

    class NotATask:
        kind = "mine"

        def loss(self):
            pass

    with pytest.raises(TypeError, match="lacks num_layers, to_dict, build_block, check_data, noise_process"):
        dbf.Trainer(NotATask(), digits, _config())


def test_check_task_catches_a_loss_that_ignores_its_rows(digits):
    task = _task(digits)
    check_task(task, digits)  # the package's own wrapper keeps every promise

    class Sloppy(dbf.CustomTask):
        def loss(self, block, batch, level, generator, rows=None, *, process):
            return super().loss(block, batch, level, generator, None, process=process)  # ignores rows

    sloppy = Sloppy.for_data(digits, "tests.own_models:residual", {"guidance": False})
    with pytest.raises(AssertionError, match="draw every random number for all `total` rows"):
        check_task(sloppy, digits)
    check_task(dbf.tasks.ImageGeneration.for_data(digits, hidden=16, heads=2, num_layers=2), digits)


def test_the_cli_trains_a_users_model_with_flow_and_samples_it(tmp_path, capsys):
    run = tmp_path / "mine"
    args = ["--model", "tests.own_models:residual", "--model-config", '{"hidden": 16, "num_layers": 2}']
    fast = ["--blocks", "2", "--steps-per-block", "3", "--batch-size", "16", "--warmup", "1", "--no-progress"]
    assert cli(["train", *args, *fast, "--noise", "flow", "--no-eval", "--out", str(run)]) == 0
    manifest = checkpoint.read_manifest(run)
    assert manifest["complete"] and manifest["task"]["kind"] == "custom"
    assert manifest["task"]["config"]["settings"] == {"hidden": 16, "num_layers": 2}
    assert manifest["schedule"]["kind"] == "flow"
    assert (
        cli(
            [
                "sample",
                "--run",
                str(run),
                "--per-class",
                "1",
                "--num-steps",
                "2",
                "--out",
                str(tmp_path / "g.png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "g.png").is_file()
    assert dbf.TrainConfig.from_dict(manifest["train"]).noise.process == "flow"
    assert cli(["train", "--model", "tests.own_models:residual", "--model-config", "{bad", *fast]) == 2
    assert "--model-config" in capsys.readouterr().err
