"""Checks a user can run on a task of their own before training it (`check_task`).

The trainer relies on a few promises that a type checker cannot see: a block holds fp32 parameters and no
buffers (paging moves parameters), the data fits (`check_data`; for a CustomTask that includes a block's
output having its input's shape), and the loss draws its randomness for the whole batch and cuts the rows it
is given, so that data-parallel ranks together compute exactly the single-process step. `check_task` tries
each on a few examples on the CPU and raises an AssertionError that says which promise failed and how to
keep it.
"""

from __future__ import annotations

import torch

from .config import NoiseConfig
from .model import build_block
from .tasks.base import check_protocol

__all__ = ["check_task"]


def check_task(task, data, noise: NoiseConfig | None = None, examples: int = 4, seed: int = 0) -> None:
    """Raise if `task` breaks a promise the trainer relies on (see the module docstring).

    Args:
        task: the task (for a network of your own: dblocks_fast.CustomTask).
        data: a few examples of the training data (anything with len() and batch(indices)).
        noise: the noise settings to check with (default: the task's own process).
        examples: how many examples of `data` to use (at least 2).
    """
    check_protocol(task)
    task.check_data(data)
    n = min(examples, len(data))
    assert n >= 2, "check_task needs at least 2 examples of data"
    process = task.noise_process(noise or NoiseConfig(), 1)
    block = build_block(task, 0, range(task.num_layers), seed).eval()  # eval: the same function twice
    dtypes = {p.dtype for p in block.parameters()}
    assert dtypes == {torch.float32}, (
        f"a block's parameters must be float32 (bf16 runs under autocast): {dtypes}"
    )
    buffers = [name for name, _ in block.named_buffers()]
    assert not buffers, (
        f"a block may hold parameters only (paging moves parameters), it has buffers {buffers}"
    )
    batch = data.batch(torch.arange(n))
    level = process.sample(0, n, torch.Generator().manual_seed(seed))
    half = n // 2

    def loss(lo, hi, rows):
        part = {k: v[lo:hi] for k, v in batch.items()}
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return task.loss(block, part, level[lo:hi], g, rows=rows, process=process)

    whole, per_sample = loss(0, n, None)
    shape = tuple(per_sample.shape)
    assert torch.isfinite(whole) and shape == (n,), (
        f"the loss must return (a finite scalar, one value per example), got {whole} and {shape}"
    )
    shares = torch.cat([loss(0, half, (0, n))[1], loss(half, n, (half, n))[1]])
    assert torch.allclose(shares, per_sample, rtol=1e-5, atol=1e-6), (
        "the loss of rows [start, start + k) of a batch of `total` (rows=(start, total)) differs from those "
        "rows of the whole batch's loss: draw every random number for all `total` rows and cut this share "
        "from them (dblocks_fast.tasks.base.draw_rows), or data-parallel ranks will not compute the "
        "single-process step"
    )
