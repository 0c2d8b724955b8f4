"""Counter-based random streams: every random draw of training is a pure function of (seed, stream, block,
step), so blocks trained in any order, on any process, or resumed from a checkpoint see the same numbers,
and a checkpoint has no generator state to carry (DESIGN.md section 3)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["INIT", "TRAIN", "DATA", "ORDER", "SAMPLE", "EVAL", "WINDOW", "derive_seed", "generator"]

# stream ids: one per use, so no two uses ever share numbers
INIT, TRAIN, DATA, ORDER, SAMPLE, EVAL, WINDOW = range(7)  # WINDOW: training windows' random offsets


def derive_seed(*parts: int) -> int:
    """A 63-bit seed hashed from non-negative integers (numpy's SeedSequence: well mixed and stable)."""
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1])) & ((1 << 63) - 1)


def generator(device: torch.device | str, *parts: int) -> torch.Generator:
    """A torch.Generator on `device` seeded with derive_seed(*parts)."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g
