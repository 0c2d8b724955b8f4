"""What every kernel launcher shares: output allocation, input checks, launch sizes.

Launchers allocate every output through `empty` (looked up on this module at call time), so the tests can
swap in an allocator that fills outputs with NaN and catch a kernel that leaves an element unwritten.
"""

from __future__ import annotations

import os

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
