"""Multi-head self-attention on torch SDPA, or flash-attn when it is installed and applicable."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["attention", "SelfAttention", "HAS_FLASH_ATTN"]

try:  # optional: `pip install dblocks-fast[flash]`
    from flash_attn import flash_attn_func as _flash_attn_func

    HAS_FLASH_ATTN = True
except ImportError:  # the default path is torch SDPA, which needs nothing extra
    _flash_attn_func = None
    HAS_FLASH_ATTN = False


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for q, k, v of shape (N, H, T, d).

    flash-attn is used on CUDA for fp16/bf16 without a mask; everything else goes to
    torch.nn.functional.scaled_dot_product_attention, which picks its own fused kernel.
    mask: boolean (True = attend) or additive float, broadcastable to (N, H, T, T).
    """
    if (
        _flash_attn_func is not None
        and mask is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
    ):
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def rotary(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (RoFormer, Su et al. 2021) of x (N, H, T, d) at positions 0..T-1: each
    pair (x_k, x_{k + d/2}) is rotated by the angle t * base^(-k / (d/2)), so q . k depends on the relative
    position. An odd last channel is left as it is."""
    t, d = x.shape[-2], x.shape[-1]
    half = d // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float32, device=x.device) / max(half, 1))
    angle = torch.arange(t, dtype=torch.float32, device=x.device)[:, None] * freqs[None]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, rope: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by the number of heads {heads}")
        self.heads = heads
        self.rope = rope  # rotate q and k by position (`rotary`); a choice of the model, no weights
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.rope:
            q, k = rotary(q), rotary(k)
        out = attention(q, k, v, mask)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))
