"""Are the kernels compiled well for Hopper? Every Triton kernel of kernels/ compiled for sm_90 without a GPU,
with the specialisations its launcher makes at the benchmark sizes, and csrc/ through `nvcc -Xptxas -v`.

    python benchmarks/kernels_compiled.py            # the table, in benchmarks/results/kernels_compiled.*
    python benchmarks/kernels_compiled.py --quick    # the same (compiling needs no GPU, sizes cost nothing)

How: each launcher (kernels/*.py `_forward`, `_backward`, `_launch`) runs on meta tensors of the benchmark
sizes, its kernels' launches are recorded instead of run (with 132 SMs, an H100/H200's count, where a
launcher sizes its grid from the device), and each distinct launch is compiled through the public
`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` with Triton's default specialisation
(16-byte aligned pointers, integers divisible by 16 marked so, an integer 1 made a constant). The cubin is
read with the cuobjdump that Triton ships: registers, stack frame, shared memory, local loads/stores in the
SASS (spills), and the widest global load and store. Occupancy is the warps an SM can hold by registers and
shared memory (of 64). The run exits 1 on a compile error or on local memory (spills) at a benchmark size;
the "wide" rows (D = 4096 fp32, D = 16384 bf16) are recorded and reported, not held to that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # before triton is imported: interpreted kernels cannot be compiled
    os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

ARCH = 90
SMS = 132  # H100 SXM and H200: the launchers that size grids from the device see this many SMs
BENCH_SIZES = {  # bench_kernels.GPU_SIZES
    "DiT-XL/2": dict(n=32, t=256, d=1152, dtype=torch.bfloat16),
    "DiT-S/2": dict(n=128, t=256, d=384, dtype=torch.bfloat16),
    "LM head": dict(rows=65536, d=768, v=32000, dtype=torch.bfloat16),
}
WIDE_SIZES = {  # reported, not gated: where the issue saw the AdaLN backward spill, and odd widths
    "wide D=4096 fp32": dict(n=4, t=256, d=4096, dtype=torch.float32),
    "wide D=16384 bf16": dict(n=4, t=64, d=16384, dtype=torch.bfloat16),
    # widths not a multiple of 16: no vector loads, so the launchers hold fewer elements a thread
    "odd D=113 fp32": dict(n=8, t=64, d=113, dtype=torch.float32),
    "odd D=3000 bf16": dict(n=4, t=64, d=3000, dtype=torch.bfloat16),
    "LM head V=50257": dict(rows=8192, d=768, v=50257, dtype=torch.bfloat16),
}
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
          torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
          torch.bool: "u1"}  # fmt: skip


# --- recording the launches ---------------------------------------------------------------------------------
@dataclass
class Launch:
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple

    @property
    def name(self) -> str:
        return f"{self.kernel.fn.__module__.rsplit('.', 1)[-1]}.{self.kernel.fn.__name__}"


def jit_kernels() -> list:
    """Every @triton.jit kernel (launched with a grid) defined in kernels/: the ones this table must cover."""
    from triton.runtime.jit import JITFunction

    from dblocks_fast.kernels import adaln, edm_loss, linear_cross_entropy

    found = []
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: the kernels were made for the interpreter and cannot be "
                           "compiled; run this with TRITON_INTERPRET=0")  # fmt: skip
    for mod in (adaln, edm_loss, linear_cross_entropy):
        for name, obj in vars(mod).items():
            if (
                isinstance(obj, JITFunction)
                and obj.fn.__module__ == mod.__name__
                and name.endswith("_kernel")
            ):
                found.append(obj)
    return found


@contextlib.contextmanager
def recording():
    """Launchers run on meta tensors; every kernel launch is appended to the yielded list, not run."""
    from dblocks_fast.kernels import _utils

    launches: list[Launch] = []
    kernels = jit_kernels()

    def recorder(kernel):
        def run(*args, grid, warmup=False, **kwargs):
            launches.append(Launch(kernel, args, kwargs, tuple(grid) if not callable(grid) else grid))

        return run

    def programs_per_sm(kernel, args, consts, device):  # as on an sm_90 GPU: from this compile's occupancy
        row = compile_launch(Launch(kernel, args, consts, (1,)))
        return max(1, row["occupancy_warps"] // row["num_warps"])

    saved = (_utils.check_device, _utils.num_sms, _utils.programs_per_sm)
    try:
        for k in kernels:
            k.run = recorder(k)  # an instance attribute: `kernel[grid](...)` calls self.run
        _utils.check_device = lambda op, **tensors: next(iter(tensors.values())).device
        _utils.num_sms = lambda device: SMS
        _utils.programs_per_sm = programs_per_sm
        yield launches
    finally:
        for k in kernels:
            k.__dict__.pop("run", None)
        _utils.check_device, _utils.num_sms, _utils.programs_per_sm = saved


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def record_size(size: dict) -> list[Launch]:
    """The launches the launchers make at one size: forward and backward of each op (bench_kernels' cases)."""
    from dblocks_fast.kernels import adaln, edm_loss, linear_cross_entropy

    dt = size["dtype"]
    with recording() as launches:
        if "rows" in size:
            r, d, v = size["rows"], size["d"], size["v"]
            chunk = linear_cross_entropy.default_chunk(r, v, d, dt.itemsize)
            linear_cross_entropy._launch(
                _meta(r, d, dtype=dt), _meta(v, d, dtype=dt), _meta(r, dtype=torch.int64),
                _meta(r, dtype=torch.float32), chunk, True, True, False,
            )  # fmt: skip
            return launches
        n, t, d = size["n"], size["t"], size["d"]
        x, y, dh, dxn = (_meta(n, t, d, dtype=dt) for _ in range(4))
        gate, shift, scale = (_meta(n, d, dtype=dt) for _ in range(3))
        _, _, mean, rstd = adaln._forward(x, None, None, shift, scale, 1e-6)
        adaln._backward(x, None, None, scale, mean, rstd, None, dh, dt, None, None, dt, dt)
        xnew, _, mean, rstd = adaln._forward(x, y, gate, shift, scale, 1e-6)
        adaln._backward(xnew, y, gate, scale, mean, rstd, dxn, dh, dt, dt, dt, dt, dt)
        sigma = _meta(n, dtype=torch.float32)
        _, per, r = edm_loss._forward(x, y, dh, sigma, 0.5, True)
        edm_loss._backward(r, sigma, _meta((), dtype=torch.float32), None, 0.5, None, dt, None)  # bench: df
        edm_loss._backward(r, sigma, _meta((), dtype=torch.float32), per, 0.5, dt, dt, dt)  # training: all
    return launches


# --- compiling ----------------------------------------------------------------------------------------------
def specialise(launch: Launch) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) for triton.compile, as Triton's launcher specialises."""
    kernel = launch.kernel
    names = [p.name for p in kernel.params]
    values = dict(zip(names, launch.args))
    options = {}
    for key, val in launch.kwargs.items():
        if key in names:
            values[key] = val
        else:
            options[key] = val  # num_warps, num_stages, ...
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        v = values[p.name]
        if p.is_constexpr or v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
            signature[p.name] = "constexpr"
            constexprs[p.name] = v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + _TYPES[v.dtype]
            if (v.storage_offset() * v.element_size()) % 16 == 0:  # allocations are 256-byte aligned
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            signature[p.name] = "u1"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{launch.name}: argument {p.name} of type {type(v).__name__} is not handled")
    return signature, constexprs, attrs, options


def _tool(name: str) -> str:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.is_file():
        return str(bundled)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found (neither in Triton's package nor on PATH)")
    return found


def compile_kernel(kernel, signature, constexprs, attrs, options, arch: int = ARCH):
    """triton.compile for sm_`arch`, no device needed. Returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # constexprs keyed by the argument's index path, the form every Triton 3.x ASTSource takes
    index = {p.name: p.num for p in kernel.params}
    keyed = {(index[k],) if isinstance(k, str) else k: v for k, v in constexprs.items()}
    src = ASTSource(kernel, signature, constexprs=keyed, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def inspect_cubin(cubin: bytes) -> dict:
    """Registers, stack, shared memory (cuobjdump), local loads/stores and the widest global access (SASS)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        cuobjdump = _tool("cuobjdump")
        usage = subprocess.run(
            [cuobjdump, "--dump-resource-usage", str(path)], capture_output=True, text=True
        )
        sass = subprocess.run([cuobjdump, "--dump-sass", str(path)], capture_output=True, text=True)
    if usage.returncode != 0 or sass.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {usage.stderr or sass.stderr}")
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage.stdout)
    if m is None:
        raise RuntimeError(f"cuobjdump's resource usage not understood:\n{usage.stdout}")
    regs, stack, shared, local = map(int, m.groups())
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass.stdout, flags=re.M)

    def widest(prefix: str) -> int:
        bits = [int(w) if w else 32 for op in ops if op.startswith(prefix)
                for w in [next(iter(re.findall(r"\.(?:U)?(\d+)\b", op[len(prefix):])), "")]]  # fmt: skip
        return max(bits, default=0)

    return {
        "registers": regs,
        "stack_bytes": stack,
        "static_shared_bytes": shared,
        "local_bytes": local,
        "local_stores": sum(op.startswith("STL") for op in ops),
        "local_loads": sum(op.startswith("LDL") for op in ops),
        "global_load_bits": widest("LDG"),
        "global_store_bits": widest("STG"),
        "sass_instructions": len(ops),
    }


def occupancy(regs: int, warps: int, shared: int) -> int:
    """Warps an sm_90 SM holds (of 64): registers by warp in units of 256, 228 KiB shared, 32 blocks."""
    from dblocks_fast.kernels import _utils

    return _utils.resident_warps(regs, warps, shared)


def compile_launch(launch: Launch) -> dict:
    sig, consts, attrs, options = specialise(launch)
    shown = {k: v for k, v in consts.items() if v is not None and k == k.upper()}
    row = {"kernel": launch.name, "constexprs": shown, "num_warps": options.get("num_warps", 4),
           "grid": list(launch.grid) if not callable(launch.grid) else "callable"}  # fmt: skip
    t0 = time.perf_counter()
    try:
        compiled = compile_kernel(launch.kernel, sig, consts, attrs, options)
    except Exception as e:  # noqa: BLE001 - any compiler failure is this row's result
        row.update(status="compile error", error=f"{type(e).__name__}: {str(e)[:2000]}")
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    row.update(inspect_cubin(compiled.asm["cubin"]))
    row["dynamic_shared_bytes"] = int(compiled.metadata.shared)
    smem = row["dynamic_shared_bytes"] + row["static_shared_bytes"]
    row["occupancy_warps"] = occupancy(row["registers"], row["num_warps"], smem)
    spills = row["local_stores"] + row["local_loads"] + row["stack_bytes"]
    row["status"] = "spills" if spills else "ok"
    return row


def _key(launch: Launch) -> str:
    sig, consts, attrs, options = specialise(launch)
    return repr((launch.name, sorted(sig.items()), sorted(consts.items(), key=str), sorted(attrs), options))


_SHOWN = (
    "kernel",
    "constexprs",
    "num_warps",
    "status",
    "registers",
    "stack_bytes",
    "local_loads",
    "local_stores",
    "global_load_bits",
    "global_store_bits",
)


def triton_rows(sizes: dict, gated: bool) -> list[dict]:
    """One row per distinct compiled kernel at each size; `variants` counts the specialisations that compile
    alike (e.g. the cross-entropy's chunks, whose target pointers differ in alignment)."""
    rows = []
    for size, spec in sizes.items():
        seen, shown = set(), {}
        for launch in record_size(spec):
            key = _key(launch)
            if key in seen:
                continue  # the same launch again (one chunk after another)
            seen.add(key)
            row = {"size": size, "dtype": str(spec["dtype"]).removeprefix("torch."), "gated": gated}
            row.update(compile_launch(launch))
            same = repr([row.get(k) for k in _SHOWN])
            if same in shown:
                shown[same]["variants"] += 1
                continue
            row["variants"] = 1
            shown[same] = row
            print(f"{size:>18} {row['kernel']:<45} {row['status']}", flush=True)
            rows.append(row)
    return rows


# --- csrc/ through nvcc -------------------------------------------------------------------------------------
# csrc/ kernels allowed a few bytes of spill, each with its reason: (demangled name part, bytes st+ld)
KNOWN_CSRC_SPILLS = [
    # 4-8 bytes each way in two fp16 instantiations (csrc/PERF_NOTES.md, "Registers and spills"): noted there
    # as negligible; anything more, or in another kernel, fails the check
    ("(anonymous namespace)::adaln_backward_kernel<__half,", 16),  # a part of the demangled name
]


def nvcc_rows(
    csrc: Path = ROOT / "csrc", arch: int = ARCH, maxrregcount: int | None = None
) -> tuple[list[dict], str | None]:
    """(one row per kernel of csrc/*.cu from `nvcc -Xptxas -v`, None) or ([], why not)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return [], "nvcc not found"
    rows = []
    cap = [f"-maxrregcount={maxrregcount}"] if maxrregcount else []
    for cu in sorted(csrc.glob("*.cu")):
        cmd = [nvcc, f"-arch=sm_{arch}", "-O3", "-std=c++17", "-lineinfo", f"-I{csrc}",
               f"-I{csrc / 'include'}", *cap, "-Xptxas", "-v", "-c", str(cu), "-o", "/dev/null"]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            rows.append({"file": cu.name, "kernel": "(compile)", "status": "compile error",
                         "error": res.stderr[-2000:]})  # fmt: skip
            continue
        rows += parse_ptxas_log(res.stderr, cu.name)
    names = [r["kernel"] for r in rows if r["kernel"] != "(compile)"]
    filt = shutil.which("cu++filt") or shutil.which("c++filt")
    if filt and names:
        out = subprocess.run(
            [filt], input="\n".join(names), capture_output=True, text=True
        ).stdout.splitlines()
        for r, pretty in zip([r for r in rows if r["kernel"] != "(compile)"], out):
            r["kernel"] = pretty.strip()
    return allow_known_spills(rows), None


def allow_known_spills(rows: list[dict]) -> list[dict]:
    """Mark "known spill" the rows that spill no more than KNOWN_CSRC_SPILLS allows their kernel."""
    for r in rows:
        spilled = r.get("spill_store_bytes", 0) + r.get("spill_load_bytes", 0)
        known = [b for part, b in KNOWN_CSRC_SPILLS if part in r["kernel"]]
        if r["status"] == "spills" and known and spilled <= known[0]:
            r["status"] = "known spill"
    return rows


def parse_ptxas_log(log: str, file: str) -> list[dict]:
    """One row per entry function of a `ptxas -v` log: registers, stack, spill bytes, shared memory."""
    rows, cur = [], None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)' for 'sm_\d+a?'", line):
            cur = {"file": file, "kernel": m.group(1)}
            rows.append(cur)
        elif cur is not None and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                                                 r"(\d+) bytes spill loads", line)):  # fmt: skip
            cur["stack_bytes"], cur["spill_store_bytes"], cur["spill_load_bytes"] = map(int, m.groups())
        elif cur is not None and (m := re.search(r"Used (\d+) registers", line)):
            cur["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["static_shared_bytes"] = int(s.group(1)) if s else 0
    for r in rows:
        spilled = r.get("spill_store_bytes", 0) + r.get("spill_load_bytes", 0)
        r["status"] = "spills" if spilled else "ok"
    return rows


# --- the record ---------------------------------------------------------------------------------------------
def failures(record: dict) -> list[str]:
    """What fails the check: a compile error anywhere, spills at a benchmark size (Triton) or in csrc/."""
    bad = [f"{r['size']} {r['kernel']}: {r['status']}" for r in record["triton"]
           if r["status"] == "compile error" or (r["status"] == "spills" and r["gated"])]  # fmt: skip
    bad += [f"csrc/{r['file']} {r['kernel']}: {r['status']}" for r in record["nvcc"]
            if r["status"] not in ("ok", "known spill")]  # fmt: skip
    return bad


def markdown(record: dict, prov: dict) -> str:
    lines = [
        "# Kernels compiled for sm_90 (Hopper) without a GPU",
        "",
        f"{prov['device']}; torch {prov['versions']['torch']}; triton {record['triton_version']}; "
        f"{record['nvcc'] and record['nvcc_version'] or 'no nvcc'}; commit {prov['commit']}; {prov['date']}.",
        f"Command: `{prov['command']}`. A compile table, not a measurement: no kernel ran.",
        "",
        "Triton: each launch the launchers make at the size (meta tensors, 132 SMs), compiled with "
        "`triton.compile(..., target=GPUTarget('cuda', 90, 32))`; registers, stack and shared memory from "
        "cuobjdump, local loads/stores (spills) and the widest global load/store from the SASS; occupancy in "
        "warps per SM (of 64). Benchmark sizes must not spill; the wide rows are reported only.",
        "",
        "| size | kernel | constexprs | warps | grid | regs | stack B | local ld/st | smem B | ld/st bits "
        "| occupancy | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["triton"]:
        if r["status"] == "compile error":
            lines.append(f"| {r['size']} | {r['kernel']} | {r['constexprs']} | {r['num_warps']} | | | | | | "
                         f"| | **compile error** |")  # fmt: skip
            continue
        consts = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        grid = "x".join(map(str, r["grid"])) if isinstance(r["grid"], list) else r["grid"]
        status = r["status"] if r["status"] == "ok" else f"**{r['status']}**"
        name = r["kernel"] + (f" ({r['variants']} alignments)" if r.get("variants", 1) > 1 else "")
        lines.append(
            f"| {r['size']} | {name} | {consts} | {r['num_warps']} | {grid} | {r['registers']} | "
            f"{r['stack_bytes']} | {r['local_loads']}/{r['local_stores']} | "
            f"{r['dynamic_shared_bytes'] + r['static_shared_bytes']} | "
            f"{r['global_load_bits']}/{r['global_store_bits']} | {r['occupancy_warps']} | {status} |"
        )
    lines += ["", f"csrc/: `nvcc -arch=sm_{ARCH} -O3 -Xptxas -v` over csrc/*.cu, every instantiation.", ""]
    if record["nvcc_skipped"]:
        lines += [f"**Not run**: {record['nvcc_skipped']}."]
    else:
        lines += [
            "| file | kernel | regs | stack B | spill st/ld B | smem B | status |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in record["nvcc"]:
            if r["status"] == "compile error":
                lines.append(f"| {r['file']} | {r['kernel']} | | | | | **compile error** |")
                continue
            status = r["status"] if r["status"] == "ok" else f"**{r['status']}**"
            lines.append(
                f"| {r['file']} | `{r['kernel'][:90]}` | {r.get('registers', '')} | "
                f"{r.get('stack_bytes', 0)} | "
                f"{r.get('spill_store_bytes', 0)}/{r.get('spill_load_bytes', 0)} | "
                f"{r.get('static_shared_bytes', 0)} | {status} |"
            )
    bad = failures(record)
    lines += [
        "",
        f"**Failures**: {'; '.join(bad)}" if bad else "No compile error, no spill at a benchmark size.",
    ]
    return "\n".join(lines) + "\n"


def table(r: dict) -> list[str]:
    """The results page's lines: one per Triton kernel at the DiT-XL/2 and LM head sizes, then the verdict."""
    lines = [
        "| size | kernel | regs | spills (local ld/st) | occupancy (warps/SM) |",
        "|---|---|---|---|---|",
    ]
    for x in r["triton"]:
        if x["gated"] and x["status"] != "compile error":
            consts = ", ".join(f"{k}={v}" for k, v in x["constexprs"].items())
            lines.append(f"| {x['size']} | {x['kernel']} {consts} | {x['registers']} | "
                         f"{x['local_loads']}/{x['local_stores']} | {x['occupancy_warps']} |")  # fmt: skip
    bad = failures(r)
    known = sum(x["status"] == "known spill" for x in r["nvcc"])
    csrc = f"csrc/: {len(r['nvcc'])} kernels through nvcc" if r["nvcc"] else f"csrc/: {r['nvcc_skipped']}"
    csrc += f", {known} with a known spill of a few bytes (KNOWN_CSRC_SPILLS)" if known else ""
    lines += [
        "",
        f"{csrc}. " + (f"**Failures**: {'; '.join(bad)}" if bad else "No compile error, no other spill."),
    ]
    return lines


def write(record: dict, prov: dict, out: Path) -> Path:
    """kernels_compiled.json and .md in `out`, each written to a temporary file and renamed into place."""
    out.mkdir(parents=True, exist_ok=True)
    texts = {"json": json.dumps({"benchmark": "kernels_compiled", **prov, **record}, indent=1) + "\n",
             "md": markdown(record, prov)}  # fmt: skip
    for ext, text in texts.items():
        tmp = out / f".kernels_compiled.{ext}.tmp"
        tmp.write_text(text)
        tmp.replace(out / f"kernels_compiled.{ext}")
    return out / "kernels_compiled.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="accepted for the benchmark runner; same sizes")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    ap.add_argument("--no-nvcc", action="store_true", help="skip csrc/")
    ap.add_argument("--no-wide", action="store_true", help="only the benchmark sizes")
    args = ap.parse_args(argv)
    import triton

    prov = common.provenance(torch.device("cpu"))
    prov["device"] = f"sm_{ARCH} compile on {prov['device']}"
    t0 = time.perf_counter()
    rows = triton_rows(BENCH_SIZES, gated=True) + (
        [] if args.no_wide else triton_rows(WIDE_SIZES, gated=False)
    )
    covered = {r["kernel"] for r in rows}
    missing = [f"{k.fn.__module__.rsplit('.', 1)[-1]}.{k.fn.__name__}" for k in jit_kernels()]
    missing = [k for k in missing if k not in covered]
    nvcc, skipped = ([], "--no-nvcc") if args.no_nvcc else nvcc_rows()
    nvcc_version = ""
    if shutil.which("nvcc"):
        nvcc_version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
        nvcc_version = "nvcc " + (re.findall(r"release ([\d.]+)", nvcc_version) or ["?"])[0]
    record = {"triton_version": triton.__version__, "arch": f"sm_{ARCH}", "sms": SMS, "quick": False,
              "triton": rows, "kernels_not_covered": missing, "nvcc": nvcc, "nvcc_skipped": skipped,
              "nvcc_version": nvcc_version, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    path = write(record, prov, args.out)
    print(path.with_suffix(".md").read_text())
    bad = failures(record) + [f"{k}: no launch recorded at any size" for k in missing]
    if bad:
        print("FAILED:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
