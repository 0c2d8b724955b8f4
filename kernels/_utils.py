"""What every kernel launcher shares: output allocation, input checks, launch sizes.

Launchers allocate every output through `empty` (looked up on this module at call time), so the tests can
swap in an allocator that fills outputs with NaN and catch a kernel that leaves an element unwritten.
"""

from __future__ import annotations

import os
import warnings

import torch

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def check_float(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        check(t.dtype in FLOATS, f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_device(op: str, **tensors: torch.Tensor) -> torch.device:
    devices = {t.device for t in tensors.values()}
    check(len(devices) == 1, f"{op}: all inputs must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    check(
        device.type == "cuda" or interpreting(),
        f"{op}: Triton kernels need CUDA tensors (got {device}); on the CPU set TRITON_INTERPRET=1 before "
        f"importing triton, or use the torch reference (dblocks_fast.ops, kernels='torch')",
    )
    return device


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device (a small number under the interpreter, to keep it quick)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def resident_warps(
    regs: int,
    warps: int,
    shared: int,
    *,
    regs_per_sm: int = 65536,
    max_warps: int = 64,
    shared_per_sm: int = 233472,
    max_blocks: int = 32,
) -> int:
    """Warps of a kernel one SM holds at once, from its registers a thread, warps a program and shared memory
    a program (the defaults are an H100/H200's: 64K registers allocated to a warp in units of 256, 64 warps,
    228 KiB of shared memory with 1 KiB reserved a block, 32 blocks)."""
    warp_regs = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (regs_per_sm // warp_regs) // warps
    by_shared = shared_per_sm // (shared + 1024) if shared else max_blocks
    return max(0, min(max_blocks, max_warps // warps, by_regs, by_shared)) * warps


_RESIDENT: dict = {}


def programs_per_sm(kernel, args: tuple, consts: dict, device: torch.device) -> int:
    """Programs of `kernel`, launched with `args` and `consts`, that one SM holds at once: from the compiled
    kernel's registers, warps and shared memory (compiled here if it was not, as its launch would), so a
    launcher can size its grid to one full wave. 4 under the interpreter. Cached by kernel, device, constexprs
    and tensor dtypes."""
    if device.type != "cuda":
        return 4
    key = (kernel, device, tuple(sorted(consts.items())),
           tuple(a.dtype if isinstance(a, torch.Tensor) else type(a) for a in args))  # fmt: skip
    if key not in _RESIDENT:
        try:
            compiled = kernel.warmup(*args, grid=(1,), **consts)
            compiled._init_handles()  # loads the binary: fills n_regs
        except AttributeError as e:  # a Triton without these internals: a grid heuristic is no reason to fail
            msg = f"{_name(kernel)}: occupancy unknown ({e}); sizing its grid for 4 programs an SM"
            warnings.warn(msg, stacklevel=3)
            _RESIDENT[key] = 4
            return 4
        props = torch.cuda.get_device_properties(device)
        warps = compiled.metadata.num_warps
        resident = resident_warps(
            compiled.n_regs,
            warps,
            compiled.metadata.shared,
            regs_per_sm=getattr(props, "regs_per_multiprocessor", 65536),
            max_warps=getattr(props, "max_threads_per_multi_processor", 2048) // 32,
            shared_per_sm=getattr(props, "shared_memory_per_multiprocessor", 233472),
        )
        _RESIDENT[key] = max(1, resident // warps)
    return _RESIDENT[key]


def _name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", repr(kernel))
