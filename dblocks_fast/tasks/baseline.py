"""The end-to-end baselines' training loop: the plain model (all L layers) trained with ordinary backprop.

The classification and language-model baselines share it, so both are trained exactly as a DiffusionBlocks
block is: steps_per_block steps (equal total layer evaluations: B blocks x steps x L/B layers = L x steps),
the TrainConfig's batch size, AdamW settings, warm-up + cosine learning rate, gradient clipping, device and
seed, and batches drawn as the Trainer draws block 0's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .. import rng
from ..data import training_batch
from ..lr import lr_at

__all__ = ["train_end_to_end"]


def train_end_to_end(
    make_model: Callable[[], nn.Module], data, config, loss_fn: Callable[[nn.Module, dict], torch.Tensor]
) -> nn.Module:
    """Build make_model() from the seed of block 0's initialisation and train it for config.steps_per_block
    steps of loss_fn(model, batch) (batch: data.batch(indices), already on the device); returns it in eval
    mode."""
    config.validate()
    device = config.runtime.device
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    n, bs = len(data), config.batch_size
    if bs > n:
        raise ValueError(
            f"batch_size {bs} is larger than the training set ({n} examples); lower --batch-size"
        )
    o = config.optimizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng.derive_seed(config.seed, rng.INIT, 0))
        model = make_model().to(dev)
    opt = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay
    )
    per_epoch = n // bs
    perm_epoch, perm = None, None
    model.train()
    for step in range(config.steps_per_block):
        epoch, j = divmod(step, per_epoch)
        if epoch != perm_epoch:
            perm_epoch, perm = (
                epoch,
                torch.randperm(n, generator=rng.generator("cpu", config.seed, rng.DATA, 0, epoch)),
            )
        batch = training_batch(data, perm[j * bs : (j + 1) * bs], config.seed, 0, step)
        batch = {k: v.to(dev) for k, v in batch.items()}
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config)
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip or math.inf)
        opt.step()
    return model.eval()
