"""The learning-rate schedule: linear warm-up, then cosine decay, counted in a block's own steps.

Its own module so that everything that trains (the Trainer, and the end-to-end baselines in
`dblocks_fast.tasks.baseline`) follows one formula without the tasks importing the trainer.
"""

from __future__ import annotations

import math
from typing import Protocol

__all__ = ["lr_at"]


class _Schedule(Protocol):
    """The fields of TrainConfig the schedule reads."""

    lr: float  # peak learning rate
    min_lr: float  # learning rate at the end of the cosine decay
    warmup: int  # steps of linear warm-up
    steps_per_block: int  # steps of one block (the decay ends there)


def lr_at(step: int, cfg: _Schedule) -> float:
    """Learning rate at a block's own step: linear warm-up to lr, then cosine decay to min_lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps_per_block - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
