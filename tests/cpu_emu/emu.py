"""Builds csrc/ for the CPU emulator (CMake, DBLOCKS_CPU_EMULATION=ON) and loads it through ctypes.

Builds are cached in build/cpu_emu/<name> (ignored by git): a rerun only recompiles what changed.
"""

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "cpu_emu"

# name -> CMake cache entries. "caps": grids of at most 2 blocks and 3 AdaLN backward blocks, so that the
# grid-stride loops (and the barriers inside them) run at test sizes.
CAPS = {"DBLOCKS_GRID_CAP": "2", "DBLOCKS_BWD_TARGET_BLOCKS": "3"}
VARIANTS = {
    "plain": {},
    "caps": CAPS,
    "asan": {"DBLOCKS_EMU_SANITIZE": "address,undefined", **CAPS},
    "race": {"DBLOCKS_EMU_SANITIZE": "thread", **CAPS},
}
LIBRARY = "libdblocks_ops_emu.so"


def tool(name):
    found = shutil.which(name, path=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    if not found:
        raise RuntimeError(f"the CPU emulator build needs {name} on PATH")
    return found


def build(name, options, source=ROOT, build_root=BUILD, jobs=None):
    """Configures and builds one variant; returns the path of its shared library."""
    out = build_root / name
    generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={tool('ninja')}"] if shutil.which("ninja") else []
    defs = [f"-D{k}={v}" for k, v in {"DBLOCKS_CPU_EMULATION": "ON", **options}.items()]
    for cmd in (
        [tool("cmake"), "-S", str(source), "-B", str(out), *generator, *defs],
        [tool("cmake"), "--build", str(out), "-j", str(jobs or os.cpu_count() or 1)],
    ):
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return out / LIBRARY


def sanitizer_env(asan):
    """Environment for a process that loads an emulated build (an ASan build needs libasan loaded first)."""
    env = dict(os.environ)
    if asan:
        libasan = subprocess.run(
            ["g++", "-print-file-name=libasan.so"], capture_output=True, text=True
        ).stdout
        env["LD_PRELOAD"] = libasan.strip()
        env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1:halt_on_error=1"
        env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
        env["PYTHONMALLOC"] = "malloc"  # small buffers through malloc too, so ASan sees their bounds
    return env


I64, F32, F64, INT, P = ctypes.c_int64, ctypes.c_float, ctypes.c_double, ctypes.c_int, ctypes.c_void_p
SIGNATURES = {
    "dblocks_version": (INT, []),
    "dblocks_cuda_runtime_version": (INT, []),
    "dblocks_error_string": (ctypes.c_char_p, [INT]),
    "dblocks_last_cuda_error": (ctypes.c_char_p, []),
    "dblocks_edm_coefficients_f32": (INT, [P, I64, F32, P, P, P, P, P, P]),
    "dblocks_adaln_forward": (INT, [P] * 9 + [I64] * 4 + [INT, INT, F32, P]),
    "dblocks_adaln_backward_workspace": (I64, [I64, I64, I64, INT]),
    "dblocks_adaln_backward": (INT, [P] * 14 + [I64] * 4 + [INT, INT, P]),
    "dblocks_edm_l2_loss_workspace": (I64, [I64, I64]),
    "dblocks_edm_l2_loss_forward": (INT, [P] * 8 + [I64, I64, F32, INT, P]),
    "dblocks_edm_l2_loss_backward": (INT, [P] * 4 + [I64, P, P, P, I64, I64, F32, INT, P]),
    "dblocks_fused_adamw_f32": (INT, [P] * 5 + [I64, F64, F64, F64, F64, F64, I64, P, P, P]),
    "dblocks_emu_set_schedule": (None, [INT, ctypes.c_uint64]),
}


def load(path, partial=False):
    """The emulated library with the argument types of dblocks/ops.h set (plus the emulator's controls);
    `partial`: a planted-fault build of only some csrc/ files, which lacks the others' entry points."""
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in SIGNATURES.items():
        if partial and not hasattr(lib, name):
            continue
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib
