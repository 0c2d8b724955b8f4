"""EDM preconditioning (Karras et al. 2022, Table 1) and the DiffusionBlocks loss weight.

D(z, sigma, x) = c_skip(sigma) z + c_out(sigma) F(c_in(sigma) z, c_noise(sigma), x), with
  c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)
  c_out  = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
  c_in   = 1 / sqrt(sigma^2 + sigma_data^2)
  c_noise = ln(sigma) / 4
and the loss weight w(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2.

Functions take sigma as a tensor of any shape and return tensors of the same shape and dtype; callers keep
sigma in float32 or float64 (never half precision: w is ~2.5e5 at sigma = 0.002).
"""

from __future__ import annotations

import torch

__all__ = [
    "c_skip",
    "c_out",
    "c_in",
    "c_noise",
    "loss_weight",
    "coefficients",
    "denoise",
    "inputs",
    "SIGMA_DATA",
]

SIGMA_DATA = 0.5


def c_skip(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    return sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)


def c_in(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    return 1.0 / torch.sqrt(sigma**2 + sigma_data**2)


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    return 0.25 * torch.log(sigma)


def loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def coefficients(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out, c_in, c_noise, w) in one call."""
    return (
        c_skip(sigma, sigma_data),
        c_out(sigma, sigma_data),
        c_in(sigma, sigma_data),
        c_noise(sigma),
        loss_weight(sigma, sigma_data),
    )


def _expand(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample coefficient of shape (N,) broadcast against a (N, ...) tensor."""
    return c.reshape(c.shape + (1,) * (like.ndim - c.ndim)).to(like.dtype)


def inputs(z: torch.Tensor, sigma: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """(c_in z, c_noise): what the network F is given, sigma (N,) cast to float32 as the networks compute
    (every EDM task's prelude)."""
    s = sigma.to(torch.float32)
    return _expand(c_in(s, sigma_data), z) * z, c_noise(s)


def denoise(
    z: torch.Tensor, f: torch.Tensor, sigma: torch.Tensor, sigma_data: float = SIGMA_DATA
) -> torch.Tensor:
    """D = c_skip z + c_out F, sigma of shape (N,) against z and F of shape (N, ...)."""
    return _expand(c_skip(sigma, sigma_data), z) * z + _expand(c_out(sigma, sigma_data), z) * f
