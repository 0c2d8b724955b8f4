"""What every task provides (`Task`), and what the tasks with discrete targets share.

`Task` is the interface the trainer, `BlockModel`, the samplers and the run folders use; it is written down
here once. `continuous_process` and `draw_rows` are what every task's `noise_process` and `loss` share.

Discrete targets (classification's labels, the autoregressive LM's bytes) share the frozen target table
and the weighted cross-entropy (`DiscreteTargetTask`, `label_table`, `validate_target_fields`), and the
inference that walks z down one block at a time with D = softmax(logits) @ E (`inference_sigmas`,
`resolve_sigmas`, `euler_step`).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .. import precond, samplers, schedule
from ..schedule import NoiseProcess

__all__ = [
    "Task",
    "check_protocol",
    "continuous_process",
    "layer_count",
    "draw_rows",
    "DiscreteTargetTask",
    "label_table",
    "validate_target_fields",
    "inference_sigmas",
    "resolve_sigmas",
    "discrete_inference",
    "euler_step",
]


class Task(Protocol):
    """A task: what the target y and the conditioning x are, the block network, its loss and its denoiser.

    The trainer, `BlockModel`, `dblocks_fast.sample` and the run folders use these members and nothing
    else. `cond` is the task's conditioning x (labels, images, byte windows, or None for an unconditional
    model). Tasks whose inference starts from Gaussian noise (image generation, classification, the
    autoregressive LM) also give `sample_shape(n)`, the shape of z for n examples, and `check_cond(cond)`,
    which raises a readable error for a conditioning the model cannot take.

    Dtypes and devices: a block's parameters are float32 (paging moves them as such; bf16 runs under
    autocast). Noise levels reach `loss` and `denoise` as float64 tensors of shape (N,) on the block's
    device: the task casts them (precond.inputs, the process's methods compute in float32). Batches are
    the dataset's tensors on the block's device.
    """

    kind: str  # the task's name in a run's manifest; tasks.task_from_dict rebuilds the task from it

    @property
    def num_layers(self) -> int:
        """L, the layers of the whole model, split over the blocks."""
        ...

    def to_dict(self) -> dict:
        """{"kind": kind, "config": the config as a dict}: what a run's manifest records."""
        ...

    def build_block(self, index: int, layers: range) -> nn.Module:
        """Block `index` with the model's layers `layers` (block b of a split gets [l_b, l_b+1)): everything
        it needs to denoise (DESIGN.md section 3), fp32 parameters only and no buffers (paging moves
        parameters). The caller seeds the global RNG."""
        ...

    def check_data(self, data) -> None:
        """Raise a ValueError that says what to change if `data` does not fit this task's config."""
        ...

    def noise_process(self, noise, num_blocks: int) -> NoiseProcess:
        """The noise process this task trains with, from a config.NoiseConfig (noise.process "auto" is the
        task's own); raises a ValueError naming the processes it supports."""
        ...

    def loss(
        self,
        block: nn.Module,
        batch: dict,
        level: torch.Tensor,
        generator: torch.Generator,
        rows: tuple[int, int] | None = None,
        *,
        process: NoiseProcess,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, per_sample) of one batch at per-example noise levels (N,) drawn by the caller from
        `process` (an EDM sigma, a flow or masking t).

        Every random draw comes from `generator`. rows=(start, total): `batch` and `level` are rows
        [start, start + N) of a batch of `total` examples (one rank's share in data-parallel training); the
        draws are made for all `total` rows and this share cut from them (`draw_rows`), so the ranks
        together compute the whole batch's step exactly (`dblocks_fast.testing.check_task` holds a task to
        it)."""
        ...

    def denoise(
        self, block: nn.Module, z: torch.Tensor, level: torch.Tensor, cond, *, process
    ) -> torch.Tensor:
        """The block's denoiser output D for noisy z at levels (N,) given `cond` (for continuous targets the
        estimate of y, which the samplers step with)."""
        ...

    def null_cond(self, cond):
        """The "no conditioning" counterpart of `cond` for classifier-free guidance; a task without an
        unconditional mode raises a ValueError that says so."""
        ...


_PROTOCOL = (
    "kind", "num_layers", "to_dict", "build_block", "check_data", "noise_process", "loss", "denoise",
    "null_cond",
)  # fmt: skip


def layer_count(layers: range | int) -> int:
    """How many layers a block gets: the built-in tasks build fresh layers, so only the count matters (an
    int is taken as a count, for code that builds a block by hand)."""
    return len(layers) if isinstance(layers, range) else int(layers)


def check_protocol(task) -> None:
    """Raise a TypeError naming every member of the Task protocol that `task` lacks, before any training."""
    missing = [m for m in _PROTOCOL if not hasattr(task, m)]
    if missing:
        raise TypeError(
            f"{type(task).__name__} is not a task: it lacks {', '.join(missing)} (see "
            f"dblocks_fast.tasks.base.Task; dblocks_fast.custom.CustomTask wraps a network of your own)"
        )


def continuous_process(task, noise, num_blocks: int, allowed=("edm",)) -> NoiseProcess:
    """`task`'s process from a config.NoiseConfig: noise.process ("auto" = the first of `allowed`) if the task
    supports it, else a ValueError that names what it supports."""
    kind = allowed[0] if noise.process == "auto" else noise.process
    if kind not in allowed:
        raise ValueError(
            f"the {task.kind} task trains with the {' or '.join(allowed)} noise process, not {kind!r}; "
            f"set noise.process (--noise) to {allowed[0]!r} or 'auto'"
        )
    return schedule.create(kind, num_blocks, noise)


def draw_rows(draw, rows: tuple[int, int] | None, n: int) -> torch.Tensor:
    """draw(total) for a whole batch of `total` examples, cut to this share's n rows [start, start + n): the
    one way tasks make random draws under data parallelism (see Task.loss)."""
    start, total = rows if rows is not None else (0, n)
    return draw(total)[start : start + n]


def label_table(num_classes: int, emb_dim: int, seed: int) -> torch.Tensor:
    """E: (num_classes, emb_dim) float32 rows ~ N(0, I) normalised to unit L2 norm, from a CPU generator
    seeded with `seed` alone, so it is bit-identical on every device, process and block."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    e = torch.randn(num_classes, emb_dim, generator=g, dtype=torch.float64)
    return (e / e.norm(dim=1, keepdim=True)).to(torch.float32)


def validate_target_fields(cfg) -> None:
    """The checks every DiscreteTargetTask config shares: the transformer's width and heads, the frozen target
    table (label_seed, label_scale), the loss (max_weight, sigma_data, prior_loss) and how z is read
    (likelihood_skip, z_input)."""
    if cfg.hidden % cfg.heads:
        raise ValueError(f"heads {cfg.heads} must divide hidden {cfg.hidden}")
    if cfg.mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be positive, got {cfg.mlp_ratio}")
    if cfg.label_seed < 0:
        raise ValueError(f"label_seed must be >= 0, got {cfg.label_seed}")
    if cfg.max_weight is not None and not cfg.max_weight > 0:
        raise ValueError(f"max_weight must be positive or None (no clamp), got {cfg.max_weight}")
    if not (cfg.label_scale > 0 and math.isfinite(cfg.label_scale)):
        raise ValueError(f"label_scale must be a finite value > 0, got {cfg.label_scale}")
    if cfg.sigma_data <= 0:
        raise ValueError(f"sigma_data must be positive, got {cfg.sigma_data}")
    name = type(cfg).__name__
    if not (cfg.likelihood_skip or cfg.z_input):
        raise ValueError(
            f"{name}: with likelihood_skip=False and z_input=False no block reads z; set z_input=True "
            "(F reads c_in z) or likelihood_skip=True (the logits add z's exact log-likelihood)"
        )
    if not (cfg.prior_loss >= 0 and math.isfinite(cfg.prior_loss)):
        raise ValueError(f"{name}.prior_loss must be a finite value >= 0, got {cfg.prior_loss}")
    if cfg.prior_loss and not cfg.likelihood_skip:
        raise ValueError(
            f"{name}.prior_loss trains F as the prior of the target given the condition, which it is only "
            "with likelihood_skip=True; set prior_loss=0 with likelihood_skip=False"
        )


class DiscreteTargetTask:
    """What the tasks with discrete targets share (classification, the autoregressive LM): y is a row of the
    frozen, seeded table E (num_targets x emb_dim, rows of length config.label_scale), the same for every
    block; the loss is the w(sigma)-weighted CE with w clamped at config.max_weight. A subclass sets `kind`
    and `num_targets` and gives `config` the fields num_layers, emb_dim, label_seed, label_scale, max_weight
    and sigma_data."""

    kind: str
    num_targets: int

    def __init__(self, config):
        self.config = config
        self.config.validate()
        self._tables: dict[torch.device, torch.Tensor] = {}  # E per device, made once

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def to_dict(self) -> dict:
        return {"kind": self.kind, "config": asdict(self.config)}

    def label_table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The frozen target table E on `device` (no gradient; not part of any block)."""
        device = torch.device(device)
        if device not in self._tables:
            cfg = self.config
            table = label_table(self.num_targets, cfg.emb_dim, cfg.label_seed) * cfg.label_scale
            self._tables[device] = table.to(device)
        return self._tables[device]

    def logits(self, block: nn.Module, z: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        """The head's logits over the targets for noisy targets z at sigma (N,), given the condition: the
        block is called as block(cond, c_noise, c_in z)."""
        return self.with_likelihood(self.network_logits(block, z, sigma, cond), z, sigma)

    def with_likelihood(self, f: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The logits from a block's own f: f + log p(z | target) (float32) under config.likelihood_skip,
        else f."""
        return f.float() + self.log_likelihood(z, sigma) if self.config.likelihood_skip else f

    def target_loss(self, f: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor, targets: torch.Tensor):
        """per_sample (N,): w(sigma) CE(logits) + prior_loss CE(f), each CE averaged over a sample's targets,
        from the block's own logits f (N, ..., num_targets) of the noisy targets z at sigma (N,); logits = f
        + log p(z | target) under the likelihood skip, else f. Both CEs are minimised by the same f (the
        prior of the target given the condition), so the prior's term changes no optimum: it gives f a
        gradient where z alone decides the target (tasks.autoregressive.model's docstring)."""
        f = f.float()
        n = f.shape[0]

        def ce(x):  # plain CE: a few hundred targets at most, and we need the per-sample means
            flat = F.cross_entropy(x.reshape(-1, x.shape[-1]), targets.reshape(-1), reduction="none")
            return flat.view(n, -1).mean(1)

        per_sample = self.loss_weight(sigma) * ce(self.with_likelihood(f, z, sigma))
        if self.config.prior_loss:
            per_sample = per_sample + self.config.prior_loss * ce(f)
        return per_sample

    def network_logits(self, block: nn.Module, z: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        """The block's own logits, block(cond, c_noise, c_in z): `logits` without the likelihood skip."""
        z_in, c_noise = precond.inputs(z, sigma, self.config.sigma_data)
        return block(cond, c_noise, z_in)

    def log_likelihood(self, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """log p(z | y = E_k) over the targets k, up to a constant in k: (z . E_k - |E_k|^2 / 2) / sigma^2
        (float32, (..., num_targets)), sigma (N,) against z (N, ..., emb_dim). The Bayes posterior of the
        target is softmax(prior logits + this), so a block whose logits add it needs only learn the prior
        (see `likelihood_skip`)."""
        table = self.label_table(z.device)
        s = sigma.to(torch.float32).reshape(-1, *([1] * (z.dim() - 1)))
        return (z.float() @ table.T - 0.5 * table.square().sum(1)) / s.square()

    def noise_process(self, noise, num_blocks: int) -> NoiseProcess:
        """EDM only: the loss weight w(sigma) and the target table's scale are EDM's."""
        return continuous_process(self, noise, num_blocks)

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """w(sigma) = 1 / c_out^2, clamped at config.max_weight (if set)."""
        w = precond.loss_weight(sigma, self.config.sigma_data)
        return w if self.config.max_weight is None else w.clamp(max=self.config.max_weight)


# --- inference of discrete targets --------------------------------------------------------------------------
def inference_sigmas(schedule, mode: str = "middle", num_steps: int | None = None) -> torch.Tensor:
    """The evaluation sigmas of classification.predict and the autoregressive LM (float64, decreasing,
    ending in 0).

    "middle": one per block: block 0 at sigma_max (where z starts), block b >= 1 at the geometric middle of
    its interval, sqrt(boundaries[b+1] * boundaries[b]). "boundary": EDM.grid(num_steps)
    (num_steps / B steps a block from its upper boundary down, as dblocks_fast.sample uses; default B).
    On digits (hidden 32, 6 layers, B=3, 300 steps a block) "middle" scored 0.65 +- 0.02 test accuracy over
    5 noise seeds against 0.54 for "boundary" with one step a block and 0.62 with 4: at the boundary a later
    block trusts the noisy label token most and sees the previous block's uncertain mixture D as a label.
    """
    if mode == "boundary":
        return schedule.grid(schedule.num_blocks if num_steps is None else num_steps)
    if mode != "middle":
        raise ValueError(f"sigmas must be 'middle', 'boundary' or a sequence of sigmas, got {mode!r}")
    if num_steps not in (None, schedule.num_blocks):
        raise ValueError(f"sigmas='middle' takes one step per block ({schedule.num_blocks}), got {num_steps}")
    bounds = schedule.boundaries
    mids = [math.sqrt(bounds[b] * bounds[b + 1]) for b in range(1, schedule.num_blocks)]
    return torch.tensor([schedule.sigma_max, *mids, 0.0], dtype=torch.float64)


def resolve_sigmas(schedule, sigmas, num_steps: int | None = None) -> torch.Tensor:
    """`sigmas` as a float64 tensor: a mode of inference_sigmas ("middle", "boundary") or a sequence, which
    must decrease and end in 0."""
    if isinstance(sigmas, str):
        sigmas = inference_sigmas(schedule, sigmas, num_steps)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2 or sigmas[-1] != 0 or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"sigmas must decrease and end in 0, got {sigmas.tolist()}")
    return sigmas


@torch.no_grad()
def discrete_inference(model, z: torch.Tensor, sigmas: torch.Tensor, cond) -> torch.Tensor:
    """The inference of a discrete-target task (DiscreteTargetTask.logits): the samplers' Euler loop
    (samplers.sample_euler) from z down `sigmas`, each step by the block that owns its sigma, with
    D = softmax(logits) @ E; returns the last step's logits (float32), whose argmax is the prediction."""
    task, dev = model.task, z.device
    table = task.label_table(dev)
    last = []

    def denoiser(x, sigma):
        s = float(sigma[0])
        with model.block(model.schedule.block_of(s)) as module:  # a StreamedBlockModel streams it in
            logits = task.logits(module, x, torch.full((x.shape[0],), s, device=dev), cond)
        last[:] = [logits]
        return logits.float().softmax(-1) @ table

    model.eval()
    samplers.sample_euler(denoiser, z, sigmas)
    return last[0].float()


def euler_step(z: torch.Tensor, d: torch.Tensor, s: float, s_next: float) -> torch.Tensor:
    """One Euler step of the probability-flow ODE from sigma s to s_next, z' = z + (s_next - s)(z - D)/s,
    with the denoiser output d = D; the last step (s_next = 0) returns D itself."""
    return d if s_next == 0 else z + (s_next - s) * ((z - d) / s)
