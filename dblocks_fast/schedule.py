"""Noise processes of DiffusionBlocks: the training density of noise levels, its partition into the blocks'
intervals, the overlap, the sampling grid, and for the continuous processes the forward process and the
network's preconditioning (DESIGN.md section 2).

One protocol, `NoiseProcess`, and three implementations:

  EDM            sigma in [sigma_min, sigma_max], ln sigma ~ N(P_mean, P_std^2); z = y + sigma eps
  FlowMatching   t in [0, 1], logit-normal (SD3) or uniform, optionally shifted; x_t = (1 - t) y + t eps
  Masking        t in [t_min, 1], uniform: MD4's absorbing-state masking level (the task does the masking)

Levels are float64 on the CPU unless a device is asked for. Block 0 is the input end of the network and owns
the *noisiest* levels, block B-1 the cleanest. Block b owns the levels in (boundaries[b+1], boundaries[b]],
the last block also its lower end, so a level that sits on a boundary belongs to the cleaner block. The
trainer, the samplers and BlockModel use only the protocol; which process a task trains with is the task's
answer to `noise_process(config.noise, num_blocks)`.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from . import precond
from .config import FLOW_DENSITIES, PARTITIONS, PREDICTIONS

__all__ = ["EDM", "FlowMatching", "Masking", "NoiseProcess", "NoiseSchedule", "create", "from_dict"]


def _ndtr(x: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(x)


def _ndtri(q: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtri(q)


def _check(num_blocks, gamma, partition: str = "equiprob") -> None:
    """The settings every process shares: B, the overlap gamma, the partition."""
    if not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma (block overlap) must be in [0, 1), got {gamma}")
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")


class NoiseProcess(Protocol):
    """What the trainer, the samplers and BlockModel know of a noise process.

    kind: "edm", "flow" or "masking" (also the "kind" of `to_dict()`). boundaries: B + 1 levels from the
    noisiest (block 0's top) down to the cleanest. Levels are float64 tensors (or Python floats where a
    single level is given or returned); a block's network gets them cast to its own dtype by the task.
    """

    kind: str
    num_blocks: int
    gamma: float
    boundaries: tuple[float, ...]

    def cdf(self, level) -> float | torch.Tensor:
        """The training density's cumulative distribution at `level` (0 at the clean end, 1 at the noisy)."""

    def icdf(self, q: torch.Tensor) -> torch.Tensor:
        """The level at which the training CDF reaches q (float64)."""

    def interval(self, b: int) -> tuple[float, float]:
        """Block b's training interval (lo, hi): its share of the levels, widened by gamma, clipped."""

    def sample(self, b: int, n: int, generator=None, device=None) -> torch.Tensor:
        """n training levels (float64) for block b: the training density restricted to its interval."""

    def block_of(self, level) -> int | torch.Tensor:
        """The block whose (unwidened) interval holds each level; levels outside clamp to the ends."""

    def grid(self, num_steps: int) -> torch.Tensor:
        """num_steps + 1 levels (float64): the evaluation levels, noisiest first, uniform in the training
        CDF within each block so that every block takes num_steps / B of them, then the clean end 0."""

    def to_dict(self) -> dict:
        """Everything that rebuilds the process (`from_dict`)."""


class _Levels:
    """block_of, sample and grid from `boundaries`, `cdf`, `icdf` and `interval`: shared by every process."""

    num_blocks: int
    boundaries: tuple[float, ...]

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "kind")
        return f"{type(self).__name__}({settings})"

    def _check_block(self, b: int) -> None:
        if not isinstance(b, int) or isinstance(b, bool):
            raise TypeError(f"block index must be an integer, got {b!r}")
        if not 0 <= b < self.num_blocks:
            raise IndexError(f"block {b} out of range for {self.num_blocks} blocks")

    def sample(
        self,
        b: int,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """n training levels (float64) for block b: u ~ U(cdf(lo), cdf(hi)), level = icdf(u), per example.

        This is the training density restricted to the block's widened interval.
        """
        lo, hi = self.interval(b)
        q_lo, q_hi = self.cdf(lo), self.cdf(hi)
        u = torch.rand(n, dtype=torch.float64, generator=generator, device=device)
        level = self.icdf(q_lo + u * (q_hi - q_lo))
        return level.clamp_(lo, hi)  # icdf(cdf(x)) may round a hair outside the interval

    def block_of(self, level) -> int | torch.Tensor:
        """Index of the block whose (unwidened) interval holds the level; values outside clamp to the ends."""
        s = torch.as_tensor(level, dtype=torch.float64).contiguous()
        # Count the interior boundaries strictly below the level (searchsorted's left insertion point): a
        # level equal to a boundary is then the top of the cleaner block, as the module docstring says.
        interior = torch.tensor(self.boundaries[1:-1][::-1], dtype=torch.float64, device=s.device)
        below = torch.searchsorted(interior, s, right=False)
        blk = (self.num_blocks - 1) - below
        return int(blk) if blk.ndim == 0 and not isinstance(level, torch.Tensor) else blk

    def grid(self, num_steps: int) -> torch.Tensor:
        """num_steps + 1 levels (float64): the num_steps evaluation levels, then 0.

        Each block gets num_steps / B steps, spaced uniformly in the training CDF across the block's interval
        and starting at its upper boundary, so with the equiprob partition the whole sequence is uniform in
        the CDF from the noisiest level down. The final step goes to 0, so an Euler step there returns D at
        the last evaluation level (DESIGN.md section 2).
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


class EDM(_Levels):
    """EDM's noise levels (Karras et al. 2022): truncated log-normal sigma split into `num_blocks` ranges
    (DiffusionBlocks, Sec. 3).

    Training draws ln sigma ~ N(p_mean, p_std^2) truncated to [sigma_min, sigma_max] (EDM). The partition is
    "equiprob" (each block holds probability mass 1/B, the paper's choice) or "uniform" (equal intervals of
    ln sigma, the ablation). `gamma` widens each block's training interval by gamma times its log-width on
    both sides, clipped to [sigma_min, sigma_max].
    """

    kind = "edm"

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
        _check(num_blocks, gamma, partition)
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
            )
        if not p_std > 0:
            raise ValueError(f"p_std must be positive, got {p_std}")
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
    def interval(self, b: int) -> tuple[float, float]:
        """Block b's training interval (sigma_lo, sigma_hi), widened by gamma in log space and clipped."""
        self._check_block(b)
        lo, hi = math.log(self.boundaries[b + 1]), math.log(self.boundaries[b])
        pad = self.gamma * (hi - lo)
        return max(self.sigma_min, math.exp(lo - pad)), min(self.sigma_max, math.exp(hi + pad))

    # --- the forward process and the network's preconditioning (float32, as the networks compute) --------
    def prior(self, shape, generator: torch.Generator | None = None) -> torch.Tensor:
        """z at the noisiest level, sigma_max: N(0, sigma_max^2 I), float32 on the CPU."""
        return torch.randn(shape, generator=generator) * self.sigma_max

    def noisy(self, y: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """z = y + sigma eps, sigma (N,) against y and eps (N, ...)."""
        return y + precond._expand(sigma.to(torch.float32), y) * eps

    def inputs(self, z: torch.Tensor, sigma: torch.Tensor, sigma_data: float = precond.SIGMA_DATA):
        """(c_in z, c_noise): what the network F is given (EDM's preconditioning)."""
        return precond.inputs(z, sigma, sigma_data)

    def denoised(self, z, out, sigma, sigma_data: float = precond.SIGMA_DATA) -> torch.Tensor:
        """D = c_skip z + c_out F."""
        return precond.denoise(z, out, sigma.to(torch.float32), sigma_data)

    def loss(self, z, out, y, eps, sigma, sigma_data: float = precond.SIGMA_DATA, kernels: str = "auto"):
        """(loss, per_sample): w(sigma) ||D - y||^2, the mean over elements (ops.edm_l2_loss, fused)."""
        from . import ops

        return ops.edm_l2_loss(z, out, y, sigma.to(torch.float32), sigma_data, kernels=kernels)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "num_blocks": self.num_blocks,
            "partition": self.partition,
            "gamma": self.gamma,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "p_mean": self.p_mean,
            "p_std": self.p_std,
        }


# --- flow matching -----------------------------------------------------------------------------------------
_T_EPS = 1e-3  # the widening measures a block's width in logit(t) with t clipped to [_T_EPS, 1 - _T_EPS]


class FlowMatching(_Levels):
    """Rectified flow (as SD3, Flux and Wan train): x_t = (1 - t) y + t eps for t in [0, 1], the network
    predicting the velocity v = eps - y (or eps, or x0: conversions of it).

    Training density: t = shift(sigmoid(mean + std n)), n ~ N(0, 1) (logit-normal; SD3's mean 0, std 1), or
    t = shift(u), u ~ U(0, 1) (density="uniform"), where shift(t) = k t / (1 + (k - 1) t) is the resolution
    shift (k = 1: none). The "equiprob" partition gives every block probability mass 1/B of that density
    ("uniform": equal widths in t); block 0 owns the noisiest end, t near 1. `gamma` widens each interval
    by gamma times its width in logit(t) on both sides (an end block's width is measured with t clipped to
    [0.001, 0.999]); the end blocks keep t = 1 and t = 0.

    Sampling is the same ODE as EDM's written in t: dx/dt = (x - D) / t = v, so the samplers step it from
    the prior x_1 = eps ~ N(0, I) down the grid to t = 0 with D = x_t - t v.
    """

    kind = "flow"

    def __init__(
        self,
        num_blocks: int,
        partition: str = "equiprob",
        gamma: float = 0.05,
        mean: float = 0.0,
        std: float = 1.0,
        shift: float = 1.0,
        density: str = "logit-normal",
        prediction: str = "velocity",
    ):
        _check(num_blocks, gamma, partition)
        if not (std > 0 and math.isfinite(mean)):
            raise ValueError(f"the logit-normal density needs std > 0 and a finite mean, got {mean}, {std}")
        if not shift > 0:
            raise ValueError(f"shift must be positive (1 = no shift), got {shift}")
        if density not in FLOW_DENSITIES:
            raise ValueError(f"density must be one of {FLOW_DENSITIES}, got {density!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.num_blocks, self.partition, self.gamma = num_blocks, partition, float(gamma)
        self.mean, self.std, self.shift = float(mean), float(std), float(shift)
        self.density, self.prediction = density, prediction
        b = num_blocks
        fracs = torch.tensor([(b - i) / b for i in range(b + 1)], dtype=torch.float64)
        out = (self.icdf(fracs) if partition == "equiprob" else fracs).tolist()
        out[0], out[-1] = 1.0, 0.0
        self.boundaries = tuple(out)

    # --- the training density ------------------------------------------------------------------------------
    def _shifted(self, u: torch.Tensor) -> torch.Tensor:
        k = self.shift
        return u if k == 1.0 else k * u / (1 + (k - 1) * u)

    def _unshifted(self, t: torch.Tensor) -> torch.Tensor:
        k = self.shift
        return t if k == 1.0 else t / (k - (k - 1) * t)

    def cdf(self, t) -> float | torch.Tensor:
        """P(level <= t) under the training density."""
        u = self._unshifted(torch.as_tensor(t, dtype=torch.float64))
        q = u if self.density == "uniform" else _ndtr((torch.logit(u) - self.mean) / self.std)
        return q.item() if q.ndim == 0 and not isinstance(t, torch.Tensor) else q

    def icdf(self, q: torch.Tensor) -> torch.Tensor:
        q = q.to(torch.float64)
        u = q if self.density == "uniform" else torch.sigmoid(self.mean + self.std * _ndtri(q))
        return self._shifted(u)

    def interval(self, b: int) -> tuple[float, float]:
        """Block b's training interval of t, widened by gamma in logit(t), the ends 0 and 1 kept."""
        self._check_block(b)

        def logit(t: float) -> float:
            t = min(max(t, _T_EPS), 1 - _T_EPS)
            return math.log(t / (1 - t))

        lo, hi = logit(self.boundaries[b + 1]), logit(self.boundaries[b])
        pad = self.gamma * (hi - lo)
        lo_t = 0.0 if b == self.num_blocks - 1 else 1 / (1 + math.exp(-(lo - pad)))
        hi_t = 1.0 if b == 0 else 1 / (1 + math.exp(-(hi + pad)))
        return lo_t, hi_t

    # --- the forward process and the parametrisation (float32) ---------------------------------------------
    def prior(self, shape, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_1 = eps ~ N(0, I), float32 on the CPU."""
        return torch.randn(shape, generator=generator)

    def noisy(self, y: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) y + t eps."""
        t = precond._expand(t.to(torch.float32), y)
        return (1 - t) * y + t * eps

    def inputs(self, z: torch.Tensor, t: torch.Tensor, sigma_data: float | None = None):
        """(x_t, 4 t): the network sees x_t as it is, and a conditioning value that SigmaEmbedding's scale of
        250 turns into DiT's timestep 1000 t."""
        return z, 4.0 * t.to(torch.float32)

    def denoised(self, z, out, t, sigma_data: float | None = None) -> torch.Tensor:
        """D = the estimate of y from the network's output: x_t - t v, (x_t - t eps) / (1 - t), or x0."""
        t = precond._expand(t.to(torch.float32), z)
        if self.prediction == "velocity":
            return z - t * out
        if self.prediction == "epsilon":
            return (z - t * out) / (1 - t).clamp_min(_T_EPS)  # t = 1 holds no information about y
        return out

    def target(self, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output: v = eps - y, eps, or y."""
        return {"velocity": eps - y, "epsilon": eps, "x0": y}[self.prediction]

    def loss(self, z, out, y, eps, t, sigma_data: float | None = None, kernels: str = "auto"):
        """(loss, per_sample): the mean squared error of the output against its target (the training density
        is the weighting, as in SD3)."""
        per_sample = (out.float() - self.target(y, eps).float()).square().flatten(1).mean(1)
        return per_sample.mean(), per_sample

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "num_blocks": self.num_blocks,
            "partition": self.partition,
            "gamma": self.gamma,
            "mean": self.mean,
            "std": self.std,
            "shift": self.shift,
            "density": self.density,
            "prediction": self.prediction,
        }


# --- masking -----------------------------------------------------------------------------------------------
class Masking(_Levels):
    """MD4's masking level t in [t_min, 1] (alpha(t) = 1 - t), uniform: its ELBO integrates dt with the
    constant -alpha'(t) = 1, so the equal-mass partition is one of equal widths and block b owns
    [1 - (b+1)/B, 1 - b/B]. For training each interval is widened by gamma / B on both sides and clipped to
    [t_min, 1], which keeps the ELBO's weight 1/t finite. The task (tasks/masked_diffusion.py) does the
    masking itself: a discrete process has no Gaussian prior or preconditioning."""

    kind = "masking"

    def __init__(self, num_blocks: int, gamma: float = 0.05, t_min: float = 1e-3):
        """gamma = t_min = 0 gives the unwidened intervals that own t at evaluation and sampling."""
        _check(num_blocks, gamma)
        if not 0.0 <= t_min < 1.0:
            raise ValueError(f"t_min must be in [0, 1) (the lowest masking level trained at), got {t_min}")
        self.num_blocks, self.gamma, self.t_min = num_blocks, float(gamma), float(t_min)
        self.boundaries = tuple((num_blocks - i) / num_blocks for i in range(num_blocks + 1))

    def cdf(self, t) -> float | torch.Tensor:
        return t

    def icdf(self, q: torch.Tensor) -> torch.Tensor:
        return q.to(torch.float64)

    def interval(self, b: int) -> tuple[float, float]:
        self._check_block(b)
        n = self.num_blocks
        lo, hi = (n - b - 1) / n, (n - b) / n
        pad = self.gamma / n
        return max(self.t_min, lo - pad), min(1.0, hi + pad)

    def sample(self, b: int, n: int, generator=None, device=None) -> torch.Tensor:
        """n levels (float64) uniform on block b's widened interval, drawn per example."""
        lo, hi = self.interval(b)
        u = torch.rand(n, dtype=torch.float64, generator=generator, device=device)
        return lo + (hi - lo) * u

    def block_of(self, t) -> int | torch.Tensor:
        """floor((1 - t) B) clamped to [0, B - 1]: a t on a boundary 1 - b/B is the top of block b."""
        s = torch.as_tensor(t, dtype=torch.float64)
        blk = torch.floor((1.0 - s) * self.num_blocks).long().clamp_(0, self.num_blocks - 1)
        return int(blk) if blk.ndim == 0 and not isinstance(t, torch.Tensor) else blk

    def to_dict(self) -> dict:
        return {"kind": self.kind, "num_blocks": self.num_blocks, "gamma": self.gamma, "t_min": self.t_min}


_KINDS = {"edm": EDM, "flow": FlowMatching, "masking": Masking}
NoiseSchedule = EDM  # the name before there were other processes


def from_dict(d: dict) -> NoiseProcess:
    """The process `to_dict()` describes; a dict without "kind" (run folders before flow matching) is EDM."""
    d = dict(d)
    kind = d.pop("kind", "edm")
    if kind not in _KINDS:
        raise ValueError(f"unknown noise process {kind!r}; this version knows {sorted(_KINDS)}")
    return _KINDS[kind](**d)


def create(kind: str, num_blocks: int, noise) -> NoiseProcess:
    """The continuous process `kind` ("edm" or "flow") from a config.NoiseConfig."""
    if kind == "edm":
        return EDM(
            num_blocks,
            noise.partition,
            noise.gamma,
            noise.sigma_min,
            noise.sigma_max,
            noise.p_mean,
            noise.p_std,
        )
    if kind == "flow":
        return FlowMatching(
            num_blocks, noise.partition, noise.gamma, noise.flow_mean, noise.flow_std, noise.shift,
            noise.flow_density, noise.prediction,
        )  # fmt: skip
    raise ValueError(f"noise process must be 'edm' or 'flow', got {kind!r}")
