"""The learning-rate schedule: linear warm-up, then cosine decay, counted in a block's own steps.

Its own module so that everything that trains (the Trainer, and the end-to-end baselines in
`dblocks_fast.tasks.baseline`) follows one formula without the tasks importing the trainer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["lr_at"]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at a block's own step: linear warm-up to cfg.optimizer.lr, then cosine decay to
    cfg.optimizer.min_lr at cfg.steps_per_block."""
    o = cfg.optimizer
    if step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    progress = (step - o.warmup) / max(1, cfg.steps_per_block - o.warmup)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
