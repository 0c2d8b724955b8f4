"""The GPU tests and benchmarks in one call of about nine minutes: a short lease on a GPU machine.

A session lent a GPU (an H100 or H200 through the `device` tool) has 15 minutes of device time in all,
machine starts included, at most 10 minutes a call, and every call may land on a bare machine. This driver
runs named stages in order, each under its own time limit and all under one budget, so a call always ends
in time and brings back what it made, even when a stage hangs or fails:

    # here, to print the command for the device machine (it bakes in the commit, which has no .git there):
    python benchmarks/gpu_session.py --print-command --call 1
    # there (that command, with timeout_s 600), then here again with the files that came back:
    python benchmarks/gpu_session.py --unpack FILES_AT

The plan (PLAN; tests/test_benchmarks.py holds that each call's stage limits add up to its budget, and the
calls with a machine start fit the 15 minutes):
    call 1, --budget 540, the evidence that matters most, first:
        build      _C for sm_90 only, the package installed
        tests      pytest -m gpu (not the sanitizer runs): do the kernels compute the right thing on a GPU?
        triton     pytest -m kernel: the Triton kernels against float64, compiled for the GPU at last (the
                   CPU runs the same tests under Triton's interpreter)
        kernels    bench_kernels.py: the kernel table, each row timed under CUDA graphs and eager
        step       bench_block_step.py: a DiT-XL/2 block's training step, ours vs eager vs torch.compile
        memory     bench_memory.py --blocks 8 4 --offload none: peak memory, end to end vs B = 8 and 4
        sanitizer  compute-sanitizer memcheck over the CUDA ops (racecheck: a stage of its own, for later)
        (bench_peers, the diffusers LoRA memory: stages `peers`, `peers-capacity`, `diffusers`, each a call of
        its own in a later lease; the 15 minutes of one lease go to the plan)
    call 2, optional, --budget 180, only if the machine is still warm from call 1 (it stays 30 s: call at
    once) or 4 minutes of device time are left: build (reuses _C), paging, capacity.
Every stage writes its results as it goes (the benchmarks rewrite their record after each row, pytest logs
each test as it finishes), so a stage stopped at its limit keeps what it measured. A stage that ends early
hands its unused seconds to the next ones. Between calls: `--unpack` the files, then `--print-command` the
next.

Stages:
    build      `pip install --no-deps --no-build-isolation -e .` with DBLOCKS_CUDA_ARCHS=90-real; builds _C
               unless .gpubuild/ holds one built from the same csrc/ (carried with `carry: [".gpubuild"]`);
               with .wheels/ carried (`python benchmarks/gpu_wheels.py` makes it, 37 MiB), installs the
               diffusers extra from it (the machine has no package index), so its tests run too
    tests      pytest -m gpu, all but the compute-sanitizer runs, one line per test; JUnit XML in the archive
    triton     pytest -m "kernel and not gpu": tests/test_kernel_*.py and test_custom_op.py on the GPU
    sanitizer  compute-sanitizer memcheck of the CUDA ops (tests/test_cuda_ops.py); racecheck: `racecheck`
    kernels, paging, memory, capacity, inference: the benchmark scripts of the same names, on CUDA
    diffusers  bench_memory_diffusers.py: a LoRA step of a Flux.1-size transformer, end to end vs block-wise,
               under 12/16/24 GB caps (needs .wheels; not in the plan: a call of its own)

On the device machine everything goes to $OUT (or --out): summary.json, session.tgz (every stage's log and
the results files the stages wrote, for benchmarks/results/), and the built _C module with the hash of the
sources it was built from. The last lines printed are a table of the stages: status, seconds, log tail.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GPUBUILD = ROOT / ".gpubuild"  # git-ignored: the carried _C module and the hash of its sources
PKG = ROOT / "dblocks_fast"  # where the editable install's _C module lives
RESERVE = 20  # seconds kept back from the budget to pack and report
MIN_STAGE = 30  # a stage with less time left than this is not started
PY = sys.executable

DEVICE_BUDGET = 900  # seconds of device time a session is lent, machine starts included
MACHINE_START = 150  # seconds a call that finds no warm machine spends before the command runs (and after)
PYTEST = [PY, "-m", "pytest", "-m", "gpu", "-v", "-rfE", "-p", "no:cacheprovider"]
# the Triton kernels against float64 (the tests the CPU runs under the interpreter), compiled for the GPU
TRITON = [PY, "-m", "pytest", "-m", "kernel and not gpu", "-v", "-rfE", "-p", "no:cacheprovider"]
# name: (time limit in seconds, command). "{left}" is replaced by the seconds left to the stage.
STAGES: dict[str, tuple[int, list[str]]] = {
    "build": (110, []),  # done in-process: see build()
    "tests": (100, [*PYTEST, "-k", "not compute_sanitizer", "--junitxml={log}.xml"]),
    "triton": (80, [*TRITON, "--junitxml={log}.xml"]),
    "kernels": (120, [PY, "benchmarks/bench_kernels.py"]),  # CUDA graphs and eager, row by row
    "step": (60, [PY, "benchmarks/bench_block_step.py"]),  # a DiT-XL/2 block's training step
    "memory": (
        60,
        [PY, "benchmarks/bench_memory.py", "--device", "cuda", "--blocks", "8", "4", "--offload", "none"],
    ),
    "sanitizer": (40, [*PYTEST, "-k", "compute_sanitizer and memcheck"]),
    "racecheck": (60, [*PYTEST, "-k", "compute_sanitizer and racecheck"]),
    "paging": (60, [PY, "benchmarks/bench_paging.py"]),
    "capacity": (80, [PY, "benchmarks/bench_capacity.py", "--budget", "{left}"]),
    "inference": (120, [PY, "benchmarks/bench_inference.py", "--device", "cuda"]),
    "diffusers": (420, [PY, "benchmarks/bench_memory_diffusers.py", "--device", "cuda"]),
}
WHEELS = ROOT / ".wheels"  # git-ignored: benchmarks/gpu_wheels.py's wheels of the optional extras
EXTRAS = ["diffusers>=0.30", "peft>=0.12", "accelerate>=0.26"]


@dataclass(frozen=True)
class Call:
    budget: int  # --budget: the stages' limits and RESERVE add up to it
    stages: tuple[tuple[str, int], ...]  # (stage, its limit in seconds in this call)
    needs_start: (
        bool  # a fresh machine (MACHINE_START more seconds) rather than the warm one of the last call
    )
    note: str

    @property
    def limits(self) -> dict[str, int]:
        return dict(self.stages)


PLAN = [
    Call(
        540,
        (
            ("build", 110),
            ("tests", 100),
            ("triton", 80),
            ("kernels", 100),
            ("step", 50),
            ("memory", 50),
            ("sanitizer", 30),
        ),
        True,
        "the evidence that matters most, first",
    ),
    Call(
        180,
        (("build", 30), ("paging", 60), ("capacity", 70)),  # build: pip only, _C is still there
        False,
        "optional: at once while call 1's machine is warm (30 s), else only with 4 minutes of device time",
    ),
]

# --- issue 23: bench_peers (checkpointing, torchao's CPU-offloaded AdamW, block swapping vs DiffusionBlocks);
# kept apart from the plan above. One call: `python benchmarks/gpu_session.py --print-command build peers`;
# the per-method capacity under 12/16/24 GB is a second call's `build peers-capacity`.
STAGES["peers"] = (420, [PY, "benchmarks/bench_peers.py", "--device", "cuda"])
STAGES["peers-capacity"] = (540, [PY, "benchmarks/bench_peers.py", "--capacity", "--budget", "{left}"])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stages", nargs="*", help=f"stages to run, in order: {', '.join(STAGES)}")
    ap.add_argument("--budget", type=float, default=500, help="seconds for all the stages of this call")
    ap.add_argument(
        "--call",
        type=int,
        choices=range(1, len(PLAN) + 1),
        help="run call N of PLAN: its stages, limits, budget",
    )
    ap.add_argument("--out", type=Path, help="where the files to bring back go (default: $OUT)")
    ap.add_argument("--print-command", action="store_true", help="print the command for the device and stop")
    ap.add_argument("--unpack", type=Path, metavar="FILES_AT", help="take in the files a call brought back")
    args = ap.parse_args(argv)
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}: choose from {list(STAGES)}")
    if args.call and args.stages:
        ap.error("--call N runs the plan's stages: name no stages with it")
    if args.call:
        call = PLAN[args.call - 1]
        args.stages, args.budget, args.limits = [s for s, _ in call.stages], call.budget, call.limits
    else:
        args.limits = None
    if not args.unpack and not args.stages:
        ap.error("name the stages to run, or --call N (or --unpack FILES_AT)")
    return args


def sources_hash() -> str:
    """The hash of everything the _C module is built from."""
    h = hashlib.sha256()
    files = [ROOT / "CMakeLists.txt", ROOT / "setup.py", *sorted((ROOT / "csrc").rglob("*"))]
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def commit() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return ""
    if rev.returncode != 0:
        return ""
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def command_for(stages: list[str], budget: float, call: int | None = None) -> str:
    """The command line for the device tool's `run`, with this checkout's commit baked in."""
    rev = commit() or "unknown"
    what = f"--call {call}" if call else f"{' '.join(stages)} --budget {budget:.0f}"
    return f"DBLOCKS_COMMIT={rev} PYTHONUNBUFFERED=1 python3 benchmarks/gpu_session.py {what}"


def _run(cmd: list[str], log: Path, limit: float, env: dict) -> tuple[str, int | None]:
    """Run cmd with its output to log, killed with its whole process group after `limit` seconds."""
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(cmd)}\n".encode())
        f.flush()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=max(1.0, limit))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            f.write(f"\n[gpu_session] killed after {limit:.0f} s\n".encode())
            return "timed out", None
    return ("ok" if rc == 0 else "failed"), rc


def build(log: Path, limit: float, env: dict) -> tuple[str, int | None]:
    """Install the package; build _C, or reuse the carried one when it was built from these sources."""
    digest = sources_hash()
    carried = sorted(GPUBUILD.glob("_C*.so"))
    reuse = bool(carried) and (GPUBUILD / "csrc.sha256").is_file()
    reuse = reuse and (GPUBUILD / "csrc.sha256").read_text().strip() == digest
    pkg = PKG
    if reuse:
        for old in pkg.glob("_C*.so"):
            old.unlink()
        shutil.copy2(carried[0], pkg / carried[0].name)
        env = {**env, "DBLOCKS_BUILD_CUDA": "0"}
        with open(log, "a") as f:
            f.write(f"reusing the carried {carried[0].name} (sources {digest[:12]})\n")
    else:
        # Hopper only: a third of the build time of the default three targets (the box is an H100/H200)
        env = {
            **env,
            "DBLOCKS_BUILD_CUDA": "1",
            "DBLOCKS_CUDA_ARCHS": env.get("DBLOCKS_CUDA_ARCHS", "90-real"),
        }
    t0 = time.monotonic()
    cmd = [PY, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-e", "."]
    status, rc = _run(cmd, log, limit, env)
    if status != "ok":
        return status, rc
    left = limit - (time.monotonic() - t0)
    check = [
        PY,
        "-c",
        "import dblocks_fast._C as C, torch; print('_C:', C.__file__, '| torch', torch.__version__)",
    ]
    status, rc = _run(check, log, left, env)
    if status == "ok" and any(WHEELS.glob("*.whl")):  # best effort: the diffusers tests skip without them
        cmd = [PY, "-m", "pip", "install", "--no-index", "--find-links", str(WHEELS), *EXTRAS]
        _run(cmd, log, max(1.0, limit - (time.monotonic() - t0)), env)
    if status == "ok" and not reuse:
        GPUBUILD.mkdir(exist_ok=True)
        for old in GPUBUILD.glob("_C*.so"):
            old.unlink()
        built = sorted(pkg.glob("_C*.so"))
        if built:
            shutil.copy2(built[0], GPUBUILD / built[0].name)
            (GPUBUILD / "csrc.sha256").write_text(digest + "\n")
    return status, rc


def _fill(arg: str, fill: dict[str, str]) -> str:
    for key, value in fill.items():
        arg = arg.replace(key, value)
    return arg


def environment(log: Path, env: dict) -> None:
    versions = (
        "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', "
        "triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    )
    query = "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm"
    cmds = [["nvidia-smi", query, "--format=csv"], [PY, "-c", versions], ["nvcc", "--version"]]
    for cmd in cmds:
        if shutil.which(cmd[0]) or cmd[0] == PY:
            _run(cmd, log, 60, env)


def pack(out: Path, logs: Path, started: float) -> Path:
    """session.tgz: every log, and the results files written since `started`."""
    tgz = out / "session.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for f in sorted(logs.iterdir()):
            tar.add(f, arcname=f"logs/{f.name}")
        if RESULTS.is_dir():
            for f in sorted(RESULTS.iterdir()):
                if f.is_file() and f.stat().st_mtime >= started:
                    tar.add(f, arcname=f"results/{f.name}")
    return tgz


def run_session(stages: list[str], budget: float, out: Path, limits: dict | None = None) -> list[dict]:
    """Run the stages in order under `budget` seconds; a stage's limit is limits[name] (else STAGES'), plus
    what the stages before it left unused."""
    started = time.time()
    deadline = time.monotonic() + budget - RESERVE
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs.tmp"
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    environment(logs / "environment.log", env)
    rows = []
    banked = 0.0  # seconds the stages so far did not use
    for name in stages:
        limit, template = STAGES[name]
        limit = (limits or {}).get(name, limit)
        left = deadline - time.monotonic()
        log = logs / f"{name}.log"
        if left < MIN_STAGE:
            rows.append({"stage": name, "status": "not run: no time left", "seconds": 0.0})
            continue
        own = limit
        limit = min(limit + banked, left)
        t0 = time.monotonic()
        print(f"[gpu_session] {name}: up to {limit:.0f} s", flush=True)
        if name == "build":
            status, rc = build(log, limit, env)
        else:
            fill = {"{left}": str(int(limit - 15)), "{log}": str(log.with_suffix(""))}
            cmd = [_fill(a, fill) for a in template]
            status, rc = _run(cmd, log, limit, env)
        spent = time.monotonic() - t0
        banked = max(0.0, banked + own - spent)
        rows.append({"stage": name, "status": status, "rc": rc, "seconds": round(spent, 1)})
        if name == "build" and status != "ok":
            rows += [
                {"stage": s, "status": "not run: build failed", "seconds": 0.0} for s in stages[len(rows) :]
            ]
            break
    for row in rows:
        log = logs / f"{row['stage']}.log"
        row["tail"] = log.read_text(errors="replace").strip().splitlines()[-3:] if log.is_file() else []
    summary = {
        "commit": os.environ.get("DBLOCKS_COMMIT", commit() or "unknown"),
        "budget_s": budget,
        "stages": rows,
    }
    (logs / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    shutil.copy2(logs / "summary.json", out / "summary.json")
    pack(out, logs, started)
    for f in [*GPUBUILD.glob("_C*.so"), *GPUBUILD.glob("csrc.sha256")]:
        shutil.copy2(f, out / f.name)
    shutil.rmtree(logs)
    return rows


def unpack(files_at: Path) -> list[str]:
    """Take in what a call brought back: results into benchmarks/results/, the _C module into .gpubuild/."""
    files_at = Path(files_at)
    tgz = next(files_at.rglob("session.tgz"), None)
    if tgz is None:
        raise SystemExit(f"{files_at}: no session.tgz in it; did the call reach its end?")
    taken = []
    with tarfile.open(tgz) as tar:
        for m in tar.getmembers():
            if m.isfile() and m.name.startswith("results/") and "/" not in m.name[len("results/") :]:
                target = RESULTS / Path(m.name).name
                target.write_bytes(tar.extractfile(m).read())
                taken.append(str(target))
            elif m.isfile() and m.name.startswith("logs/"):
                target = GPUBUILD / "logs" / Path(m.name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(m).read())
    for f in [*files_at.rglob("_C*.so"), *files_at.rglob("csrc.sha256")]:
        GPUBUILD.mkdir(exist_ok=True)
        shutil.copyfile(f, GPUBUILD / f.name)
        taken.append(str(GPUBUILD / f.name))
    return taken


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.unpack:
        for f in unpack(args.unpack):
            print(f)
        print(f"logs in {GPUBUILD / 'logs'}; carry '.gpubuild' in the next call to reuse the built _C")
        return
    if args.print_command:
        print(command_for(args.stages, args.budget, args.call))
        return
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is None:
        raise SystemExit("no --out and no $OUT: where should the files go?")
    rows = run_session(args.stages, args.budget, out, args.limits)
    print("\n| stage | status | seconds | last line of its log |\n|---|---|---|---|")
    for r in rows:
        last = (r["tail"][-1] if r["tail"] else "")[:120].replace("|", "/")
        print(f"| {r['stage']} | {r['status']} | {r['seconds']:.0f} | {last} |")
    if any(r["status"] != "ok" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
