"""Kernels planted for tests/test_kernels_compiled.py, and the compiles it checks, run in a process of their
own: pytest sets TRITON_INTERPRET=1 without a GPU, and interpreted kernels cannot be compiled.

    TRITON_INTERPRET=0 python -c "from tests.planted_kernels import compile_all; print(compile_all())"
"""

import json

import torch
import triton
import triton.language as tl

from benchmarks import kernels_compiled as kc


@triton.jit
def planted_spill_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    # an 8K-element fp32 row live in one warp's registers, twice: 512 values a thread, past 255 registers
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    xc = x - tl.sum(x, axis=0) / BLOCK
    tl.store(out_ptr + offs, xc / tl.sqrt(tl.sum(xc * xc, axis=0) / BLOCK) + x)


@triton.jit
def planted_bad_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)  # BLOCK = 24: not a power of two, which Triton rejects
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) * 2)


def _row(launch) -> dict:
    return {"size": "planted", "dtype": "float32", "gated": True, **kc.compile_launch(launch)}


def compile_all() -> str:
    """What the tests assert on, as JSON."""
    out = {}
    sizes = [*kc.BENCH_SIZES.values(), *kc.WIDE_SIZES.values()]  # the tiled AdaLN backward: wide rows only
    launched = {launch.name for spec in sizes for launch in kc.record_size(spec)}
    out["launched"] = sorted(launched)
    out["defined"] = sorted(f"{k.fn.__module__.rsplit('.', 1)[-1]}.{k.fn.__name__}" for k in kc.jit_kernels())
    xl = kc.record_size(kc.BENCH_SIZES["DiT-XL/2"])
    fwd = next(x for x in xl if x.name == "adaln._fwd_kernel")
    sig, consts, attrs, options = kc.specialise(fwd)
    names = [p.name for p in fwd.kernel.params]
    out["adaln_fwd"] = {"signature": sig, "constexprs": {k: v for k, v in consts.items()}, "options": options,
                        "divisible_by_16": sorted(names[i] for (i,) in attrs)}  # fmt: skip
    bwd = next(x for x in xl if x.name == "adaln._bwd_kernel")
    out["adaln_bwd"] = {"grid": list(bwd.grid), **_row(bwd)}
    s = kc.record_size(kc.BENCH_SIZES["DiT-S/2"])
    out["real"] = _row(next(x for x in s if x.name == "edm_loss._edm_loss_bwd_kernel"))
    x = torch.empty(8192, device="meta")
    out["spill"] = _row(kc.Launch(planted_spill_kernel, (x, x), {"BLOCK": 8192, "num_warps": 1}, (1,)))
    out["bad"] = _row(kc.Launch(planted_bad_kernel, (x,), {"BLOCK": 24}, (1,)))
    return json.dumps(out)
