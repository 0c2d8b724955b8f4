"""A DiffusionBlocks model: a task, a noise schedule and B independent blocks."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import rng
from .nn import set_kernels
from .schedule import NoiseProcess

__all__ = ["AbsentBlock", "BlockModel", "PagedOutBlock", "split_layers", "layer_ranges", "build_block"]


def split_layers(
    num_layers: int, num_blocks: int, layers: list[int] | tuple[int, ...] | None = None
) -> list[int]:
    """Layers per block: L/B each, or an explicit list that must sum to L."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if layers is not None:
        layers = [int(n) for n in layers]
        if len(layers) != num_blocks:
            raise ValueError(f"layers={layers} gives {len(layers)} blocks but num_blocks={num_blocks}")
        if any(n < 1 for n in layers):
            raise ValueError(f"layers={layers}: every block needs at least one layer")
        if sum(layers) != num_layers:
            raise ValueError(
                f"layers={layers} sums to {sum(layers)}, but the model has {num_layers} layers; give a list "
                f"that sums to {num_layers}"
            )
        return layers
    if num_blocks > num_layers:
        raise ValueError(
            f"num_blocks={num_blocks} is larger than the number of layers ({num_layers}); "
            f"every block needs at "
            f"least one layer: use num_blocks <= {num_layers} or a deeper model"
        )
    if num_layers % num_blocks:
        even = [num_layers // num_blocks + (i < num_layers % num_blocks) for i in range(num_blocks)]
        raise ValueError(
            f"{num_layers} layers do not split evenly into {num_blocks} blocks; pass an explicit list, e.g. "
            f"layers={even} (--layers {','.join(map(str, even))})"
        )
    return [num_layers // num_blocks] * num_blocks


def layer_ranges(layers: list[int]) -> list[range]:
    """The layers each block owns, from its layer counts: block b owns [l_b, l_b+1) of the L layers."""
    out, start = [], 0
    for n in layers:
        out.append(range(start, start + n))
        start += n
    return out


def build_block(task, index: int, layers: range, seed: int) -> nn.Module:
    """Block `index` with the model's layers `layers`, initialised from its own seed on the CPU, so its
    initial weights do not depend on the device, on the other blocks, or on the order they are built in."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng.derive_seed(seed, rng.INIT, index))
        return task.build_block(index, layers)


class AbsentBlock(nn.Module):
    """The place of a block this process does not hold (another rank or run trains it): no tensors at all."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            f"block {self.index} is not held by this process (it is trained elsewhere); load the "
            f"finished run folder to use the whole model"
        )


class PagedOutBlock(AbsentBlock):
    """The place of a block that training with offload="disk" left on disk: load the run folder to use it."""

    def __init__(self, index: int, run_dir=None):
        super().__init__(index)
        self.run_dir = run_dir

    def forward(self, *args, **kwargs):
        where = f"dblocks_fast.load({str(self.run_dir)!r})" if self.run_dir else "a run with out_dir set"
        raise RuntimeError(
            f"block {self.index} was trained with offload='disk' and stays on disk; use {where} (it needs "
            f"the whole model in memory) or paging.StreamedBlockModel to sample"
        )


class BlockModel(nn.Module):
    """The B blocks with their noise process (`schedule`, a schedule.NoiseProcess); `denoise` routes each
    noise level to the block that owns it, and `block(b)` lends block b's module for a while."""

    def __init__(self, task, schedule: NoiseProcess, layers: list[int], blocks: list[nn.Module]):
        super().__init__()
        if len(blocks) != schedule.num_blocks or len(layers) != schedule.num_blocks:
            raise ValueError(
                f"{len(blocks)} blocks and {len(layers)} layer counts for {schedule.num_blocks} blocks"
            )
        self.task = task
        self.schedule = schedule
        self.layers = list(layers)
        self.blocks = nn.ModuleList(blocks)

    @classmethod
    def create(cls, task, schedule: NoiseProcess, layers: list[int], seed: int, only=None) -> BlockModel:
        """The B blocks, each from its own seed; with `only`, the other blocks are AbsentBlock placeholders
        (never built, so they cost no memory and no time)."""
        blocks = [
            build_block(task, b, r, seed) if only is None or b in only else AbsentBlock(b)
            for b, r in enumerate(layer_ranges(layers))
        ]
        return cls(task, schedule, layers, blocks)

    @property
    def num_blocks(self) -> int:
        return self.schedule.num_blocks

    def set_kernels(self, kernels: str) -> BlockModel:
        set_kernels(self, kernels)
        return self

    @torch.no_grad()
    def denoise(self, z: torch.Tensor, level: torch.Tensor, cond, block: int | None = None) -> torch.Tensor:
        """D(z, level, cond) by the block owning the noise levels (N,) (all of them in one block), or by
        `block`.

        Give the levels as a float64 CPU tensor (the samplers do): the block is then chosen without a device
        sync.
        """
        if block is None:
            # block_of is monotone in the level, so the extremes tell whether one block owns them all
            ends = torch.stack([level.max(), level.min()]).detach().double().cpu()
            first, last = self.schedule.block_of(ends).tolist()
            if first != last:
                raise ValueError(f"levels span blocks {first}..{last}; denoise one block's levels at a time")
            block = first
        with self.block(block) as module:
            return self.task.denoise(module, z, level.to(z.device), cond, process=self.schedule)

    @contextlib.contextmanager
    def block(self, b: int):
        """`with model.block(b) as module:` block b's module, on the model's device for the `with`. A model
        that keeps its blocks elsewhere (paging.StreamedBlockModel) copies it in on entry and may reuse its
        memory once the work queued inside has run; a task's own inference loops use this, never
        model.blocks[b], so they stream too."""
        yield self.blocks[b]

    @property
    def device(self) -> torch.device:
        """Where the blocks compute (the device of the first parameter)."""
        return next(self.parameters()).device

    def extra_repr(self) -> str:
        return f"task={self.task.kind}, layers={self.layers}, schedule={self.schedule!r}"
