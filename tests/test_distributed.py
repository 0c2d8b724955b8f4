"""Block-parallel training (gloo, spawned CPU processes) and merging runs of disjoint blocks.

The promise under test: blocks trained on separate processes, or on separate machines and merged, are the
blocks a single process trains, bit for bit (data parallelism inside a block: equal up to the all-reduce's
rounding), and a rank that dies leaves a run folder that loads and resumes.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dblocks_fast as dbf
from dblocks_fast import checkpoint
from dblocks_fast.checkpoint import merge_runs
from dblocks_fast.cli import main as cli
from dblocks_fast.distributed import place

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int | None, spec: dict, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Start `world` worker processes with torchrun's environment (None: one plain process); wait for all."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "tests.distworker", json.dumps(spec)]
    if world is None:
        return [subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)]
    port = _free_port()
    procs = []
    for r in range(world):
        e = {**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world)}
        e.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world))
        procs.append(subprocess.Popen(cmd, env=e, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out = []
    for r, p in enumerate(procs):
        try:
            so, se = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"rank {r} did not finish in {timeout} s") from None
        out.append(subprocess.CompletedProcess(cmd, p.returncode, so.decode(), se.decode()))
    return out


def _ok(results):
    for r, res in enumerate(results):
        assert res.returncode == 0, f"rank {r} failed:\n{res.stderr[-3000:]}"


def _run_tensors(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every block of a run folder, named block/tensor, plus the block steps."""
    manifest = checkpoint.read_manifest(run)
    out = {}
    for b, e in enumerate(manifest["blocks"]):
        for k, v in checkpoint.read_block(run, manifest, b).items():
            out[f"{b}/{k}"] = v
        out[f"{b}/steps"] = torch.tensor(e["steps"])
    return out


def _assert_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# --- placement ----------------------------------------------------------------------------------------------
def test_placement_of_blocks_on_ranks():
    assert [place(2, r, range(2)).blocks for r in range(2)] == [(0,), (1,)]
    four = [place(4, r, range(2)) for r in range(4)]
    assert [p.blocks for p in four] == [(0,), (0,), (1,), (1,)]
    assert [p.group for p in four] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [p.leader for p in four] == [True, False, True, False]
    assert [p.rows(16) for p in four] == [(0, 8), (8, 16), (0, 8), (8, 16)]
    assert [place(2, r, range(4)).blocks for r in range(2)] == [(0, 1), (2, 3)]
    assert [place(2, r, range(3)).blocks for r in range(2)] == [(0, 1), (2,)]
    assert [place(2, r, [1, 3]).blocks for r in range(2)] == [(1,), (3,)]
    with pytest.raises(ValueError, match="world size 3 cannot be split evenly over 2 blocks"):
        place(3, 0, range(2))


def test_distributed_on_without_torchrun_says_what_to_do(tiny_task, digits, tiny_config, monkeypatch):
    for k in ("MASTER_ADDR", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="needs torchrun"):
        dbf.Trainer(tiny_task, digits, tiny_config(distributed="on"))


# --- block-parallel training equals one process -------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single-process sequential runs, one thread: B=2 (batch 8 and 16) and B=4."""
    root = tmp_path_factory.mktemp("reference")
    runs = {}
    for name, spec in {
        "b2": dict(num_blocks=2, schedule="sequential"),
        "b2x16": dict(num_blocks=2, schedule="sequential", batch_size=16),
        "b4": dict(num_blocks=4, schedule="sequential"),
    }.items():
        runs[name] = root / name
        _ok(_launch(None, {**spec, "out_dir": str(runs[name])}))
    return runs


def test_one_rank_per_block_writes_the_single_process_run_bit_for_bit(reference, tmp_path):
    run, dump = tmp_path / "run", tmp_path / "dump"
    _ok(_launch(2, dict(num_blocks=2, out_dir=str(run), ckpt_every=3, dump=str(dump))))
    _assert_equal(_run_tensors(run), _run_tensors(reference["b2"]))
    manifest = checkpoint.read_manifest(run)
    assert manifest["complete"] and [e["steps"] for e in manifest["blocks"]] == [6, 6]
    for r in range(2):
        info = json.loads((dump / f"rank{r}.json").read_text())
        assert info["blocks"] == [r]
        # one block per rank: no gradient traffic at all, and nothing between blocks' groups
        assert info["sent"]["group"] == 0 and info["sent"]["between_groups"] == 0
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted((ln["block"], ln["step"]) for ln in lines) == [(b, s) for b in range(2) for s in (2, 4, 6)]
    model = dbf.load(run)  # the folder is an ordinary run folder
    assert model.num_blocks == 2


def test_two_ranks_per_block_equal_the_whole_batch_on_one_process(reference, tmp_path):
    run, dump = tmp_path / "run", tmp_path / "dump"
    # paged to disk as well: the two ranks of a group hold the same block, each in its own paging folder
    _ok(_launch(4, dict(num_blocks=2, batch_size=16, out_dir=str(run), dump=str(dump), offload="disk")))
    ours, ref = _run_tensors(run), _run_tensors(reference["b2x16"])
    assert ours.keys() == ref.keys()
    for k in ours:  # the same math; the all-reduce sums the two halves in another order
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)
    ranks = [load_file(dump / f"rank{r}.safetensors") for r in range(4)]
    _assert_equal(ranks[0], ranks[1])  # the two ranks of a group hold identical weights and moments
    _assert_equal(ranks[2], ranks[3])
    sent = [json.loads((dump / f"rank{r}.json").read_text())["sent"] for r in range(4)]
    assert all(s["group"] > 0 and s["between_groups"] == 0 for s in sent)


def test_fewer_ranks_than_blocks_train_several_each_with_paging(reference, tmp_path):
    run, dump = tmp_path / "run", tmp_path / "dump"
    _ok(_launch(2, dict(num_blocks=4, out_dir=str(run), dump=str(dump), offload="host")))
    _assert_equal(_run_tensors(run), _run_tensors(reference["b4"]))
    assert [json.loads((dump / f"rank{r}.json").read_text())["blocks"] for r in range(2)] == [[0, 1], [2, 3]]


def test_a_rank_that_dies_leaves_a_loadable_run_that_resumes_to_the_same_blocks(reference, tmp_path):
    run = tmp_path / "run"
    spec = dict(num_blocks=2, out_dir=str(run), ckpt_every=2, kill_at=[1, 4], schedule="sequential")
    results = _launch(2, spec)
    assert results[1].returncode == -9  # SIGKILL, as the test asked
    assert results[0].returncode != 0
    assert "another rank has stopped, died or cannot be reached" in results[0].stderr
    assert "Checkpoints already written stay valid" in results[0].stderr
    manifest = checkpoint.read_manifest(run)
    assert not manifest["complete"]
    for b in range(2):
        if manifest["blocks"][b]["steps"]:
            checkpoint.read_block(run, manifest, b)  # every file it names is there and intact
    # finish it on one process: the result is the run that never failed
    _ok(_launch(None, dict(num_blocks=2, out_dir=str(run), ckpt_every=2, resume=True)))
    _assert_equal(_run_tensors(run), _run_tensors(reference["b2"]))


def test_torchrun_trains_through_the_command_line(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "dblocks_fast.cli", "train", "--blocks", "2", "--steps-per-block", "3", "--batch-size", "8"]
    cmd += ["--warmup", "1", "--device", "cpu", "--no-eval", "--no-progress", "--out", str(run)]
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "on 2 processes" in res.stdout
    manifest = checkpoint.read_manifest(run)
    assert manifest["complete"] and [e["steps"] for e in manifest["blocks"]] == [3, 3]
    assert json.loads((run / "cli.json").read_text())["preset"] == "digits-dit"


# --- --only-blocks and merge --------------------------------------------------------------------------------
def _train(tiny_task, digits, tiny_config, out, **kw):
    dbf.Trainer(tiny_task, digits, tiny_config(out_dir=str(out), **kw)).fit()
    return out


def test_only_blocks_trains_just_those_and_builds_nothing_else(tiny_task, digits, tiny_config, tmp_path):
    t = dbf.Trainer(tiny_task, digits, tiny_config(only_blocks=[2, 0], out_dir=str(tmp_path / "a")))
    assert t.owned == [0, 2] and t.optimizers[1] is None
    assert not list(t.model.blocks[1].parameters())
    with pytest.raises(ValueError, match="block 1 is not trained by this process"):
        t.step(1)
    t.fit()
    manifest = checkpoint.read_manifest(tmp_path / "a")
    assert [e["steps"] for e in manifest["blocks"]] == [6, 0, 6] and not manifest["complete"]
    with pytest.raises(checkpoint.CheckpointError, match="block 1 has no checkpoint .* merge"):
        dbf.load(tmp_path / "a")
    # a later night: the missing block, trained into the same folder, completes the run
    dbf.Trainer(
        tiny_task, digits, tiny_config(only_blocks=[1], out_dir=str(tmp_path / "a")), resume=True
    ).fit()
    full = _train(tiny_task, digits, tiny_config, tmp_path / "full")
    _assert_equal(_run_tensors(tmp_path / "a"), _run_tensors(full))
    assert checkpoint.read_manifest(tmp_path / "a")["complete"]


def test_merged_only_blocks_runs_equal_one_full_run(tiny_task, digits, tiny_config, tmp_path):
    a = _train(tiny_task, digits, tiny_config, tmp_path / "a", only_blocks=[0, 2])
    b = _train(tiny_task, digits, tiny_config, tmp_path / "b", only_blocks=[1], log_every=3)
    full = _train(tiny_task, digits, tiny_config, tmp_path / "full")
    assert cli(["merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 0
    merged = tmp_path / "m"
    _assert_equal(_run_tensors(merged), _run_tensors(full))
    manifest = checkpoint.read_manifest(merged)
    assert manifest["complete"] and manifest["train"]["only_blocks"] is None
    lines = (merged / "metrics.jsonl").read_text().splitlines()
    assert {json.loads(ln)["block"] for ln in lines} == {0, 1, 2}
    assert dbf.load(merged).num_blocks == 3
    dbf.sample(merged, [0, 1], num_steps=3, device="cpu")


def test_a_merge_stopped_midway_is_finished_by_the_same_merge(
    tiny_task, digits, tiny_config, tmp_path, capsys
):
    """Found by benchmarks/bench_crash.py: a merge killed mid-copy left a folder that the same merge then
    refused ("not empty"), though it held no run (no manifest) and nothing of value."""
    a = _train(tiny_task, digits, tiny_config, tmp_path / "a", only_blocks=[0, 2])
    b = _train(tiny_task, digits, tiny_config, tmp_path / "b", only_blocks=[1])
    full = _train(tiny_task, digits, tiny_config, tmp_path / "full")
    merged = tmp_path / "m"
    assert cli(["merge", str(a), str(b), "--out", str(merged)]) == 0
    # what SIGKILL before the manifest leaves: the copies made so far and the temporary file of the next one
    (merged / "manifest.json").unlink()
    (merged / "blocks" / ".block002-step000000006.safetensors.x1y2.tmp").write_bytes(b"cut short")
    assert cli(["merge", str(a), str(b), "--out", str(merged)]) == 0
    _assert_equal(_run_tensors(merged), _run_tensors(full))
    assert not list(merged.rglob("*.tmp"))
    # stopped right after the manifest: the same merge finds it done and removes what the stop left
    (merged / "blocks" / ".block000-step000000006.safetensors.x1y2.tmp").write_bytes(b"cut short")
    before = (merged / "manifest.json").stat().st_mtime_ns
    assert cli(["merge", str(a), str(b), "--out", str(merged)]) == 0
    assert (merged / "manifest.json").stat().st_mtime_ns == before and not list(merged.rglob("*.tmp"))
    _assert_equal(_run_tensors(merged), _run_tensors(full))
    # a merge of other runs into it is refused; so is a folder holding what a merge does not write
    capsys.readouterr()
    assert cli(["merge", str(a), str(full), "--out", str(merged)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    (merged / "manifest.json").unlink()
    (merged / "notes.txt").write_text("mine")
    assert cli(["merge", str(a), str(b), "--out", str(merged)]) == 2
    assert "holds notes.txt, which a merge does not write" in capsys.readouterr().err


def test_merge_refuses_runs_that_do_not_form_one_model(tiny_task, digits, tiny_config, tmp_path, capsys):
    a = _train(tiny_task, digits, tiny_config, tmp_path / "a", only_blocks=[0, 2])
    b = _train(tiny_task, digits, tiny_config, tmp_path / "b", only_blocks=[1])
    other_lr = _train(tiny_task, digits, tiny_config, tmp_path / "lr", only_blocks=[1], lr=2e-3)
    other_seed = _train(tiny_task, digits, tiny_config, tmp_path / "seed", only_blocks=[1], seed=3)
    full = _train(tiny_task, digits, tiny_config, tmp_path / "full", steps_per_block=6)
    with pytest.raises(ValueError, match=r"different settings.*lr \(0.001 vs 0.002\)"):
        merge_runs([a, other_lr], tmp_path / "m1")
    with pytest.raises(ValueError, match=r"seed \(0 vs 3\)"):
        merge_runs([a, other_seed], tmp_path / "m2")
    with pytest.raises(ValueError, match="block 1 was trained in none of"):
        merge_runs([a], tmp_path / "m3")
    with pytest.raises(ValueError, match="block 0 was trained in both"):
        merge_runs([a, b, full], tmp_path / "m4")
    for m in ("m1", "m2", "m3", "m4"):
        assert not (tmp_path / m).exists()  # a refused merge writes nothing
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    assert cli(["merge", str(a), str(b), "--out", str(tmp_path / "busy")]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "busy" / "x").read_text() == "keep"
    # a damaged block file is caught before anything is written
    f = next((b / "blocks").iterdir())
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        merge_runs([a, b], tmp_path / "m5")
    assert not (tmp_path / "m5").exists()


def test_bad_only_blocks_and_world_sizes_are_refused(tiny_task, digits, tiny_config):
    with pytest.raises(ValueError, match=r"only_blocks \[0, 5\]: \[5\] not in 0..2"):
        dbf.Trainer(tiny_task, digits, tiny_config(only_blocks=[0, 5]))
    with pytest.raises(ValueError, match="names a block twice"):
        dbf.Trainer(tiny_task, digits, tiny_config(only_blocks=[1, 1]))
    with pytest.raises(ValueError, match="distributed must be"):
        dbf.Trainer(tiny_task, digits, tiny_config(distributed="yes"))
