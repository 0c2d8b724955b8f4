"""Block-parallel training over torch.distributed, and merging runs that trained disjoint blocks.

Blocks are independent (DESIGN.md section 3), so B blocks train at once on B processes with nothing sent
between them. With world size W and K blocks to train (all B, or `only_blocks`):

- W >= K (W a multiple of K): block i is owned by the W/K consecutive ranks [i*W/K, (i+1)*W/K). Inside that
  group the block's gradients are averaged with one all-reduce per step (plain data parallelism); every rank
  of the group draws the same random numbers for the whole batch and computes its own rows of it, so the
  group computes exactly the single-process step up to the rounding of the all-reduce.
- W < K: each rank owns K/W blocks (as evenly as they split), trained one after another, alone.

Across groups nothing is sent while training. At a checkpoint the ranks exchange a few hundred bytes of
metadata (which file each block was written to) on a gloo group, and rank 0 writes the manifest once every
block file is on disk. The run folder is the same as a single process would write, so `sample`, `eval` and
`resume` work on it with any world size.

Runs that trained disjoint blocks on machines with no network between them (`--only-blocks`) are combined
by `checkpoint.merge_runs`.
"""

from __future__ import annotations

import datetime
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from . import devices

__all__ = [
    "Comm",
    "DistributedError",
    "Placement",
    "connect",
    "place",
    "TIMEOUT_ENV",
]

TIMEOUT_ENV = "DBLOCKS_DIST_TIMEOUT_S"  # how long a rank waits for the others at a checkpoint
# blocks of unequal depth finish at different times; a rank that dies is seen at once, not after this
_DEFAULT_TIMEOUT_S = 6 * 3600


class DistributedError(RuntimeError):
    """A rank stopped, died or cannot reach the others; the last complete checkpoint is still valid."""


@dataclass(frozen=True)
class Placement:
    """Which blocks a rank trains and with whom."""

    rank: int
    world: int
    blocks: tuple[int, ...]  # the blocks this rank trains
    group: tuple[int, ...]  # the ranks that train the same block(s), this one included (data parallel)
    groups: tuple[tuple[int, ...], ...] = field(default=(), repr=False)  # every group, in block order

    @property
    def leader(self) -> bool:
        """The group's first rank writes the group's checkpoint files and metric lines."""
        return self.rank == self.group[0]

    def rows(self, batch_size: int) -> tuple[int, int]:
        """This rank's rows [start, stop) of a block's batch (the group splits every batch evenly)."""
        n = batch_size // len(self.group)
        i = self.group.index(self.rank)
        return i * n, (i + 1) * n


def place(world: int, rank: int, blocks: Sequence[int]) -> Placement:
    """Assign `blocks` to the ranks of a world of size `world` (see the module docstring)."""
    blocks = list(blocks)
    k = len(blocks)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of size {world}")
    if k == 0:
        raise ValueError("no blocks to train")
    if world >= k:
        if world % k:
            raise ValueError(
                f"world size {world} cannot be split evenly over {k} blocks: use a world size that divides "
                f"{k} or is a multiple of it (e.g. {k} or {2 * k} processes), or change --blocks"
            )
        per = world // k
        groups = tuple(tuple(range(i * per, (i + 1) * per)) for i in range(k))
        i = rank // per
        return Placement(rank, world, (blocks[i],), groups[i], groups)
    split = np.array_split(np.array(blocks), world)  # the first k % world ranks get one block more
    groups = tuple((r,) for r in range(world))
    return Placement(rank, world, tuple(int(b) for b in split[rank]), (rank,), groups)


class Comm:
    """What a trainer needs from its peers. This base class is the single process: nothing to send.

    Every call counts the bytes it sends, by kind, in `sent`: "group" (gradients inside a block's group),
    "between_groups" (tensors from one block's group to another: none, ever) and "control" (checkpoint
    metadata and barriers, never during a step).
    """

    distributed = False

    def __init__(self, placement: Placement):
        self.placement = placement
        self.sent = {"group": 0, "between_groups": 0, "control": 0}

    @property
    def rank(self) -> int:
        return self.placement.rank

    @property
    def world(self) -> int:
        return self.placement.world

    def average_grads(self, params) -> None:
        """Average the gradients of `params` over this rank's group (in place)."""

    def average_scalars(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of a small tensor over this rank's group (used for logged metrics only)."""
        return t

    def all_gather(self, obj, what: str) -> list:
        """Every rank's `obj` (a small picklable), in rank order."""
        return [obj]

    def barrier(self, what: str) -> None:
        pass

    def close(self) -> None:
        pass


class _TorchComm(Comm):
    distributed = True

    def __init__(self, placement: Placement, owns_pg: bool, timeout: datetime.timedelta):
        super().__init__(placement)
        self._owns_pg = owns_pg
        # every rank must create every group, in the same order
        self._group_pg = None
        for ranks in placement.groups:
            pg = dist.new_group(list(ranks)) if len(ranks) > 1 else None
            if ranks == placement.group:
                self._group_pg = pg
        # checkpoint metadata goes through gloo whatever the gradient backend (NCCL cannot send objects
        # without a device), and gloo reports a peer that died instead of waiting for it
        if dist.get_backend() == "gloo":
            self._control = None
        else:
            self._control = dist.new_group(backend="gloo", timeout=timeout)

    def _call(self, what: str, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except (RuntimeError, ConnectionError) as e:  # DistBackendError and gloo's errors are RuntimeErrors
            raise DistributedError(
                f"rank {self.rank}/{self.world}: {what} failed, so another rank has stopped, died or cannot "
                f"be reached (see that rank's own error above). Checkpoints already written stay valid: "
                f"resume with --resume once the cause is fixed. [{type(e).__name__}: {e}]"
            ) from e

    def average_grads(self, params):
        if self._group_pg is None:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._call("the gradient all-reduce", dist.all_reduce, flat, group=self._group_pg)
        self.sent["group"] += flat.numel() * flat.element_size()
        flat.div_(len(self.placement.group))
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def average_scalars(self, t):
        if self._group_pg is None:
            return t
        t = t.clone()
        self._call("the metric all-reduce", dist.all_reduce, t, group=self._group_pg)
        self.sent["group"] += t.numel() * t.element_size()
        return t / len(self.placement.group)

    def all_gather(self, obj, what):
        out = [None] * self.world
        self._call(what, dist.all_gather_object, out, obj, group=self._control)
        self.sent["control"] += len(pickle.dumps(obj))
        return out

    def barrier(self, what):
        self._call(what, dist.barrier, group=self._control)

    def close(self):
        if self._owns_pg and dist.is_initialized():
            dist.destroy_process_group()


def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def connect(mode: str, blocks: Sequence[int], device: str) -> tuple[Comm, torch.device]:
    """The Comm of this process and its device.

    mode "auto" joins torch.distributed when it is already initialised or the process was started by torchrun
    (WORLD_SIZE > 1), "on" requires that, "off" trains alone whatever the environment says.
    device "auto" is cuda:LOCAL_RANK under torchrun on a GPU machine, else cuda or cpu.
    """
    started = dist.is_available() and dist.is_initialized()
    if mode == "off" or (mode == "auto" and not started and _env_world() <= 1):
        return Comm(place(1, 0, blocks)), _device(device, None)
    if not dist.is_available():
        raise DistributedError("this build of torch has no torch.distributed; train with distributed='off'")
    if not started and "MASTER_ADDR" not in os.environ:
        raise ValueError(
            "distributed='on' needs torchrun (or RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the "
            "environment), e.g. torchrun --nproc-per-node 2 -m dblocks_fast.cli train ..."
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device(device, local_rank)
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, _DEFAULT_TIMEOUT_S)))
    if not started:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timeout, **kw)
    world, rank = dist.get_world_size(), dist.get_rank()
    try:
        placement = place(world, rank, blocks)
    except ValueError:
        if not started:
            dist.destroy_process_group()
        raise
    return _TorchComm(placement, owns_pg=not started, timeout=timeout), dev


def _device(name: str, local_rank: int | None) -> torch.device:
    dev = devices.resolve(name, local_rank)  # a ValueError that says what to use, before anything runs
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev
