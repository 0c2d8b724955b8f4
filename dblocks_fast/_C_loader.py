"""Optional access to the compiled CUDA extension dblocks_fast._C (built from csrc/ by setup.py).

The package never requires _C: load() returns None when it is missing and why_unavailable() says
why. This module imports nothing else of dblocks_fast and no torch at import time.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["edm_coefficients_cuda", "load", "why_unavailable"]

NOT_BUILT = (
    "not built: the package was installed without nvcc (set DBLOCKS_BUILD_CUDA=1 and reinstall to see why)"
)

_UNLOADED = object()
_module = _UNLOADED
_error = ""


def load() -> ModuleType | None:
    """The dblocks_fast._C module, or None if it cannot be imported (imported once, then cached)."""
    global _module, _error
    if _module is _UNLOADED:
        try:
            _module = importlib.import_module("dblocks_fast._C")
        except ImportError as exc:  # a missing module, or one that fails to load (ABI, symbols)
            _module = None
            missing = isinstance(exc, ModuleNotFoundError) and exc.name == "dblocks_fast._C"
            _error = NOT_BUILT if missing else f"{type(exc).__name__}: {exc}"
    return _module


def why_unavailable() -> str:
    """Why dblocks_fast._C cannot be used ("" when it can)."""
    load()
    return _error


def edm_coefficients_cuda(
    sigma: torch.Tensor, sigma_data: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM preconditioning coefficients of a contiguous 1-D float32 CUDA tensor of noise levels.

    Returns (c_skip, c_out, c_in, c_noise, weight), float32 like sigma, computed by the _C kernel
    on the current stream of sigma's device; see dblocks_edm_coefficients_f32 in
    csrc/include/dblocks/ops.h for the formulas.
    """
    import torch  # here only: importing this module must not need torch

    if not isinstance(sigma, torch.Tensor):
        raise TypeError(f"sigma must be a torch.Tensor, got {type(sigma).__name__}")
    if sigma.device.type != "cuda" or sigma.dtype != torch.float32 or sigma.dim() != 1:
        raise ValueError(
            "sigma must be a 1-D float32 CUDA tensor, got "
            f"shape {tuple(sigma.shape)}, {sigma.dtype} on {sigma.device}"
        )
    if not sigma.is_contiguous():
        raise ValueError("sigma must be contiguous")
    if not 0.0 < float(sigma_data) < float("inf"):
        raise ValueError(f"sigma_data must be finite and > 0, got {sigma_data}")
    ext = load()
    if ext is None:
        raise RuntimeError(f"dblocks_fast._C is unavailable: {why_unavailable()}")

    outputs = tuple(torch.empty_like(sigma) for _ in range(5))
    with torch.cuda.device(sigma.device):
        stream = torch.cuda.current_stream(sigma.device).cuda_stream
        ext.edm_coefficients_f32(
            sigma.data_ptr(), sigma.numel(), float(sigma_data), *(t.data_ptr() for t in outputs), stream
        )
    return outputs
