"""Noise-level and label embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["sinusoidal_embedding", "SigmaEmbedding", "LabelEmbedding"]


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t f_k), sin(t f_k)] with f_k = max_period^(-k / (dim/2)) (Transformer / DiT), shape (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim - 2 * half))  # odd dim: one zero column


class SigmaEmbedding(nn.Module):
    """c_noise = ln(sigma)/4 -> sinusoidal features -> MLP, as DiT embeds its timestep.

    c_noise spans about [-1.6, 1.1] for sigma in [0.002, 80]; `scale` stretches it so the sinusoid bank
    (periods 2 pi to 2 pi * max_period) resolves that range the way DiT's bank resolves t in [0, 1000].
    """

    def __init__(self, dim: int, freq_dim: int = 256, scale: float = 250.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(self.scale * c_noise, self.freq_dim))


class LabelEmbedding(nn.Module):
    """Class labels -> vectors, plus one row (index num_classes) for "no label" (classifier-free guidance)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels)
