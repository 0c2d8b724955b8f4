"""Does a run survive being killed? SIGKILL at random moments, resume, repeat; compare with a run not killed.

    python benchmarks/bench_crash.py                  # >= 200 kills over every scenario (about half an hour)
    python benchmarks/bench_crash.py --quick          # a few kills a scenario: checks the pipeline
    python benchmarks/bench_crash.py --only disk merge --seed 3

Scenarios (a tiny DiT, B = 3, a checkpoint every few steps, so that kills often land inside one):
  resident, host, disk  one process trains with offload none, host or disk (disk: every block switch writes
                        the block that leaves to a paged file)
  torchrun              2 CPU ranks under torchrun; a kill takes the agent and both ranks at once
  merge                 `dblocks-fast merge` of two --only-blocks runs (larger blocks, so copies take time),
                        killed mid-merge, then run again into the same, possibly half-written, folder
  full-disk             a run on a small tmpfs: too little space for a checkpoint, then none at all, then
                        space freed (needs root to mount the tmpfs; skipped with the reason otherwise)
  read-only             a run folder on a read-only mount (root) or chmod a-w (other users), then resumed

A kill is SIGKILL to every process of the run, found by an environment tag (torchrun starts its workers in
sessions of their own, so a process group would miss them). 70% of the kills wait for the run to say it is
training and then land at a uniform moment of what is left of it; the rest land at a uniform moment of its
start-up (imports, set-up, reading the checkpoint). After each kill the harness names the moment from what
the kill left behind (a temporary block file: inside a checkpoint write, and so on), then starts the run
again, as a user would: resumed when a checkpoint was committed, afresh otherwise. Once a run has been
killed K times, the next start runs to the end.

Each run ends as one of: survived (every block's weights and AdamW moments equal, bit for bit, those of the
same run never killed), lost (no finished run that reads back: a start that failed, a checkpoint refused or
damaged) or diverged (finished, but a tensor differs). Also reported: runs whose metric lines differ from
the uninterrupted run's (step times aside) and files left behind that the run folder should not hold.

Writes results/bench_crash-<device>.json, .md and .png; exits 1 if a run was lost or diverged or a check
failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks import common, crashkit  # noqa: E402
from benchmarks.crashkit import (  # noqa: E402
    PHASES,
    compare,
    leftovers,
    listing,
    manifest_steps,
    metrics_diff,
    named_files,
    phase,
)

EXIT_PREEMPTED = 75  # what the child returns after SIGTERM saved the run (as `dblocks-fast train` does)

# (name, runs, kills per run) of a full measurement and of --quick
PLAN = {
    "resident": (8, 8),
    "host": (4, 8),
    "disk": (8, 8),
    "torchrun": (5, 6),
    "merge": (8, 5),
}
QUICK_PLAN = {"resident": (1, 3), "disk": (1, 3), "torchrun": (1, 2), "merge": (1, 3)}
CHECKS = ("full-disk", "read-only")
START_UP = 0.3  # the share of kills aimed at start-up (imports, set-up, reading the checkpoint)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [*PLAN, *CHECKS]
    ap.add_argument("--only", nargs="+", choices=names, help="just these scenarios (default: all)")
    ap.add_argument("--runs", type=int, help="runs per scenario (default: the plan's)")
    ap.add_argument("--kills", type=int, help="kills per run before it may finish (default: the plan's)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill moments (training seeds are fixed)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the runs train")
    ap.add_argument("--quick", action="store_true", help="a few kills a scenario: checks the pipeline")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: one training or merge (JSON settings)
    return ap.parse_args(argv)


# --- one child process: a training (or a merge) -------------------------------------------------------------
def child(spec: dict) -> int:
    """Train (or merge) as `spec` says; print "ready" when set up. Exit 0 done, 2 a CheckpointError (what the
    CLI reports as a message), 3 any other error (a traceback: not a clear message), 75 stopped by SIGTERM."""
    import traceback

    import dblocks_fast as dbf
    from dblocks_fast.cli import main as cli
    from dblocks_fast.train import Preempted

    torch.set_num_threads(1)
    if spec.get("merge"):
        print("ready", flush=True)
        rc = cli(["merge", *spec["merge"], "--out", spec["out_dir"]])
        print("done", flush=True)
        return rc
    try:
        trainer = make_trainer(spec)
        print("ready", flush=True)
        trainer.fit()
        print("done", flush=True)
    except Preempted:
        return EXIT_PREEMPTED
    except dbf.CheckpointError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        return 3
    return 0


def make_trainer(spec: dict):
    """The Trainer of `spec`: a DiT on the digits (from the harness's .npz: no scikit-learn to import)."""
    import dblocks_fast as dbf

    data = dbf.data.load_image_npz(spec["data"], "train")
    task = dbf.tasks.ImageGeneration.for_data(data, heads=2, patch_size=4, **spec["model"])
    keys = ("num_blocks", "steps_per_block", "batch_size", "warmup", "log_every", "ckpt_every", "seed")
    config = dbf.TrainConfig(
        **{k: spec[k] for k in keys},
        offload=spec["offload"],
        only_blocks=spec.get("only_blocks"),
        device=spec["device"],
        out_dir=spec["out_dir"],
        progress=False,
    )
    return dbf.Trainer(task, data, config, resume=spec["resume"])


def save_digits(path: Path) -> None:
    """Every digit as an .npz (floats in [-1, 1]); load_image_npz splits it as load_digits does."""
    import numpy as np

    import dblocks_fast as dbf

    d = dbf.data.load_digits("all")
    np.savez(path, images=d.images.numpy(), labels=d.labels.numpy())


def base_spec(out_dir: Path, args, **kw) -> dict:
    """A run's settings: args gives the device, --quick and the saved digits; kw overrides."""
    spec = dict(
        out_dir=str(out_dir),
        data=str(args.data),
        model=dict(hidden=16, num_layers=3),
        num_blocks=3,
        steps_per_block=20 if args.quick else 40,
        batch_size=3,
        warmup=5,
        log_every=4,
        ckpt_every=3,  # positions of the block order: a checkpoint every 3 steps
        seed=0,
        offload="none",
        device=args.device,
        world=1,
        resume=False,
    )
    return {**spec, **kw}


# --- one run, killed K times ----------------------------------------------------------------------------
def _left_fraction(run: Path, spec: dict) -> float:
    """The share of the run's steps still to take, from its manifest (1 without one)."""
    steps = manifest_steps(run)
    if not steps:
        return 1.0
    return max(0.05, 1 - sum(steps.values()) / (spec["steps_per_block"] * len(steps)))


def reference(spec: dict, logs: Path) -> dict:
    """Run `spec` once, never killed: its folder is what every killed run must end equal to; its times set
    the range of the kill moments."""
    c = crashkit.start(spec, logs / f"{Path(spec['out_dir']).name}.log")
    ready = c.wait_ready(600)
    startup = time.monotonic() - c.started
    done = c.wait_done(900)
    run = time.monotonic() - c.started - startup
    rc = c.finish(900)
    if rc != 0 or not (ready and done):
        raise RuntimeError(f"the uninterrupted run {spec['out_dir']} failed (exit {rc}):\n{c.error_tail()}")
    return {"startup_s": startup, "run_s": run, "exit_s": time.monotonic() - c.started - startup - run}


def crash_run(spec: dict, kills_wanted: int, rng: random.Random, timing: dict, logs: Path) -> dict:
    """Start `spec` again and again, SIGKILLing the first kills_wanted starts at random moments, until a
    start exits by itself; returns the kills (moment, delay) and how it ended."""
    run, kills, starts = Path(spec["out_dir"]), [], 0
    busy = "merge: reading, checking" if spec.get("merge") else "training steps"
    limit = 10 * (timing["startup_s"] + timing["run_s"]) + 60
    while True:
        resume = (run / "manifest.json").is_file()  # a merge ignores it: run again, it must finish
        before, left = listing(run), 1.0 if spec.get("merge") else _left_fraction(run, spec)
        c = crashkit.start({**spec, "resume": resume}, logs / f"start{starts}.log")
        starts += 1
        if len(kills) < kills_wanted:
            in_startup = rng.random() < START_UP
            if in_startup:
                delay = rng.uniform(0, timing["startup_s"])
                c.wait_ready(delay)
                time.sleep(max(0.0, c.started + delay - time.monotonic()))
            else:
                delay = rng.uniform(0, timing["run_s"] * left)
                c.wait_ready(limit)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(delay)
            if c.alive():
                c.kill()
                at = phase(run, before, c, busy)
                kills.append({"delay_s": round(delay, 4), "after_ready": not in_startup, "phase": at})
                continue
        rc = c.finish(limit)
        if rc is None:
            c.kill()
            return {"kills": kills, "starts": starts, "exit": "timed out", "error": c.error_tail()}
        if rc != 0:
            return {"kills": kills, "starts": starts, "exit": rc, "error": c.error_tail()}
        return {"kills": kills, "starts": starts, "exit": 0, "error": ""}


def scenario(name: str, runs: int, kills: int, args, work: Path, rng: random.Random, refs: dict) -> dict:
    """Train a reference, then `runs` runs killed `kills` times each; compare every one with the reference."""
    work = work / name
    work.mkdir(parents=True)
    logs = work / "logs"
    logs.mkdir()
    started = time.perf_counter()
    spec = _scenario_spec(name, args, work)
    row = {"scenario": name, "runs": runs, "kills_per_run": kills, "detail": []}
    if spec.get("merge"):  # the reference is one training of every block; the merge's own run times it
        ref = work / "reference"
        make_trainer({**spec, "out_dir": str(ref)}).fit()
        timing = reference({**spec, "out_dir": str(work / "merge-reference")}, logs)
        row["uninterrupted_merge_equals_reference"] = compare(work / "merge-reference", ref)[0] == "survived"
    else:
        ref = work / "reference"
        timing = reference({**spec, "out_dir": str(ref)}, logs)
    row["timing"] = timing
    if name != "resident" and "resident" in refs:  # every tier and world size trains the same bits
        row["reference_equals_resident"] = compare(ref, refs["resident"])[0] == "survived"
    refs[name] = ref
    for i in range(runs):
        run_spec = {**spec, "out_dir": str(work / f"run{i}")}
        run_logs = logs / f"run{i}"
        run_logs.mkdir()
        res = crash_run(run_spec, kills, rng, timing, run_logs)
        run = Path(run_spec["out_dir"])
        if res["exit"] == 0:
            res["outcome"], res["why"] = compare(run, ref)
        else:
            res["outcome"], res["why"] = "lost", f"exit {res['exit']}: {res['error'][-600:]}"
        res["metrics_differ"] = metrics_diff(run, ref) if res["exit"] == 0 else ""
        res["leftovers"] = leftovers(run) if res["exit"] == 0 else []
        row["detail"].append(res)
        print(f"{name} run {i}: {len(res['kills'])} kills, {res['outcome']} {res['why'][:200]}", flush=True)
    row["seconds"] = time.perf_counter() - started
    return _summarize(row)


def _scenario_spec(name: str, args, work: Path) -> dict:
    if name == "merge":
        return _merge_inputs(args, work)
    tier = {"host": "host", "disk": "disk"}.get(name, "none")
    return base_spec(work, args, offload=tier, world=2 if name == "torchrun" else 1)


def _merge_inputs(args, work: Path) -> dict:
    """Two runs that trained blocks 0-1 and block 2 (here, never killed: they are trainings like the other
    scenarios'); the merge's spec. The blocks are larger than the other scenarios' (about 2 MB a file), so
    that a merge spends its time copying."""
    wide = dict(model=dict(hidden=96, num_layers=3), steps_per_block=6, ckpt_every=0)
    inputs = []
    for part, blocks in (("a", [0, 1]), ("b", [2])):
        spec = base_spec(work / f"input-{part}", args, only_blocks=blocks, **wide)
        make_trainer(spec).fit()
        inputs.append(spec["out_dir"])
    return {**base_spec(work, args, **wide), "merge": inputs}


def _summarize(row: dict) -> dict:
    d = row["detail"]
    row["kills"] = sum(len(r["kills"]) for r in d)
    row["kills_survived"] = sum(len(r["kills"]) for r in d if r["outcome"] == "survived")
    for outcome in ("survived", "lost", "diverged"):
        row[outcome] = sum(r["outcome"] == outcome for r in d)
    row["metrics_differ"] = sum(bool(r["metrics_differ"]) for r in d)
    row["runs_with_leftovers"] = sum(bool(r["leftovers"]) for r in d)
    row["phases"] = dict(Counter(k["phase"] for r in d for k in r["kills"]))
    return row


# --- a full disk and a read-only run folder -----------------------------------------------------------------
def _mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a tmpfs of `size` at path; the reason it could not be, or None."""
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs"
    path.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    res = subprocess.run(cmd, capture_output=True)
    return None if res.returncode == 0 else f"mount failed: {res.stderr.decode(errors='replace').strip()}"


def _fill(folder: Path, leave: int) -> int:
    """Write a filler file until `leave` bytes are free (0: until the filesystem refuses); returns free."""
    with open(folder / f"filler-{uuid.uuid4().hex[:6]}", "wb") as f:
        with contextlib.suppress(OSError):
            while (free := shutil.disk_usage(folder).free) > leave:
                f.write(b"\0" * min(free - leave, 1 << 20))
                f.flush()
    return shutil.disk_usage(folder).free


def _checkpoint(run: Path) -> dict[str, bytes]:
    """The committed checkpoint: the manifest and the block files it names, with their bytes."""
    return {p: (run / p).read_bytes() for p in {"manifest.json", *named_files(run)}}


def _start_then_sigterm(spec: dict, logs: Path) -> tuple[int | None, dict]:
    """Train until the first checkpoint is committed, then SIGTERM (as a scheduler would); the exit code and
    the checkpoint it left."""
    run = Path(spec["out_dir"])
    c = crashkit.start(spec, logs / "first.log")
    deadline = time.monotonic() + 600
    while c.alive() and not (run / "manifest.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.005)
    with contextlib.suppress(ProcessLookupError):
        os.kill(c.proc.pid, signal.SIGTERM)
    rc = c.finish(600)
    return rc, _checkpoint(run) if (run / "manifest.json").is_file() else {}


SIGTERM_STEP = "SIGTERM after the first checkpoint: saved, exit 75"


class Checks:
    """The steps of a full-disk or read-only check: what was expected, whether it happened, what was seen."""

    def __init__(self, name: str):
        self.row = {"scenario": name, "steps": []}

    def step(self, what: str, ok: bool, seen: str) -> bool:
        self.row["steps"].append({"step": what, "ok": bool(ok), "seen": seen})
        print(f"{self.row['scenario']}: {what}: {'ok' if ok else 'FAILED'} ({seen[:200]})", flush=True)
        return ok

    def resume(self, spec: dict, logs: Path, what: str, expect: str, good: dict) -> bool:
        """Resume and expect a clear error (a CheckpointError, exit 2) whose message holds `expect`, with the
        checkpoint `good` left as it was."""
        c = crashkit.start({**spec, "resume": True}, logs / f"{len(self.row['steps'])}.log")
        rc = c.finish(600)
        err = c.error_tail().splitlines()
        msg = next((ln for ln in reversed(err) if ln.startswith("error")), err[-1] if err else "")
        run = Path(spec["out_dir"])
        same = _checkpoint(run) == good
        extra = [p for p in listing(run) if p.startswith("blocks/") and p not in good]
        ok = rc == 2 and expect in msg and same and not extra
        seen = f"exit {rc}: {msg}" + ("" if same else "; the checkpoint changed")
        seen += f"; left {extra}" if extra else ""
        return self.step(what, ok, seen)

    def finish(self, spec: dict, logs: Path, ref: Path, what: str) -> None:
        c = crashkit.start({**spec, "resume": True}, logs / "last.log")
        rc = c.finish(600)
        outcome, why = compare(Path(spec["out_dir"]), ref) if rc == 0 else ("lost", c.error_tail()[-300:])
        self.step(what, outcome == "survived", f"exit {rc}: {outcome} {why}".strip())
        self.row["outcome"] = outcome


def full_disk(args, work: Path, ref: Path) -> dict:
    """A run on a 24 MB tmpfs: a checkpoint refused for want of space, then a disk with no byte free, then
    space freed and the run resumed to the end."""
    checks, mnt, logs = Checks("full-disk"), work / "full-disk", work / "full-disk-logs"
    logs.mkdir(parents=True)
    why = _mount_tmpfs(mnt, "24m")
    if why:
        return {**checks.row, "skipped": why}
    try:
        spec = base_spec(mnt / "run", args)
        rc, good = _start_then_sigterm(spec, logs)
        if not checks.step(SIGTERM_STEP, rc == EXIT_PREEMPTED and bool(good), f"exit {rc}"):
            return checks.row
        free = _fill(mnt, 1 << 20)
        checks.resume(spec, logs, f"resume with {free / 2**20:.1f} MiB free: the checkpoint is refused",
                      "not enough disk space", good)  # fmt: skip
        free = _fill(mnt, 0)
        checks.resume(spec, logs, f"resume with {free} bytes free: a clear error", "space", good)
        for f in mnt.glob("filler-*"):
            f.unlink()
        checks.finish(spec, logs, ref, "space freed: resume finishes, equal to the uninterrupted run")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
    return checks.row


def read_only(args, work: Path, ref: Path) -> dict:
    """A run folder that cannot be written (a read-only mount as root, chmod a-w otherwise): resuming it is a
    clear error that changes nothing, loading and sampling it work, and once writable it resumes."""
    import dblocks_fast as dbf

    checks, folder, logs = Checks("read-only"), work / "read-only", work / "read-only-logs"
    logs.mkdir(parents=True)
    root = os.geteuid() == 0
    why = _mount_tmpfs(folder, "64m") if root else None
    if why:
        return {**checks.row, "skipped": f"root ignores chmod, and a read-only mount failed: {why}"}
    checks.row["how"] = "a read-only remount of a tmpfs" if root else "chmod -R a-w"
    try:
        spec = base_spec(folder / "run", args)
        run = Path(spec["out_dir"])
        rc, good = _start_then_sigterm(spec, logs)
        if not checks.step(SIGTERM_STEP, rc == EXIT_PREEMPTED and bool(good), f"exit {rc}"):
            return checks.row
        _writable(folder, run, False)
        checks.resume(spec, logs, "resume a read-only run folder: a clear error", "", good)
        try:
            with __import__("warnings").catch_warnings():
                __import__("warnings").simplefilter("ignore")  # "not finished": it was stopped on purpose
                images = dbf.sample(dbf.load(run), labels=torch.arange(2), num_steps=3)
            checks.step("load and sample the read-only run", images.shape[0] == 2, f"{tuple(images.shape)}")
        except Exception as e:  # noqa: BLE001 (any failure here is the finding)
            checks.step("load and sample the read-only run", False, f"{type(e).__name__}: {e}")
        _writable(folder, run, True)
        checks.finish(spec, logs, ref, "writable again: resume finishes, equal to the uninterrupted run")
    finally:
        _writable(folder, run, True)
        if root:
            subprocess.run(["umount", str(folder)], capture_output=True)
    return checks.row


def _writable(mount: Path, run: Path, yes: bool) -> None:
    if os.geteuid() == 0:
        subprocess.run(["mount", "-o", f"remount,{'rw' if yes else 'ro'}", str(mount)], check=True)
        return
    for p in [run, *run.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode | 0o200 if yes else mode & ~0o222)


# --- the record -------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    plan = QUICK_PLAN if args.quick else PLAN
    names = args.only or [*plan, *CHECKS]
    device = torch.device(args.device)
    torch.set_num_threads(1)  # as in every child, so the record's device line says so
    prov = common.provenance(device)
    crashkit.become_subreaper()
    rows, checks, refs = [], [], {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_crash-") as tmp:
        work = Path(tmp)
        args.data = work / "digits.npz"
        save_digits(args.data)
        # resident first: the other references are compared with it, and the checks must end equal to it
        for name in sorted((n for n in names if n in PLAN), key=lambda n: n != "resident"):
            runs, kills = plan.get(name) or (1, 3)
            runs, kills = args.runs or runs, args.kills if args.kills is not None else kills
            if name == "torchrun" and device.type == "cuda" and torch.cuda.device_count() < 2:
                rows.append({"scenario": name, "skipped": "needs 2 GPUs"})
                continue
            rows.append(scenario(name, runs, kills, args, work, random.Random(f"{args.seed}/{name}"), refs))
        if any(n in CHECKS for n in names) and "resident" not in refs:
            refs["resident"] = work / "resident-reference"
            make_trainer(base_spec(refs["resident"], args)).fit()
        for name, check in (("full-disk", full_disk), ("read-only", read_only)):
            if name in names:
                checks.append(check(args, work, refs["resident"]))
    record = {
        "quick": args.quick,
        "seed": args.seed,
        "seconds": time.perf_counter() - started,
        "settings": {
            "model": "DiT, hidden 16, 3 layers, patch 4 (merge: hidden 96), B = 3, batch 3, digits",
            "steps_per_block": base_spec(Path("."), args)["steps_per_block"],
            "ckpt_every": 3,
            "kill": f"SIGKILL to all the run's processes; {START_UP:.0%} aimed at start-up, the rest later",
            "plan": {n: plan.get(n) or (1, 3) for n in names if n in PLAN},
        },
        "rows": rows,
        "checks": checks,
    }
    record["totals"] = _totals(record)
    common.write("bench_crash", prov, record, _markdown(prov, record), args.out)
    _plot(record, prov, args.out)
    print(_markdown(prov, record))
    t = record["totals"]
    return 1 if t["lost"] or t["diverged"] or t["checks_failed"] else 0


def _totals(record: dict) -> dict:
    rows = [r for r in record["rows"] if "skipped" not in r]
    keys = ("runs", "kills", "kills_survived", "lost", "diverged", "metrics_differ", "runs_with_leftovers")
    out = {k: sum(r[k] for r in rows) for k in keys}
    out["checks_failed"] = sum(not s["ok"] for c in record["checks"] for s in c["steps"])
    return out


def table(record: dict) -> list[str]:
    """The results as markdown tables (also used by the results page)."""
    t = record["totals"]
    lines = [
        f"**{t['kills']} kills, {t['kills_survived']} survived; {t['lost']} runs lost, {t['diverged']} "
        f"diverged** (of {t['runs']} runs; seed {record['seed']}).",
        "",
        "| scenario | runs | kills | kills survived | runs lost | runs diverged | metric lines differ "
        "| runs leaving files | kills by moment |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['scenario']} | skipped: {r['skipped']} | | | | | | | |")
            continue
        moments = ", ".join(f"{p} {r['phases'][p]}" for p in PHASES if r["phases"].get(p))
        lines.append(
            f"| {r['scenario']} | {r['runs']} | {r['kills']} | {r['kills_survived']} | {r['lost']} | "
            f"{r['diverged']} | {r['metrics_differ']} | {r['runs_with_leftovers']} | {moments} |"
        )
    lines += ["", "| check | step | ok | what happened |", "|---|---|---|---|"]
    for c in record["checks"]:
        if "skipped" in c:
            lines.append(f"| {c['scenario']} | skipped | | {c['skipped']} |")
        for s in c["steps"]:
            seen = s["seen"].replace("|", "/").replace("\n", " ")[:300]
            lines.append(f"| {c['scenario']} | {s['step']} | {'yes' if s['ok'] else '**no**'} | {seen} |")
    return lines + [
        "",
        "A run is killed K times (SIGKILL to all its processes) and then resumed to the end; survived: every "
        "block's weights and AdamW moments equal those of the same run never killed, bit for bit. The moment "
        "of a kill is named from what it left: a temporary block file (block file write), a temporary "
        "manifest, block files the manifest does not name yet, a temporary paged file (paging write).",
    ]


def _markdown(prov: dict, record: dict) -> str:
    title = "Crash test: SIGKILL at random moments, resume, compare with a run never killed"
    problems = []
    for r in record["rows"]:
        for i, d in enumerate(r.get("detail", [])):
            if d["outcome"] != "survived" or d["metrics_differ"] or d["leftovers"]:
                what = d["why"] or (f"metric lines: {d['metrics_differ']}" if d["metrics_differ"] else "")
                left = f" left {', '.join(d['leftovers'][:4])}" if d["leftovers"] else ""
                problems.append(f"- {r['scenario']} run {i}: {d['outcome']}; {what}{left}")
    lines = common.header(title, prov, record["quick"]) + table(record)
    lines += ["", f"Took {record['seconds'] / 60:.1f} minutes."]
    if problems:
        lines += ["", "Runs with something to report:", *problems]
    return "\n".join(lines) + "\n"


def _plot(record: dict, prov: dict, out: Path) -> None:
    rows = [r for r in record["rows"] if "skipped" not in r]
    fig, ax = common.figure(6, 0.5 + 0.45 * max(1, len(rows)))
    left = [0] * len(rows)
    for p in PHASES:
        counts = [r["phases"].get(p, 0) for r in rows]
        if any(counts):
            ax.barh([r["scenario"] for r in rows], counts, left=left, label=p)
            left = [a + b for a, b in zip(left, counts)]
    ax.set_xlabel("kills (all survived)" if record["totals"]["kills"] == record["totals"]["kills_survived"]
                  else "kills")  # fmt: skip
    ax.invert_yaxis()
    ax.legend(fontsize=6, loc="lower right")
    common.save_figure(fig, "bench_crash", prov, out)


if __name__ == "__main__":
    sys.exit(main())
