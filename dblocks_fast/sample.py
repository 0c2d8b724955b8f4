"""Sampling a trained model: `sample()` wires a BlockModel, its noise process and classifier-free guidance
to the samplers of `samplers.py` (Euler and Heun, for EDM and flow matching alike); `load()` rebuilds a
model from its run folder (DESIGN.md section 2)."""

from __future__ import annotations

import math
import os
import warnings

import torch

from . import checkpoint, devices, rng
from .config import TrainConfig
from .model import BlockModel, layer_ranges
from .samplers import SAMPLERS, sample_euler, sample_heun
from .tasks import task_from_dict

__all__ = ["sample_euler", "sample_heun", "SAMPLERS", "guided", "load", "sample"]


def guided(model: BlockModel, cfg_scale: float):
    """denoiser(x, sigma, cond) of `model` with classifier-free guidance D_u + s (D_c - D_u)."""

    def denoiser(x, sigma, cond):
        if cfg_scale == 1.0:
            return model.denoise(x, sigma, cond)
        both = model.denoise(
            torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, model.task.null_cond(cond)])
        )
        d_cond, d_uncond = both.chunk(2)
        return d_uncond + cfg_scale * (d_cond - d_uncond)

    return denoiser


def load(run_dir: str | os.PathLike, device=None, kernels: str = "auto") -> BlockModel:
    """The trained BlockModel saved in a run folder (every block's latest checkpoint)."""
    device = devices.resolve(device)  # a machine without it is told so before the blocks are read
    run = checkpoint.RunFolder(run_dir)
    manifest = run.read_manifest()
    task = task_from_dict(manifest["task"])
    layers = manifest["layers"]
    # the task says which process its settings give (an older masked-diffusion run recorded an EDM schedule)
    process = task.noise_process(TrainConfig.from_dict(manifest["train"]).noise, len(layers))
    blocks = []
    for b, r in enumerate(layer_ranges(layers)):
        block = task.build_block(b, r)
        checkpoint.load_block_state(block, run.read_block(b))
        blocks.append(block)
    if not manifest.get("complete"):
        steps = [e["steps"] for e in manifest["blocks"]]
        warnings.warn(
            f"{run_dir} is not finished (block steps {steps}); using its partly trained blocks", stacklevel=2
        )
    model = BlockModel(task, process, layers, blocks).to(device).set_kernels(kernels)
    return model.eval()


def sample(
    run_or_model,
    labels,
    num_steps: int | None = None,
    sampler: str = "euler",
    cfg_scale: float = 1.0,
    seed: int = 0,
    device=None,
    callback=None,
) -> torch.Tensor:
    """Generate one sample per label with a trained model (or the run folder holding one).

    Args:
        run_or_model: a BlockModel, or the path of a run folder.
        labels: class labels, a sequence of ints or a LongTensor (N,).
        num_steps: denoiser steps, a multiple of B (each block takes num_steps / B); None = 30 rounded up.
        sampler: "euler" or "heun" (Heun takes 2 * num_steps - 1 network calls).
        cfg_scale: classifier-free guidance scale; 1.0 = no guidance (one network call per step).
        seed: seeds the initial noise (the process's prior: EDM's N(0, sigma_max^2 I), flow's N(0, I)).
    Returns:
        (N, ...) samples on the model's device, float32.
    """
    model = run_or_model if isinstance(run_or_model, BlockModel) else load(run_or_model, device)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    b = model.num_blocks
    num_steps = num_steps if num_steps is not None else b * math.ceil(30 / b)
    dev = model.device
    labels = torch.as_tensor(labels, dtype=torch.long).to(dev)
    if labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(
            f"labels must be a non-empty 1-D sequence of class indices, got shape {tuple(labels.shape)}"
        )
    model.task.check_cond(labels)
    sigmas = model.schedule.grid(num_steps)
    g = rng.generator("cpu", seed, rng.SAMPLE)
    x = model.schedule.prior(model.task.sample_shape(labels.numel()), g)  # z at the noisiest level
    model.eval()
    return SAMPLERS[sampler](guided(model, cfg_scale), x.to(dev), sigmas, {"cond": labels}, callback)
