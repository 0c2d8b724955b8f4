"""The crash harness's tools (benchmarks/bench_crash.py): a run started as a child process and killed with
all its processes; what a kill left in a run folder; how a finished run compares with one never killed."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().with_name("bench_crash.py")  # its --child mode runs one training or merge
TAG = "DBLOCKS_CRASH_TAG"  # in the environment of every process a run starts, torchrun's workers too

# kill moments, in the order a kill's leftovers decide them (the first that applies)
PHASES = (
    "start-up",
    "block file write",
    "manifest write",
    "block files written, manifest not yet",
    "manifest written, old files not yet deleted",
    "paging write",
    "other file write",
    "training steps",
    "merge: reading, checking",
    "exit (work finished)",
)


# --- starting, watching and killing children ----------------------------------------------------------------
def start(spec: dict, log: Path) -> Child:
    """Start the run `spec` (bench_crash.py --child), under torchrun when spec["world"] > 1."""
    cmd = [sys.executable, str(SCRIPT), "--child", json.dumps(spec)]
    if spec.get("world", 1) > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={spec['world']}"]
    return Child(cmd, log, spec.get("world", 1))


class Child:
    """A started command: its processes share an environment tag; each process of the run prints "ready" when
    set up and "done" when its work is finished (before the interpreter's exit); stderr goes to a log."""

    def __init__(self, cmd: list[str], log: Path, world: int = 1):
        self.tag, self.log, self.world = uuid.uuid4().hex, log, world
        env = {**os.environ, TAG: self.tag, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=err, start_new_session=True
            )
        self.started = time.monotonic()
        self._out = b""

    @property
    def ready(self) -> bool:
        """A process of the run has set up (imports, the Trainer, the checkpoint read) and starts working."""
        return b"ready" in self._out

    @property
    def done(self) -> bool:
        """Every process of the run has finished its work (what follows is the interpreter's exit)."""
        return self._out.count(b"done") >= self.world

    def wait_ready(self, timeout: float) -> bool:
        return self._read_until(lambda: self.ready, timeout)

    def wait_done(self, timeout: float) -> bool:
        return self._read_until(lambda: self.done, timeout)

    def _read_until(self, cond, timeout: float) -> bool:
        """Read stdout until cond() holds, the timeout passes or the output ends."""
        deadline = time.monotonic() + timeout
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                break
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                break
            self._out += chunk
        return cond()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL every process of the run (workers first: they write the files), then reap them."""
        for _ in range(200):
            pids = _tagged(self.tag)
            if not pids:
                break
            for pid in sorted(pids, key=lambda p: p == self.proc.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.002)
        self.finish(None)
        _reap()

    def finish(self, timeout: float | None) -> int | None:
        """Wait for the exit (None: timed out); drains stdout so "ready" and "done" are known."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.wait_done(0.5)
        self.proc.stdout.close()
        return rc

    def error_tail(self) -> str:
        return self.log.read_text(errors="replace")[-1500:].strip()


def _tagged(tag: str) -> list[int]:
    """The live processes whose environment holds TAG=tag (zombies have none)."""
    want, found = f"{TAG}={tag}".encode(), []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if want in f.read().split(b"\0"):
                        found.append(int(d))
            except OSError:
                continue
    return found


def _reap() -> None:
    """Collect orphaned workers that became ours (we are their subreaper); no other child is running."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def become_subreaper() -> None:
    """Orphans of a killed torchrun agent are reparented to us, so they can be reaped (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


# --- what a kill left, and how a run ended ---------------------------------------------------------------
def listing(run: Path) -> set[str]:
    """Every file under the run folder, relative, hidden ones too."""
    if not run.is_dir():
        return set()
    return {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}


def _manifest(run: Path) -> dict:
    """The run's manifest as it is on disk ({} if there is none or it does not parse)."""
    try:
        return json.loads((run / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def named_files(run: Path) -> set[str]:
    """The block files the run's manifest names."""
    return {e["file"] for e in _manifest(run).get("blocks", []) if e.get("file")}


def manifest_steps(run: Path) -> dict[int, int]:
    return {b: e["steps"] for b, e in enumerate(_manifest(run).get("blocks", []))}


def _block_step(rel: str) -> tuple[int, int]:
    """(block, steps) from a block file's name, blocks/block{b:03d}-step{steps:09d}.safetensors."""
    b, steps = rel.rsplit("/", 1)[-1].removeprefix("block").split(".")[0].split("-step")
    return int(b), int(steps)


def phase(run: Path, before: set[str], child: Child, busy: str = "training steps") -> str:
    """Name the moment of a kill from what the child had printed and the files the kill left that were not
    there when the child started."""
    if not child.ready:
        return "start-up"
    if child.done:
        return "exit (work finished)"
    now = listing(run)
    new = now - before
    tmp = [p for p in new if p.rsplit("/", 1)[-1].startswith(".") and p.endswith(".tmp")]
    steps, named = manifest_steps(run), named_files(run)
    unnamed = [_block_step(p) for p in now if p.startswith("blocks/block") and p not in named]
    if any(p.startswith("blocks/") for p in tmp):
        return "block file write"
    if any(p.startswith(".manifest.json.") for p in tmp):
        return "manifest write"
    if any(s > steps.get(b, 0) for b, s in unnamed):
        return "block files written, manifest not yet"
    if unnamed:
        return "manifest written, old files not yet deleted"
    if any(p.startswith("paged/") for p in tmp):
        return "paging write"
    if tmp:
        return "other file write"
    return busy


def leftovers(run: Path) -> list[str]:
    """Files a finished run folder should not hold: temporary files, paged files, block files not named."""
    named = named_files(run)
    keep = {"manifest.json", "config.json", "cli.json", "metrics.jsonl", "eval.json", ".lock"}
    return sorted(p for p in listing(run) if p not in keep and p not in named)


# A metric line's loss and gradient norm average the steps since the block's previous line; after a resume
# the first line averages only the steps since the checkpoint (the window's sums are not saved), so those two
# are left out; the step, learning rate and noise interval must match, and every line be there once.
NOT_COMPARED = ("step_ms", "rank", "peak_mem_bytes", "loss", "grad_norm")


def metric_lines(run: Path) -> list[dict]:
    """The metric lines without what depends on the clock, the rank or the resumes, in (block, step) order."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            rec = {"unreadable line": ln}
        lines.append({k: v for k, v in rec.items() if k not in NOT_COMPARED})
    return sorted(lines, key=lambda r: (r.get("block", -1), r.get("step", -1)))


def metrics_diff(run: Path, ref: Path) -> str:
    """How the run's metric lines differ from the reference's ("" if they do not)."""
    got, want = metric_lines(run), metric_lines(ref)
    if got == want:
        return ""
    key = lambda r: (r.get("block"), r.get("step"))  # noqa: E731
    dup = [key(r) for r, nxt in zip(got, got[1:]) if key(r) == key(nxt)]
    missing = sorted({key(r) for r in want} - {key(r) for r in got})
    extra = sorted({key(r) for r in got} - {key(r) for r in want})
    values = [key(r) for r in got if key(r) in {key(w) for w in want} and r not in want]
    parts = [f"{len(got)} lines, the uninterrupted run {len(want)}"]
    for what, keys in (("twice", dup), ("missing", missing), ("extra", extra), ("other values", values)):
        if keys:
            parts.append(f"{what}: (block, step) {keys[:4]}")
    return "; ".join(parts)


def compare(run: Path, ref: Path) -> tuple[str, str]:
    """("survived" | "lost" | "diverged", what differs): run's blocks against ref's, bit for bit."""
    from dblocks_fast.checkpoint import CheckpointError, read_block, read_manifest

    try:
        got_m, want_m = read_manifest(run), read_manifest(ref)
        if not got_m.get("complete"):
            return "lost", f"unfinished: block steps {[e['steps'] for e in got_m['blocks']]}"
        for b in range(len(want_m["blocks"])):
            got, want = read_block(run, got_m, b), read_block(ref, want_m, b)
            steps = got_m["blocks"][b]["steps"], want_m["blocks"][b]["steps"]
            if steps[0] != steps[1]:
                return "diverged", f"block {b}: {steps[0]} steps, the uninterrupted run {steps[1]}"
            if set(got) != set(want):
                return "diverged", f"block {b}: tensors {sorted(set(got) ^ set(want))[:3]} in one run only"
            for k in sorted(want):
                a, w = got[k], want[k]
                if a.dtype != w.dtype or a.shape != w.shape or a.numpy().tobytes() != w.numpy().tobytes():
                    diff = (a.double() - w.double()).abs().max().item() if a.shape == w.shape else "shape"
                    return "diverged", f"block {b}, {k}: max |difference| {diff}"
    except (CheckpointError, OSError, ValueError, KeyError) as e:
        return "lost", f"{type(e).__name__}: {e}"
    return "survived", ""
