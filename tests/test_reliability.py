"""Nothing lost, whatever happens: a locked run folder, SIGTERM, a full disk, stale files, the same bytes for
the same training, and extending a finished run."""

import errno
import io
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from dblocks_fast import checkpoint
from dblocks_fast.checkpoint import RunFolder, RunInUse
from dblocks_fast.cli import EXIT_PREEMPTED
from dblocks_fast.cli import main as cli
from dblocks_fast.train import Preempted, Trainer, lr_at
from tests.invariants import block_states


def _files(run):
    """A checkpoint's files and their bytes (not the metric lines nor the lock, which names its holder)."""
    return {
        p.relative_to(run): p.read_bytes()
        for p in run.rglob("*")
        if p.is_file() and p.suffix != ".jsonl" and p.name != RunFolder.LOCK
    }


def test_a_second_training_into_a_busy_run_folder_is_refused(tiny_task, digits, tiny_config, tmp_path):
    run = tmp_path / "run"
    first = Trainer(tiny_task, digits, tiny_config(out_dir=str(run), seed=1))
    with pytest.raises(RunInUse, match=rf"is in use by pid {os.getpid()} on host .*train into another --out"):
        Trainer(tiny_task, digits, tiny_config(out_dir=str(run), seed=2))
    first.fit()  # the first run is untouched by the attempt, and its end releases the folder
    assert checkpoint.read_manifest(run)["train"]["seed"] == 1
    resumed = Trainer(tiny_task, digits, tiny_config(out_dir=str(run), seed=1), resume=True)
    resumed.close()
    # a set-up that fails leaves no folder it created behind (the lock file included)
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(tiny_task, digits, tiny_config(out_dir=str(tmp_path / "new"), batch_size=10**6))
    assert not (tmp_path / "new").exists()


def test_two_trainings_started_together_one_runs_one_is_refused(tmp_path):
    """The issue's reproduction: two `dblocks-fast train` into one --out at once."""
    args = [
        "--steps-per-block",
        "20",
        "--batch-size",
        "16",
        "--ckpt-every",
        "10",
        "--no-eval",
        "--no-progress",
    ]
    args += ["--out", str(tmp_path / "same")]
    cmd = [sys.executable, "-m", "dblocks_fast.cli", "train", *args]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [
        subprocess.Popen([*cmd, "--seed", s], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        for s in ("1", "2")
    ]
    results = [(p.wait(timeout=300), p.stderr.read().decode()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "is in use by pid" in refused
    seed = checkpoint.read_manifest(tmp_path / "same")["train"]["seed"]
    winner = next(i for i, (code, _) in enumerate(results) if code == 0)
    assert seed == winner + 1  # the folder holds the run that ran, whole


def test_sigterm_finishes_the_step_saves_and_resumes_exactly(tiny_task, digits, tiny_config, tmp_path):
    full = Trainer(tiny_task, digits, tiny_config())
    full.fit()
    run = tmp_path / "run"

    def preempt(trainer, b):
        if sum(trainer.steps_done) == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler does; the handler waits for the step's end

    with pytest.warns(UserWarning, match="stopped by SIGTERM: saved"), pytest.raises(Preempted) as e:
        Trainer(tiny_task, digits, tiny_config(out_dir=str(run)), callback=preempt).fit()
    assert e.value.signal == "SIGTERM"
    assert sum(e["steps"] for e in checkpoint.read_manifest(run)["blocks"]) == 6  # the step it was in, too
    resumed = Trainer(tiny_task, digits, tiny_config(out_dir=str(run)), resume=True)
    resumed.fit()
    a, b = block_states(resumed), block_states(full)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_cli_exits_with_its_preemption_code_on_sigusr1(tmp_path, monkeypatch, capsys):
    real = Trainer._after_step

    def after(self, b, bar):
        real(self, b, bar)
        if sum(self.steps_done) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(Trainer, "_after_step", after)
    run = tmp_path / "run"
    fast = ["--steps-per-block", "3", "--batch-size", "16", "--no-progress", "--no-eval"]
    with pytest.warns(UserWarning, match="stopped by SIGUSR1"):
        assert cli(["train", *fast, "--out", str(run)]) == EXIT_PREEMPTED
    assert "stopped by SIGUSR1; resume with --resume" in capsys.readouterr().err
    # the signal came after the second step's check: the third step, in flight, finished and was saved
    assert sum(e["steps"] for e in checkpoint.read_manifest(run)["blocks"]) == 3


def test_a_checkpoint_that_cannot_fit_is_refused_before_writing(
    tiny_task, digits, tiny_config, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    t = Trainer(tiny_task, digits, tiny_config(out_dir=str(run)))
    t.step(int(t.order[0]))
    t.save()
    good = _files(run)
    t.step(int(t.order[1]))
    monkeypatch.setattr(checkpoint, "_free_bytes", lambda path: 500)
    # in units that show a small run's numbers (in GB they read 0.00)
    numbers = r"needs \d+ kB \(and 16.8 MB to spare\), 500 bytes are free\. Nothing was written.*Free 16.9 MB"
    with pytest.raises(checkpoint.CheckpointError, match=numbers):
        t.save()
    assert _files(run) == good
    t.close()


def test_a_disk_that_fills_during_a_save_loses_nothing_and_leaves_nothing(
    tiny_task, digits, tiny_config, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    t = Trainer(tiny_task, digits, tiny_config(out_dir=str(run)))
    for b in range(3):
        t.step(b)
    t.save()
    good = _files(run)
    for b in range(3):
        t.step(b)
    real, calls = checkpoint.save_file, []

    def fills_up(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second block: half a file, then the disk is full
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", fills_up)
    with pytest.raises(
        checkpoint.DiskFull, match="no space left on the device of .* the last good checkpoint"
    ):
        t.save()
    assert _files(run) == good  # neither the first block's new file nor the half-written one is left
    monkeypatch.setattr(checkpoint, "save_file", real)
    t.close()
    resumed = Trainer(tiny_task, digits, tiny_config(out_dir=str(run)), resume=True)
    assert resumed.steps_done == [1, 1, 1]
    resumed.close()


def _half_run(tiny_task, digits, tiny_config, run):
    """A run folder holding a checkpoint after one step of each block, the run unfinished."""
    t = Trainer(tiny_task, digits, tiny_config(out_dir=str(run)))
    for b in range(3):
        t.step(b)
    t.save()
    t.close()
    return _files(run)


def test_a_read_only_run_folder_is_a_clear_error_that_changes_nothing(
    tiny_task, digits, tiny_config, tmp_path, monkeypatch
):
    """Found by benchmarks/bench_crash.py: resuming a run on a read-only mount raised a bare OSError."""
    run = tmp_path / "run"
    good = _half_run(tiny_task, digits, tiny_config, run)
    real = os.open

    def read_only(path, flags, *args, **kw):  # a read-only mount: reads work, writes are refused
        if str(path).startswith(str(run)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(checkpoint.NotWritable, match=r"cannot write .*\.lock: Read-only file system\. .*"
                       r"nothing in it was changed"):  # fmt: skip
        Trainer(tiny_task, digits, tiny_config(out_dir=str(run)), resume=True)
    monkeypatch.setattr(os, "open", real)
    assert _files(run) == good
    Trainer(tiny_task, digits, tiny_config(out_dir=str(run)), resume=True).fit()  # writable again: resumes


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes whatever the permissions say")
def test_a_run_folder_without_write_permission_is_a_clear_error(tiny_task, digits, tiny_config, tmp_path):
    run = tmp_path / "run"
    good = _half_run(tiny_task, digits, tiny_config, run)
    paths = [run, *run.rglob("*")]
    for p in paths:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        with pytest.raises(checkpoint.NotWritable, match="Permission denied"):
            Trainer(tiny_task, digits, tiny_config(out_dir=str(run)), resume=True)
    finally:
        for p in paths:
            p.chmod(p.stat().st_mode | 0o200)
    assert _files(run) == good


def test_a_disk_full_to_the_last_byte_is_a_clear_error_at_every_write(
    tiny_task, digits, tiny_config, tmp_path, monkeypatch
):
    """Found by benchmarks/bench_crash.py on a full tmpfs: config.json's write (before any checkpoint, which
    checks the free space first) raised a bare OSError; so did a metric line."""
    run = tmp_path / "run"
    good = _half_run(tiny_task, digits, tiny_config, run)

    class Full(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    real = open

    def full_open(path, mode="r", *args, **kw):  # reads work; every write finds the disk full
        return (
            Full(path, mode.replace("t", "").replace("b", ""))
            if set(mode) & set("wa")
            else real(path, mode, *args, **kw)
        )

    monkeypatch.setattr(checkpoint, "open", full_open, raising=False)
    t = Trainer(tiny_task, digits, tiny_config(out_dir=str(run)), resume=True)
    with pytest.raises(checkpoint.DiskFull, match="while writing config.json .* last good checkpoint"):
        t.fit()
    with pytest.raises(checkpoint.DiskFull, match="while writing metrics.jsonl"):
        RunFolder(run).append_metrics({"block": 0, "step": 1})
    monkeypatch.undo()
    assert _files(run) == good and not list(run.rglob("*.tmp"))
    Trainer(tiny_task, digits, tiny_config(out_dir=str(run)), resume=True).fit()


def test_a_fresh_start_after_a_start_that_died_before_its_first_checkpoint_logs_each_step_once(
    tiny_task, digits, tiny_config, tmp_path
):
    """Found by benchmarks/bench_crash.py: the dead start's metric lines stayed: steps were logged twice."""

    def dies(trainer, b):
        if sum(trainer.steps_done) == 10:
            raise RuntimeError("killed")  # saves nothing, as SIGKILL

    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        Trainer(tiny_task, digits, tiny_config(out_dir=str(run)), callback=dies).fit()
    assert not RunFolder(run).holds_run() and len(RunFolder(run).metrics()) >= 3
    Trainer(tiny_task, digits, tiny_config(out_dir=str(run))).fit()  # started afresh, as the error says
    steps = [(r["block"], r["step"]) for r in map(json.loads, RunFolder(run).metrics())]
    assert sorted(steps) == [(b, s) for b in range(3) for s in (2, 4, 6)]


def test_stale_block_files_are_removed_on_resume(tiny_task, digits, tiny_config, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_task, digits, tiny_config(out_dir=str(run), steps_per_block=2)).fit()
    blocks = run / RunFolder.BLOCKS
    (blocks / "block001-step000000099.safetensors").write_bytes(b"left by a crash")
    (blocks / ".block000-step000000003.safetensors.abc.tmp").write_bytes(b"half a write")
    Trainer(tiny_task, digits, tiny_config(out_dir=str(run), steps_per_block=2), resume=True).close()
    named = {e["file"] for e in checkpoint.read_manifest(run)["blocks"]}
    assert {f"{RunFolder.BLOCKS}/{p.name}" for p in blocks.iterdir()} == named


def test_temporary_files_of_writes_a_kill_cut_short_are_removed_on_resume(
    tiny_task, digits, tiny_config, tmp_path
):
    """Found by benchmarks/bench_crash.py: a kill inside the write of the manifest, of trimmed metric lines or
    (disk tier) of a paged block left its temporary file for good; only blocks/ was cleared."""
    run = tmp_path / "run"
    config = tiny_config(out_dir=str(run), steps_per_block=2, offload="disk")
    Trainer(tiny_task, digits, config).fit()
    cut = [run / ".manifest.json.k1ll.tmp", run / ".metrics.jsonl.k1ll.tmp"]
    cut.append(RunFolder(run).paged_folder() / ".paged-block001.safetensors.k1ll.tmp")
    for f in cut:
        f.write_bytes(b"half a write")
    Trainer(tiny_task, digits, config, resume=True).close()
    assert not [f for f in cut if f.exists()]


_WRITE = """
import sys, torch
from dblocks_fast.checkpoint import RunFolder
g = torch.Generator().manual_seed(0)
tensors = {"param/w": torch.randn(5, 3, generator=g), "exp_avg/w": torch.zeros(5, 3)}
RunFolder(sys.argv[1]).write_block(2, 7, tensors)
"""


def test_the_same_block_written_by_two_processes_has_the_same_bytes(tmp_path):
    # safetensors writes its metadata map in a per-process random order: a key order that differed made the
    # same training's files differ
    for name in ("a", "b", "c"):
        subprocess.run([sys.executable, "-c", _WRITE, str(tmp_path / name)], check=True)
    files = [(tmp_path / n / "blocks" / "block002-step000000007.safetensors").read_bytes() for n in "abc"]
    assert files[0] == files[1] == files[2]
    header = json.loads(files[0][8 : 8 + int.from_bytes(files[0][:8], "little")])
    assert json.loads(header["__metadata__"]["dblocks_fast"]) == {"block": 2, "steps": 7}


def test_a_finished_run_extends_to_more_steps(tiny_task, digits, tiny_config, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_task, digits, tiny_config(out_dir=str(run), steps_per_block=4)).fit()
    longer = tiny_config(out_dir=str(run), steps_per_block=6)
    with pytest.raises(ValueError, match=r"steps_per_block: saved 4, now 6.*pass extend=True \(--extend\)"):
        Trainer(tiny_task, digits, longer, resume=True)
    with pytest.raises(ValueError, match="it was planned for 4"):
        Trainer(tiny_task, digits, tiny_config(out_dir=str(run), steps_per_block=3), resume=True, extend=True)
    t = Trainer(tiny_task, digits, longer, resume=True, extend=True)
    assert t.steps_done == [4, 4, 4]
    t.fit()
    manifest = checkpoint.read_manifest(run)
    assert manifest["complete"] and [e["steps"] for e in manifest["blocks"]] == [6, 6, 6]
    lines = [json.loads(x) for x in (run / RunFolder.METRICS).read_text().splitlines()]
    last = [r for r in lines if r["block"] == 0 and r["step"] == 6][0]
    assert last["lr"] == pytest.approx(lr_at(5, longer))  # the new length's schedule from where it stood
