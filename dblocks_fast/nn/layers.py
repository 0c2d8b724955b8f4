"""The AdaLN-Zero transformer layer (DiT, Peebles & Xie 2023) and the matching output layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .attention import SelfAttention

__all__ = ["Mlp", "AdaLNZeroLayer", "AdaLNFinalLayer", "init_linears_", "set_kernels"]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNZeroLayer(nn.Module):
    """x += gate1 * Attn(adaLN(x; shift1, scale1)); x += gate2 * MLP(adaLN(x; shift2, scale2)).

    The six modulation vectors come from the conditioning c through a linear map initialised to zero, so a
    fresh layer is the identity. Norms and the gated residual go through `dblocks_fast.ops`.
    """

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float = 4.0, cond_dim: int | None = None, eps: float = 1e-6
    ):
        super().__init__()
        self.eps = eps
        self.kernels = "auto"  # set with set_kernels(); an implementation choice, not part of the weights
        self.attn = SelfAttention(dim, heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.modulation = nn.Linear(cond_dim or dim, 6 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c)).chunk(6, dim=-1)
        h = ops.adaln_modulate(x, shift1, scale1, self.eps, self.kernels)
        x, h = ops.gated_residual_adaln(x, self.attn(h, mask), gate1, shift2, scale2, self.eps, self.kernels)
        return x + gate2[:, None] * self.mlp(h)


class AdaLNFinalLayer(nn.Module):
    """adaLN(x; shift, scale) then a linear map to the output, both zero-initialised (DiT's final layer)."""

    def __init__(self, dim: int, out_dim: int, cond_dim: int | None = None, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.kernels = "auto"
        self.modulation = nn.Linear(cond_dim or dim, 2 * dim)
        self.linear = nn.Linear(dim, out_dim)
        for p in (*self.modulation.parameters(), *self.linear.parameters()):
            nn.init.zeros_(p)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(F.silu(c)).chunk(2, dim=-1)
        return self.linear(ops.adaln_modulate(x, shift, scale, self.eps, self.kernels))


def init_linears_(module: nn.Module) -> nn.Module:
    """DiT's initialisation of every nn.Linear in `module`: xavier-uniform weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def set_kernels(module: nn.Module, kernels: str) -> nn.Module:
    """Route every dblocks_fast layer inside `module` to `kernels` ("auto" | "cuda" | "triton" | "torch")."""
    if kernels not in ops.KERNELS:
        raise ValueError(f"kernels must be one of {ops.KERNELS}, got {kernels!r}")
    for m in module.modules():
        if hasattr(m, "kernels"):
            m.kernels = kernels
    return module
