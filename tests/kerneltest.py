"""Shared checks of the Triton kernel tests (DESIGN.md section 6; STYLE.md practice 5).

- Tolerances are calibrated: the kernel's error against a float64 reference may be at most `factor` times
  the error of eager PyTorch computing the same expression in the same dtype, plus a small floor.
- Outputs are poisoned: `poison_outputs` makes every allocation of a launcher NaN-filled, so an element a
  kernel forgets to write fails the test.
"""

from __future__ import annotations

import pytest
import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4, torch.float64: 1e-12}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def assert_calibrated(
    name: str,
    out: torch.Tensor,
    ref64: torch.Tensor,
    eager: torch.Tensor,
    factor: float = 4.0,
    floor: float | None = None,
) -> None:
    """max|out - ref64| <= factor * max|eager - ref64| + floor (relative to the reference's scale)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (an unwritten, poisoned output?)"
    scale = ref64.abs().max().clamp_min(1e-30).item()
    err = (out.double() - ref64).abs().max().item() / scale
    err_eager = (eager.double() - ref64).abs().max().item() / scale
    if floor is None:
        floor = FLOOR[out.dtype]
        if out.dtype in (torch.bfloat16, torch.float16) and not torch.cuda.is_available():
            # Triton's interpreter converts fp32 to bf16/fp16 by truncation, not rounding to nearest: up to
            # one ulp where eager torch (and the GPU) err by half an ulp at most
            floor = max(floor, torch.finfo(out.dtype).eps)
    tol = factor * err_eager + floor
    assert err <= tol, f"{name}: relative error {err:.3g} > {factor} x eager's {err_eager:.3g} + floor"


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every tensor a launcher allocates starts as NaN (or -1 for integer dtypes)."""
    from dblocks_fast.kernels import _utils

    def poisoned(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(_utils, "empty", poisoned)
