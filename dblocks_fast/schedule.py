"""Noise levels of DiffusionBlocks: the training distribution, the partition into blocks, overlap, and
the sampling sigmas (DESIGN.md section 2).

All sigma arithmetic is float64. Block 0 is the input end of the network and owns the *highest* noise;
block B-1 owns the lowest. Block b owns sigma in (boundaries[b+1], boundaries[b]], the last block also
its lower end sigma_min, so the sampling sigma that sits on a boundary belongs to the lower-noise block.
"""

from __future__ import annotations

import math

import torch

__all__ = ["NoiseSchedule"]


def _ndtr(x: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(x)


def _ndtri(q: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtri(q)


class NoiseSchedule:
    """Truncated log-normal noise levels split into `num_blocks` ranges (DiffusionBlocks, Sec. 3).

    Training draws ln sigma ~ N(p_mean, p_std^2) truncated to [sigma_min, sigma_max] (EDM). The partition is
    "equiprob" (each block holds probability mass 1/B, the paper's choice) or "uniform" (equal intervals of
    ln sigma, the ablation). `gamma` widens each block's training interval by gamma times its log-width on
    both sides, clipped to [sigma_min, sigma_max].
    """

    def __init__(
        self,
        num_blocks: int,
        partition: str = "equiprob",
        gamma: float = 0.05,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        p_mean: float = -1.2,
        p_std: float = 1.2,
    ):
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        if partition not in ("equiprob", "uniform"):
            raise ValueError(f"partition must be 'equiprob' or 'uniform', got {partition!r}")
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
            )
        if not p_std > 0:
            raise ValueError(f"p_std must be positive, got {p_std}")
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma (block overlap) must be in [0, 1), got {gamma}")
        self.num_blocks = num_blocks
        self.partition = partition
        self.gamma = float(gamma)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)
        self.q_min = self.cdf(self.sigma_min)
        self.q_max = self.cdf(self.sigma_max)
        self.boundaries = self._boundaries()

    # --- the truncated log-normal ---------------------------------------------------------------------
    def cdf(self, sigma) -> float | torch.Tensor:
        """Phi((ln sigma - P_mean) / P_std): the untruncated log-normal CDF."""
        s = torch.as_tensor(sigma, dtype=torch.float64)
        q = _ndtr((torch.log(s) - self.p_mean) / self.p_std)
        return q.item() if q.ndim == 0 and not isinstance(sigma, torch.Tensor) else q

    def icdf(self, q: torch.Tensor) -> torch.Tensor:
        """The inverse of `cdf`: exp(P_mean + P_std * Phi^-1(q))."""
        return torch.exp(self.p_mean + self.p_std * _ndtri(q.to(torch.float64)))

    def _boundaries(self) -> tuple[float, ...]:
        b = self.num_blocks
        if self.partition == "equiprob":
            # frac computed as an exact ratio of integers, so the same boundary is the same double everywhere
            fracs = torch.tensor([(b - i) / b for i in range(b + 1)], dtype=torch.float64)
            sig = self.icdf(self.q_min + fracs * (self.q_max - self.q_min))
        else:
            lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
            sig = torch.exp(torch.tensor([hi + (lo - hi) * i / b for i in range(b + 1)], dtype=torch.float64))
        out = sig.tolist()
        out[0], out[-1] = self.sigma_max, self.sigma_min  # exact ends, whatever icdf(cdf(x)) rounds to
        return tuple(out)

    # --- blocks ------------------------------------------------------------------------------------------
    def _check_block(self, b: int) -> None:
        if not 0 <= b < self.num_blocks:
            raise IndexError(f"block {b} out of range for {self.num_blocks} blocks")

    def interval(self, b: int) -> tuple[float, float]:
        """Block b's training interval (sigma_lo, sigma_hi), widened by gamma in log space and clipped."""
        self._check_block(b)
        lo, hi = math.log(self.boundaries[b + 1]), math.log(self.boundaries[b])
        pad = self.gamma * (hi - lo)
        return max(self.sigma_min, math.exp(lo - pad)), min(self.sigma_max, math.exp(hi + pad))

    def sample_sigma(
        self,
        b: int,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """n training sigmas (float64) for block b: u ~ U(Phi(lo), Phi(hi)), sigma = icdf(u).

        This is the truncated log-normal restricted to the block's widened interval, drawn per example.
        """
        lo, hi = self.interval(b)
        q_lo, q_hi = self.cdf(lo), self.cdf(hi)
        u = torch.rand(n, dtype=torch.float64, generator=generator, device=device)
        sigma = self.icdf(q_lo + u * (q_hi - q_lo))
        return sigma.clamp_(lo, hi)  # icdf(cdf(x)) may round a hair outside the interval

    def block_of(self, sigma) -> int | torch.Tensor:
        """Index of the block whose (unwidened) interval holds sigma; values outside clamp to the ends."""
        s = torch.as_tensor(sigma, dtype=torch.float64).contiguous()
        # Count the interior boundaries strictly below sigma (searchsorted's left insertion point): a sigma
        # equal to a boundary is then the top of the lower-noise block, as the class docstring says.
        interior = torch.tensor(self.boundaries[1:-1][::-1], dtype=torch.float64, device=s.device)
        below = torch.searchsorted(interior, s, right=False)
        blk = (self.num_blocks - 1) - below
        return int(blk) if blk.ndim == 0 and not isinstance(sigma, torch.Tensor) else blk

    # --- sampling --------------------------------------------------------------------------------------
    def sampling_sigmas(self, num_steps: int) -> torch.Tensor:
        """num_steps + 1 sigmas (float64): the num_steps evaluation levels, then 0.

        Each block gets num_steps / B steps, spaced uniformly in the log-normal CDF across the block's
        interval and starting at its upper boundary, so with the equiprob partition the whole sequence is
        uniform in the truncated CDF from sigma_max down. The final step goes to sigma = 0, so an Euler step
        there returns D at the last evaluation sigma (DESIGN.md section 2).
        """
        b = self.num_blocks
        if not isinstance(num_steps, int) or num_steps < b or num_steps % b:
            raise ValueError(
                f"num_steps must be a positive multiple of the number of blocks ({b}) so every block gets "
                f"the same number of steps; got {num_steps!r}. "
                f"Try num_steps={b * max(1, round(num_steps / b))}."
            )
        k = num_steps // b
        out = []
        for blk in range(b):
            hi, lo = self.boundaries[blk], self.boundaries[blk + 1]
            q_hi, q_lo = self.cdf(hi), self.cdf(lo)
            fracs = torch.arange(1, k, dtype=torch.float64) / k
            out.append(torch.tensor([hi], dtype=torch.float64))  # exactly the boundary: owned by blk
            out.append(self.icdf(q_hi + fracs * (q_lo - q_hi)))
        out.append(torch.zeros(1, dtype=torch.float64))
        return torch.cat(out)

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(num_blocks={self.num_blocks}, partition={self.partition!r}, gamma={self.gamma}, "
            f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, "
            f"p_mean={self.p_mean}, p_std={self.p_std})"
        )

    def to_dict(self) -> dict:
        return {
            "num_blocks": self.num_blocks,
            "partition": self.partition,
            "gamma": self.gamma,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "p_mean": self.p_mean,
            "p_std": self.p_std,
        }
