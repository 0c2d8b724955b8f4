"""The independence invariant (DESIGN.md section 3) and the trainer's promises: resume, saves, errors."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

import dblocks_fast as dbf
from dblocks_fast import checkpoint
from dblocks_fast.train import Trainer, block_order, lr_at


def _state(trainer):
    """Every tensor of every block: weights and AdamW moments (and the step counts)."""
    out = {}
    for b, (blk, opt) in enumerate(zip(trainer.model.blocks, trainer.optimizers)):
        for k, v in checkpoint.block_state(blk, opt).items():
            out[f"{b}/{k}"] = v.clone()
        out[f"{b}/steps"] = torch.tensor(trainer.steps_done[b])
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def _fit(task, data, cfg, **kw):
    t = Trainer(task, data, cfg, **kw)
    t.fit()
    return t


def test_a_step_of_block_b_touches_only_block_b(tiny_task, digits, tiny_config):
    t = Trainer(tiny_task, digits, tiny_config())
    for b in range(3):
        t.step(b)  # every block has taken a step, so all have optimizer state
    for b in range(3):
        before = _state(t)
        for blk in t.model.blocks:
            blk.zero_grad(set_to_none=True)
        t.step(b)
        after = _state(t)
        for k in before:
            if not k.startswith(f"{b}/"):
                assert torch.equal(before[k], after[k]), k
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(f"{b}/param/"))
        for other in set(range(3)) - {b}:
            assert all(p.grad is None for p in t.model.blocks[other].parameters())
        # and its own gradients are freed after the step: no block holds gradients between its steps
        assert all(p.grad is None for p in t.model.blocks[b].parameters())


def test_sequential_and_random_schedules_give_identical_blocks(tiny_task, digits, tiny_config):
    seq = _fit(tiny_task, digits, tiny_config(schedule="sequential"))
    rnd = _fit(tiny_task, digits, tiny_config(schedule="random"))
    assert list(seq.order) != list(rnd.order)
    _assert_same(_state(seq), _state(rnd))
    other_seed = _fit(tiny_task, digits, tiny_config(schedule="random", seed=1))
    assert not torch.equal(_state(other_seed)["0/param/pos_embed"], _state(rnd)["0/param/pos_embed"])


def test_a_block_trains_the_same_alone(tiny_task, digits, tiny_config):
    """Block 1 trained by itself equals block 1 of a full run: nothing of the other blocks leaks in."""
    full = _fit(tiny_task, digits, tiny_config())
    alone = Trainer(tiny_task, digits, tiny_config())
    for _ in range(6):
        alone.step(1)
    a, b = _state(full), _state(alone)
    for k in a:
        if k.startswith("1/"):
            assert torch.equal(a[k], b[k]), k


class _Stop(Exception):
    pass


def _stop_at(total_steps, exc):
    def cb(trainer, b):
        if sum(trainer.steps_done) == total_steps:
            raise exc

    return cb


@pytest.mark.parametrize("schedule", ["random", "sequential"])
def test_ctrl_c_then_resume_is_bit_identical(tiny_task, digits, tiny_config, tmp_path, schedule):
    ref = _fit(tiny_task, digits, tiny_config(schedule=schedule))
    cfg = tiny_config(schedule=schedule, out_dir=str(tmp_path / "run"))
    with pytest.warns(UserWarning, match="interrupted: saved"), pytest.raises(KeyboardInterrupt):
        _fit(tiny_task, digits, cfg, callback=_stop_at(7, KeyboardInterrupt))  # mid-block
    manifest = checkpoint.read_manifest(tmp_path / "run")
    assert sum(e["steps"] for e in manifest["blocks"]) == 7 and not manifest["complete"]
    resumed = _fit(tiny_task, digits, cfg, resume=True)
    _assert_same(_state(ref), _state(resumed))
    assert checkpoint.read_manifest(tmp_path / "run")["complete"]
    _assert_same(_state(ref), _state(Trainer(tiny_task, digits, cfg, resume=True)))  # and as saved on disk


def test_crash_resumes_from_the_last_periodic_checkpoint(tiny_task, digits, tiny_config, tmp_path):
    ref = _fit(tiny_task, digits, tiny_config())
    cfg = tiny_config(out_dir=str(tmp_path / "run"), ckpt_every=4)
    with pytest.raises(_Stop):
        _fit(tiny_task, digits, cfg, callback=_stop_at(11, _Stop()))  # nothing saved at the crash itself
    assert sum(e["steps"] for e in checkpoint.read_manifest(tmp_path / "run")["blocks"]) == 8
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"block": 0, "st')  # a line cut short by the crash
    resumed = _fit(tiny_task, digits, cfg, resume=True)
    _assert_same(_state(ref), _state(resumed))
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len({(r["block"], r["step"]) for r in recs}) == len(recs)  # no line twice after the resume
    assert len(recs) >= len(lines)
    files = sorted(p.name for p in (tmp_path / "run" / "blocks").iterdir())
    assert files == [f"block{b:03d}-step000000006.safetensors" for b in range(3)]  # stale files removed


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(
    tiny_task, digits, tiny_config, tmp_path, monkeypatch
):
    cfg = tiny_config(out_dir=str(tmp_path / "run"), ckpt_every=3, log_every=100)
    with pytest.raises(_Stop):
        _fit(tiny_task, digits, cfg, callback=_stop_at(4, _Stop()))  # crash after the first save (at 3)

    def files():  # what a checkpoint holds (not the metric lines, nor the lock file, which names its holder)
        return {
            p: p.read_bytes()
            for p in (tmp_path / "run").rglob("*")
            if p.is_file() and p.suffix != ".jsonl" and p.name != ".lock"
        }

    snapshot = files()
    real_loss = type(tiny_task).loss

    def nan_loss(self, block, batch, sigma, generator, *, process):
        loss, per = real_loss(self, block, batch, sigma, generator, process=process)
        return loss * float("nan"), per

    monkeypatch.setattr(type(tiny_task), "loss", nan_loss)
    with pytest.raises(dbf.TrainingDiverged, match=r"non-finite .* lower --lr") as e:
        _fit(tiny_task, digits, cfg, resume=True)
    assert "is intact" in str(e.value)
    assert files() == snapshot


def test_resume_refuses_other_settings_and_fresh_runs_refuse_old_folders(
    tiny_task, digits, tiny_config, tmp_path
):
    cfg = tiny_config(out_dir=str(tmp_path / "run"))
    _fit(tiny_task, digits, cfg)
    with pytest.raises(FileExistsError, match="already holds a run"):
        Trainer(tiny_task, digits, cfg)
    with pytest.raises(ValueError, match="lr: saved 0.001, now 0.002"):
        Trainer(tiny_task, digits, tiny_config(out_dir=str(tmp_path / "run"), lr=2e-3), resume=True)
    Trainer(
        tiny_task, digits, tiny_config(out_dir=str(tmp_path / "run"), log_every=5), resume=True
    )  # reporting may change
    with pytest.raises(checkpoint.CheckpointError, match="no manifest.json"):
        Trainer(tiny_task, digits, tiny_config(out_dir=str(tmp_path)), resume=True)


def test_corrupt_and_missing_checkpoints_are_reported(tiny_task, digits, tiny_config, tmp_path):
    run = tmp_path / "run"
    _fit(tiny_task, digits, tiny_config(out_dir=str(run)))
    f = sorted((run / "blocks").iterdir())[1]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="block 1's checkpoint .* is corrupt"):
        dbf.load(run)
    f.unlink()
    with pytest.raises(checkpoint.CheckpointError, match="is missing"):
        Trainer(tiny_task, digits, tiny_config(out_dir=str(run)), resume=True)
    (run / "manifest.json").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="is damaged"):
        dbf.load(run)


def test_a_failed_save_leaves_the_previous_checkpoint(tiny_task, digits, tiny_config, tmp_path, monkeypatch):
    run = tmp_path / "run"
    t = Trainer(tiny_task, digits, tiny_config(out_dir=str(run)))
    first = int(t.order[0])
    t.step(first)  # follow the schedule, as fit() does
    t.save()
    good = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    t.step(int(t.order[1]))
    real = checkpoint.atomic_write

    def failing(path, data):
        if path.name == checkpoint.MANIFEST:
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write", failing)
    with pytest.raises(OSError, match="disk full"):
        t.save()
    monkeypatch.setattr(checkpoint, "atomic_write", real)
    for p, data in good.items():
        assert p.read_bytes() == data
    t.close()  # it was never fit: release the run folder
    resumed = Trainer(tiny_task, digits, tiny_config(out_dir=str(run)), resume=True)
    assert resumed.steps_done == [int(b == first) for b in range(3)]
    assert not list(run.rglob("*.tmp"))


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    checkpoint.atomic_write(p, b"old")

    def boom(fd):
        raise OSError("fsync failed")

    monkeypatch.setattr(checkpoint.os, "fsync", boom)
    with pytest.raises(OSError):
        checkpoint.atomic_write(p, b"new")
    assert p.read_bytes() == b"old" and [x.name for x in tmp_path.iterdir()] == ["f.bin"]


def test_data_order_visits_every_example_once_per_epoch(tiny_task, digits, tiny_config):
    t = Trainer(tiny_task, digits, tiny_config(batch_size=100))
    per_epoch = len(digits) // 100
    seen = torch.cat([t._batch_indices(0, s) for s in range(per_epoch)])
    assert len(set(seen.tolist())) == len(seen) == per_epoch * 100
    assert not torch.equal(t._batch_indices(0, 0), t._batch_indices(1, 0))  # each block its own order
    assert not torch.equal(t._batch_indices(0, 0), t._batch_indices(0, per_epoch))  # a new order each epoch


def test_block_order_and_learning_rate_schedule(tiny_config):
    order = block_order("random", 3, 50, seed=0)
    assert np.bincount(order).tolist() == [50, 50, 50]
    assert block_order("sequential", 3, 2, 0).tolist() == [0, 0, 1, 1, 2, 2]
    cfg = tiny_config(steps_per_block=100, warmup=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(99, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 89 / 90)))


def test_chunked_turns_of_a_whole_epoch_with_chunk_steps_0(tiny_task, digits, tiny_config):
    data = digits.subset(np.arange(40), "forty")
    t = Trainer(tiny_task, data, tiny_config(schedule="chunked", chunk_steps=0, steps_per_block=12))
    # 40 // 8 = 5 steps an epoch: each block's 12 steps in turns of 5, 5 and 2 (turns of one block may meet)
    assert t.order.tolist() == block_order("chunked", 3, 12, 0, chunk_steps=5).tolist()
    turns = [len(list(g)) for _, g in itertools.groupby(t.order.tolist())]
    assert set(turns) <= {2, 5, 7, 10, 12} and 2 in turns and sum(turns) == 36
    with pytest.raises(ValueError, match="chunk_steps must be >= 0"):
        tiny_config(chunk_steps=-1).validate()


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_blocks=4), "larger than the number of layers"),
        (dict(layers=[1, 1, 2]), "sums to 4"),
        (dict(batch_size=5000), "larger than the training set"),
        (dict(schedule="zigzag"), "schedule must be"),
        (dict(precision="fp8"), "precision must be"),
        (dict(kernels="fast"), "kernels must be one of"),
    ],
)
def test_bad_configs_are_refused(tiny_task, digits, tiny_config, kw, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        _fit(tiny_task, digits, tiny_config(**kw))


def test_bf16_and_end_to_end_baseline_train(tiny_task, digits, tiny_config):
    t = _fit(tiny_task, digits, tiny_config(num_blocks=1, precision="bf16"))
    assert t.layers == [3] and t.steps_done == [6]
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_training_reduces_the_loss(tiny_task, digits, tiny_config):
    """A short convergence check: each block's loss on a fixed batch falls well below its value at init."""
    t = Trainer(tiny_task, digits, tiny_config(steps_per_block=150, batch_size=64, warmup=10, lr=3e-3))

    @torch.no_grad()
    def held_out_loss(b):
        g = torch.Generator().manual_seed(99)
        batch = digits.batch(torch.arange(512))
        sigma = t.schedule.sample(b, 512, g)
        return tiny_task.loss(t.model.blocks[b], batch, sigma, g, process=t.schedule)[0].item()

    before = [held_out_loss(b) for b in range(3)]
    t.fit()
    after = [held_out_loss(b) for b in range(3)]
    # the low-noise block starts close to optimal (D = c_skip z is already a good denoiser there)
    assert all(a < 0.9 * b for a, b in zip(after, before)), (before, after)
    assert sum(after) < 0.65 * sum(before), (before, after)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the kernels can run here")
@pytest.mark.parametrize("kernels", ["triton", "cuda"])
def test_kernels_that_cannot_run_are_refused_before_the_run_folder_is_written(
    tiny_task, digits, tiny_config, tmp_path, monkeypatch, kernels
):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the tests' interpreter would run Triton on the CPU
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=f"kernels='{kernels}'.* cannot run on device cpu: it needs CUDA"):
        Trainer(tiny_task, digits, tiny_config(kernels=kernels, out_dir=str(run)))
    assert not run.exists()


@pytest.mark.parametrize("device,match", [("tpu", "is not a device"), ("cuda:99", "cuda:99")])
def test_a_device_this_machine_lacks_is_refused_before_the_run_folder_is_written(
    tiny_task, digits, tiny_config, tmp_path, device, match
):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        Trainer(tiny_task, digits, tiny_config(device=device, out_dir=str(run)))
    assert not run.exists()
