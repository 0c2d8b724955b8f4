"""Planted faults: each is a one-line change to a real csrc/ kernel, built in its own emulated variant,
and a short probe that runs the changed op; the stage passes only if the emulator catches every fault with
the message expected, and the same probe passes on the unchanged source (so that it is the fault that is
caught)."""

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

from tests.cpu_emu import emu


@dataclass
class Fault:
    name: str
    file: str  # under csrc/
    old: str  # replaced once; must occur in the file
    new: str
    variant: str  # a key of emu.VARIANTS: the build that must catch it
    probe: str  # Python run with `lib` loaded; exits 0 when the op gave the right result
    expect: str  # regex the failing probe's output must match
    quick: bool = True  # also in --quick


PRELUDE = """
import ctypes, math, random, sys
from tests.cpu_emu import emu
lib = emu.load(sys.argv[1], partial=True)
def arr(values):  # float32 buffers without torch: a probe starts in a fraction of a second
    return (ctypes.c_float * len(values))(*values)
P = ctypes.addressof
def loss(N, M, schedule=0):
    lib.dblocks_emu_set_schedule(schedule, 1)
    rng = random.Random(0)
    z, f, y = (arr([rng.gauss(0, 1) for _ in range(N * M)]) for _ in range(3))
    sigma = arr([rng.random() + 0.5 for _ in range(N)])
    per, out, r = arr([0.0] * N), arr([0.0]), arr([0.0] * (N * M))
    ws = arr([0.0] * lib.dblocks_edm_l2_loss_workspace(N, M))
    rc = lib.dblocks_edm_l2_loss_forward(P(z), P(f), P(y), P(sigma), P(per), P(out), P(r), P(ws), N, M, 0.5,
                                         0, None)
    assert rc == 0
    return list(out)
def adaln_backward(N, T, D, schedule=0):
    lib.dblocks_emu_set_schedule(schedule, 1)
    rng = random.Random(0)
    x, y, dh = ([rng.gauss(0, 1) for _ in range(N * T * D)] for _ in range(3))
    rows = [x[i * D:(i + 1) * D] for i in range(N * T)]
    mean = [sum(row) / D for row in rows]
    rstd = [1 / math.sqrt(sum((v - m) ** 2 for v in row) / D + 1e-6) for row, m in zip(rows, mean)]
    x, y, dh, mean, rstd = map(arr, (x, y, dh, mean, rstd))
    gate, scale = (arr([rng.gauss(0, 1) for _ in range(N * D)]) for _ in range(2))
    dx, dy = arr([0.0] * (N * T * D)), arr([0.0] * (N * T * D))
    ds, dc, dg = (arr([0.0] * (N * D)) for _ in range(3))
    ws = arr([0.0] * lib.dblocks_adaln_backward_workspace(N, T, D, 1))
    rc = lib.dblocks_adaln_backward(P(dh), None, P(x), P(y), P(gate), P(scale), P(mean), P(rstd), P(dx),
                                    P(dy), P(ds), P(dc), P(dg), P(ws), N, T, D, D, 0, 0, None)
    assert rc == 0, lib.dblocks_last_cuda_error()
    return list(dx), list(ds)
"""

SCHEDULES_AGREE = """
outs = [loss(3, 300, s) for s in (0, 1, 2)]
assert all(math.isfinite(v) for v in outs[0]), f"loss is {outs[0]}"
assert all(o == outs[0] for o in outs), f"schedules disagree: {outs}"
"""

SHUFFLE_LOOP = "        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);\n"
FAULTS = [
    # A missing barrier: warp 0 reads the other warps' sums before they are written. The race check names it;
    # without it, the forward schedule reads the NaN-filled shared memory while the reverse one gets it right.
    Fault(
        "missing_barrier_race",
        "edm_loss.cu",
        "    if (lane == 0) shared[warp] = v;\n    __syncthreads();\n",
        "    if (lane == 0) shared[warp] = v;\n",
        "race",
        "loss(3, 300)",
        r"data race",
    ),
    Fault(
        "missing_barrier_schedules",
        "edm_loss.cu",
        "    if (lane == 0) shared[warp] = v;\n    __syncthreads();\n",
        "    if (lane == 0) shared[warp] = v;\n",
        "plain",
        SCHEDULES_AGREE,
        r"loss is \[nan\]|schedules disagree",
    ),
    # A static shared array one element short: ASan (one allocation per array) or UBSan's bounds check.
    Fault(
        "shared_array_one_short",
        "edm_loss.cu",
        "    DBLOCKS_SHARED(float, shared, [kWarps]);\n    const int64_t begin",
        "    DBLOCKS_SHARED(float, shared, [kWarps - 1]);\n    const int64_t begin",
        "asan",
        "loss(3, 300)",
        r"heap-buffer-overflow|out of bounds",
    ),
    # A workspace one element short (the size function the caller allocates by): ASan sees the global write.
    Fault(
        "workspace_one_short",
        "edm_loss.cu",
        "return N >= 1 && M >= 1 ? N * num_chunks(M) : 0;",
        "return N >= 1 && M >= 1 ? N * num_chunks(M) - 1 : 0;",
        "asan",
        "loss(40, 300)",  # a workspace over 16 bytes: ctypes keeps smaller buffers inside the object
        r"heap-buffer-overflow",
    ),
    # A barrier that one thread never reaches (it returned early).
    Fault(
        "barrier_some_threads",
        "edm_loss.cu",
        "    __syncthreads();  // per_sample is written",
        "    if (threadIdx.x == kThreads - 1) return;\n    __syncthreads();  // per_sample is written",
        "plain",
        "loss(3, 300)",
        r"__syncthreads\(\) at \S*edm_loss\.cu:\d+.*only some threads reach",
    ),
    # A shuffle that names a lane which has exited.
    Fault(
        "shuffle_exited_lane",
        "edm_loss.cu",
        SHUFFLE_LOOP,
        "        if (lane == 31) return;\n" + SHUFFLE_LOOP,
        "plain",
        "loss(3, 300)",
        r"(names lane 31, which has exited|exited while its warp waits).*edm_loss\.cu:\d+",
    ),
    # The dynamic shared memory of the AdaLN backward one float short.
    Fault(
        "dynamic_smem_one_short",
        "adaln.cu",
        "    const int64_t smem_bytes = warps * warp_bytes;",
        "    const int64_t smem_bytes = warps * warp_bytes - 4;",
        "asan",
        "adaln_backward(2, 9, 40)",
        r"heap-buffer-overflow",
        quick=False,
    ),
    # More than 48 KiB of dynamic shared memory without the opt-in: the launch fails, as on an H100.
    Fault(
        "no_smem_optin",
        "adaln.cu",
        "    if (smem_bytes > kSmemDefaultBytes) {",
        "    if (false) {",
        "plain",
        "adaln_backward(1, 2, 4104)",
        r"cudaErrorInvalidValue",
        quick=False,
    ),
    # The barrier after a block's partial sums, which only matters when a block loops to a second chunk: the
    # small grid caps make it loop at test sizes, and the race check finds the next chunk zeroing the sums
    # other warps still read.
    Fault(
        "missing_barrier_grid_stride",
        "adaln.cu",
        "        __syncthreads();  // the sums are read before the next chunk zeroes them\n",
        "",
        "race",
        "adaln_backward(2, 40, 40)",
        r"data race",
    ),
]


def source_tree(fault, root):
    """The sources with the fault planted (files rewritten only when they changed: builds stay cached)."""
    src = root / fault.name / "src"
    files = ["CMakeLists.txt", *(p.relative_to(emu.ROOT).as_posix() for p in (emu.ROOT / "csrc").rglob("*"))]
    files += [p.relative_to(emu.ROOT).as_posix() for p in (emu.ROOT / "tests" / "cpu_emu").glob("*.*")]
    for rel in files:
        path = emu.ROOT / rel
        if path.is_dir():
            continue
        text = path.read_text()
        if rel == f"csrc/{fault.file}":
            assert text.count(fault.old) >= 1, (
                f"{fault.name}: the text to change is no longer in csrc/{fault.file}"
            )
            text = text.replace(fault.old, fault.new, 1)
        dest = src / rel
        if not dest.exists() or dest.read_text() != text:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
    return src


def probe(library, code, asan, timeout=300):
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + code, str(library)],
        capture_output=True,
        text=True,
        cwd=emu.ROOT,
        env=emu.sanitizer_env(asan),
        timeout=timeout,
    )


def source_lines(text):
    """The race check reports code addresses as library+offset: map them to file:line with addr2line."""
    out = []
    for path, offset in re.findall(r"at pc (\S+)\+(0x[0-9a-f]+)", text):
        if shutil.which("addr2line"):
            line = subprocess.run(
                ["addr2line", "-e", path, offset], capture_output=True, text=True
            ).stdout.strip()
            out.append(line)
    return out


_clean_runs = {}  # (library, probe) -> the probe's result on an unchanged build


def check(fault, library, clean_library):
    """AssertionError unless the probe passes on the clean build and fails as expected with the fault."""
    asan = "address" in emu.VARIANTS[fault.variant].get("DBLOCKS_EMU_SANITIZE", "")
    key = (str(clean_library), fault.probe)
    ok = _clean_runs[key] = _clean_runs.get(key) or probe(clean_library, fault.probe, asan)
    assert ok.returncode == 0, f"{fault.name}: the probe fails on the unchanged source:\n{ok.stderr[-3000:]}"
    bad = probe(library, fault.probe, asan)
    output = bad.stdout + bad.stderr
    lines = source_lines(output)
    assert bad.returncode != 0, f"{fault.name}: not caught (the probe passed with the fault planted)"
    assert re.search(fault.expect, output, re.S), (
        f"{fault.name}: caught, but not as expected:\n{output[-3000:]}"
    )
    evidence = [
        line for line in output.splitlines() if any(k in line for k in ("cpu_emu", "ERROR", "Error:"))
    ]
    return evidence[:2] + lines
