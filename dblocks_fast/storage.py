"""Where a block's weights and AdamW moments live while it trains, and while the other blocks train.

One protocol, `BlockStorage`, and one implementation per tier, built by `create(tier, ...)`:

  "none"  `ResidentStorage`: every block on the device, its AdamW packed flat (the default).
  "host"  `HostStorage`: inactive blocks in host memory (pinned at their exact size on CUDA).
  "disk"  `DiskStorage`: inactive blocks in safetensors files; host memory holds at most the two slots.

A paged block's parameters and both moments are one flat fp32 buffer laid out by `optim.FlatLayout`,
followed by the raw bytes of its frozen parameters (a LoRA block's base weights, in their own dtypes); the
module's parameters, the optimizer's state and the frozen weights are views of whichever copy is current,
so paging a block in is one copy. The frozen region never changes: it is never written back (the disk tier
writes it once, to its own file). Two device slots hold the active block and the next one, which `prefetch`
loads while the active one trains. The difference between a CPU and a CUDA device (plain copies, or copy
streams ordered by events) lives in one small copier, `_Copier` / `_CudaCopier`; the difference between
host and disk lives in the two subclasses of `_PagedStorage`. The trainer calls only the protocol: it never
asks which tier it has.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
import weakref
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .optim import AdamW, FlatLayout, frozen, trained
from .paging import _pin, _unregister

__all__ = ["TIERS", "BlockStorage", "DiskStorage", "HostStorage", "ResidentStorage", "create", "needs"]

TIERS = ("none", "host", "disk")


class BlockStorage(Protocol):
    """Where the blocks' flat state lives. Every method takes a block index; a block must be `add`ed first.

    tier: "none", "host" or "disk". prefetches: whether `prefetch` does anything (the trainer then tells it
    what comes next). bytes_in, bytes_out: bytes copied to and from the device so far.
    """

    tier: str
    prefetches: bool

    def add(self, b: int, block: nn.Module, optimizer) -> None:
        """Take block b (its module on the CPU, fp32) and its optimizer (an `optim.AdamW`, or any torch
        optimizer with AdamW's state); from now on the storage decides where they are."""

    def activate(self, b: int) -> None:
        """Make block b trainable on the device: its parameters and moments are device tensors until the next
        activate of another block."""

    def prefetch(self, b: int, active: int) -> None:
        """Start bringing block b to the device while block `active` trains (a hint; may do nothing)."""

    def tensors(self, b: int) -> dict[str, torch.Tensor]:
        """Block b's parameters and moments as named CPU tensors (the checkpoint format), wherever it is."""

    def load(self, b: int, tensors: dict[str, torch.Tensor], steps: int) -> None:
        """Put checkpointed weights and moments (the `tensors` format) into block b, taken `steps` steps."""

    def release(self, model, run=None) -> None:
        """Training is over: bring every block home and leave `model` usable where it can be. `run`: the
        checkpoint.RunFolder whose last commit holds every block, if any (the storage may drop its copies)."""


def create(
    tier: str,
    device: torch.device,
    *,
    folder: Path | None = None,
    prefetch: bool = True,
    numels: list[int] | None = None,
    frozen: list[int] | None = None,
) -> BlockStorage:
    """The storage for `tier` on `device`. folder: where the disk tier keeps its files (None: a temporary
    folder). numels: the trained parameter counts of the blocks it will hold, frozen: their frozen parameters'
    bytes; the paged tiers then refuse, before anything is allocated, a model that does not fit
    (`preflight`)."""
    if tier not in TIERS:
        raise ValueError(f"offload must be one of {TIERS}, got {tier!r}")
    device = torch.device(device)
    if tier == "none":
        return ResidentStorage(device)
    cls = HostStorage if tier == "host" else DiskStorage
    if numels:
        probe = folder if folder is not None else Path(tempfile.gettempdir())
        preflight(tier, numels, device, probe if tier == "disk" else None, frozen=frozen)
    return cls(device, folder=folder, prefetch=prefetch)


# --- resident ----------------------------------------------------------------------------------------------
class ResidentStorage:
    """Every block on the device for the whole run; each AdamW packs its block into one flat buffer."""

    tier = "none"
    prefetches = False

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.blocks: dict[int, tuple[nn.Module, torch.optim.Optimizer]] = {}
        self.bytes_in = self.bytes_out = 0  # nothing ever moves

    def add(self, b: int, block: nn.Module, optimizer) -> None:
        block.to(self.device)  # in place: the optimizer's parameters are the module's
        if isinstance(optimizer, AdamW):  # [param | exp_avg | exp_avg_sq] on the device: one fused kernel
            optimizer.pack()
        self.blocks[b] = (block, optimizer)

    def activate(self, b: int) -> None:
        pass

    def prefetch(self, b: int, active: int) -> None:
        pass

    def tensors(self, b: int) -> dict[str, torch.Tensor]:
        from .checkpoint import block_state

        return block_state(*self.blocks[b])

    def load(self, b: int, tensors: dict[str, torch.Tensor], steps: int) -> None:
        from .checkpoint import load_block_state

        block, optimizer = self.blocks[b]
        load_block_state(block, tensors, optimizer, steps)

    def release(self, model, run=None) -> None:
        pass


# --- the copier: CPU or CUDA -------------------------------------------------------------------------------
class _Slot:
    """A device buffer that holds one paged block at a time, with the events that order copies into it."""

    def __init__(self, buf: torch.Tensor):
        self.buf = buf
        self.block: _Paged | None = None
        self.ready: torch.cuda.Event | None = None  # its page-in copy is done
        self.free: torch.cuda.Event | None = None  # its page-out copy (and every reader) is done
        self.used: torch.cuda.Event | None = None  # after the last kernel of its block's last turn as active


class _Copier:
    """Copies between host memory and device slots on a CPU device: plain synchronous copies, no events.

    On a CPU the same paging code runs as on a GPU, so the tests can hold that every tier gives the same bits.
    """

    cuda = False
    pinned = False  # host buffers are pinned (CUDA only)

    def __init__(self, device: torch.device):
        self.device = device

    def slot(self, size: int) -> _Slot:
        return _Slot(torch.empty(size, dtype=torch.float32, device=self.device))

    def host_buffer(self, size: int) -> torch.Tensor:
        """`size` fp32 of host memory that lives as long as the storage (on CUDA: pinned, exact size)."""
        return torch.empty(size, dtype=torch.float32)

    def to_slot(self, slot: _Slot, src: torch.Tensor, slots: list[_Slot]) -> None:
        """Copy `src` (host) into the front of the slot."""
        slot.buf[: src.numel()].copy_(src)

    def read_into_slot(self, slot: _Slot, n: int, read, slots: list[_Slot]) -> None:
        """Fill the slot's first n elements by `read(host_tensor)`: straight into the slot, no second copy."""
        read(slot.buf[:n])

    def to_host(self, slot: _Slot, dst: torch.Tensor, active: bool) -> None:
        """Copy the slot's first dst.numel() elements back to `dst` (host)."""
        dst.copy_(slot.buf[: dst.numel()])

    def turn_over(self, slot: _Slot) -> None:
        """The slot's block stops being the active one: every kernel of its turn is queued by now."""

    def wait_ready(self, slot: _Slot) -> None:
        """Make the compute stream wait for the slot's page-in copy."""

    def sync(self) -> None:
        """Wait for every copy in flight."""


class _CudaCopier(_Copier):
    """Copies on two side streams, one each way, ordered against the compute stream by events.

    Page-in goes on `h2d` after the slot's previous block has left it (and after any write-back of this
    block has landed); write-back goes on `d2h` and waits only for the kernels of its own block's turn, so it
    overlaps the next block's step. Host buffers are pinned at their exact size (cudaHostRegister; torch's
    pinned allocator would round each up to a power of two); if pinning fails, a warning says so and the
    copies run from pageable memory.
    """

    cuda = True

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.h2d, self.d2h = torch.cuda.Stream(device), torch.cuda.Stream(device)
        self.pinned = True
        self.registered: list[int] = []  # host buffers pinned with cudaHostRegister
        self._staging: torch.Tensor | None = None  # where a paged file is read to
        self._staging_free: torch.cuda.Event | None = None
        # unpin when the storage goes; the memory itself stays valid (pageable) for views that outlive it
        weakref.finalize(self, _unregister, self.registered)

    def slot(self, size: int) -> _Slot:
        slot = super().slot(size)
        # the memory may have been freed by kernels still queued on the compute stream: the first copy into
        # it waits for them; and when the slot goes, the allocator waits for the copy streams
        slot.free = torch.cuda.Event()
        slot.free.record(torch.cuda.current_stream(self.device))
        for stream in (self.h2d, self.d2h):
            slot.buf.record_stream(stream)
        return slot

    def host_buffer(self, size: int) -> torch.Tensor:
        buf = torch.empty(size, dtype=torch.float32)
        if self.pinned:
            if _pin(buf, stacklevel=4):
                self.registered.append(buf.data_ptr())
            else:
                self.pinned = False
        return buf

    def to_slot(self, slot: _Slot, src: torch.Tensor, slots: list[_Slot]) -> None:
        with torch.cuda.stream(self.h2d):
            if slot.free is not None:
                self.h2d.wait_event(slot.free)  # the slot's previous block has left it
            for s in slots:  # and this block's own write-back, if one is in flight, has landed
                if s.free is not None:
                    self.h2d.wait_event(s.free)
            slot.buf[: src.numel()].copy_(src, non_blocking=self.pinned)
            slot.ready = torch.cuda.Event()
            slot.ready.record(self.h2d)

    def read_into_slot(self, slot: _Slot, n: int, read, slots: list[_Slot]) -> None:
        # through a pinned staging buffer, reused once its last copy to a slot is done
        if self._staging is None or self._staging.numel() < n:
            self._staging = self.host_buffer(max(n, slot.buf.numel()))
        if self._staging_free is not None:
            self._staging_free.synchronize()
        read(self._staging[:n])
        self.to_slot(slot, self._staging[:n], slots)
        self._staging_free = slot.ready

    def to_host(self, slot: _Slot, dst: torch.Tensor, active: bool) -> None:
        ev = slot.used  # after the last kernel of the block's last turn, recorded when it stopped
        if ev is None or active:  # active still: after every kernel queued so far
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.d2h):
            self.d2h.wait_event(ev)
            dst.copy_(slot.buf[: dst.numel()], non_blocking=self.pinned)
            slot.free = torch.cuda.Event()
            slot.free.record(self.d2h)

    def turn_over(self, slot: _Slot) -> None:
        # a write-back of this block then waits for these kernels alone, not for the next block's
        slot.used = torch.cuda.Event()
        slot.used.record(torch.cuda.current_stream(self.device))

    def wait_ready(self, slot: _Slot) -> None:
        if slot.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
            slot.ready = None

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)


# --- paged tiers -------------------------------------------------------------------------------------------
class _Paged:
    """One paged block: its trained parameters, its optimizer, its layout, and where its flat buffer is now.

    The buffer is [the trained state (FlatLayout, `size` fp32) | the frozen parameters' bytes (`fsize` fp32
    words, each parameter 16-byte aligned)]: one copy pages both in; only the trained part is written back.
    """

    ALIGN = 16  # bytes: any dtype's view of a frozen parameter starts aligned

    def __init__(self, index: int, block: nn.Module, optimizer):
        self.index = index
        self.params = [p for _, p in trained(block)]
        self.frozen = frozen(block)
        self.optimizer = optimizer
        self.layout = FlatLayout.of(block)
        offsets, n = [], 0
        for p in self.frozen:
            offsets.append(n)
            n += -(-p.numel() * p.element_size() // self.ALIGN) * self.ALIGN
        self.frozen_offsets = offsets
        self.fsize = n // 4
        self.host: torch.Tensor | None = None  # host tier: the block's buffer while paged out
        self.slot: _Slot | None = None  # the device slot holding it, if any
        self.dirty = False  # trained since it was paged in: must be written back

    @property
    def numel(self) -> int:
        return self.layout.numel

    @property
    def stride(self) -> int:
        return self.layout.stride

    @property
    def size(self) -> int:
        """The trained part's length (fp32 elements): what is written back and checkpointed."""
        return self.layout.size

    @property
    def total(self) -> int:
        """The whole buffer's length (fp32 elements), frozen bytes included: what is paged in."""
        return self.layout.size + self.fsize

    def _frozen_views(self, buf: torch.Tensor):
        raw = buf[self.size : self.total].view(torch.uint8)
        for p, off in zip(self.frozen, self.frozen_offsets):
            yield p, raw[off : off + p.numel() * p.element_size()].view(p.dtype).view(p.shape)

    def gather(self, buf: torch.Tensor) -> None:
        """Copy the block's current values (trained state and frozen weights) into `buf` (total long)."""
        self.layout.gather(buf, self.params, self.optimizer.state)
        for p, view in self._frozen_views(buf):
            view.copy_(p.data)

    def point_at(self, buf: torch.Tensor | None) -> None:
        """Make the parameters, moments and frozen weights views of `buf`, or zero-stride placeholders that
        hold no memory when None (paged out to disk)."""
        self.layout.bind(buf, self.params, self.optimizer.state)
        if buf is None:
            for p in self.frozen:
                p.data = torch.zeros((), dtype=p.dtype).expand(p.shape)
        else:
            for p, view in self._frozen_views(buf):
                p.data = view


class _PagedStorage:
    """What the host and disk tiers share: two device slots, LRU eviction, prefetch, write-back.

    A subclass says where a paged-out block's buffer is kept: `_adopt` (a new block's whole buffer, frozen
    bytes included), `_keep` (store the trained part of a host buffer there and point the block at its
    home), `_home` (point the block at its home, unchanged), `_read_in` (bring the whole buffer into a slot),
    `_write_back` (store a slot's trained values), `_fetch` (a CPU copy of the trained part).
    """

    tier = ""

    def __init__(self, device: torch.device, *, folder: Path | None = None, prefetch: bool = True):
        self.device = torch.device(device)
        self.copier = _CudaCopier(self.device) if self.device.type == "cuda" else _Copier(self.device)
        self.prefetches = prefetch
        self.blocks: dict[int, _Paged] = {}
        self.slots: list[_Slot] = []
        self.bytes_in = self.bytes_out = 0  # bytes copied to and from the device slots
        self._active: _Paged | None = None  # the block of the last activate()

    @property
    def pinned(self) -> bool:
        return self.copier.pinned

    # --- what the tiers differ in ---------------------------------------------------------------------------
    def _new_buffer(self, size: int) -> torch.Tensor:
        raise NotImplementedError

    def _adopt(self, blk: _Paged, buf: torch.Tensor) -> None:
        raise NotImplementedError

    def _keep(self, blk: _Paged, buf: torch.Tensor) -> None:
        raise NotImplementedError

    def _home(self, blk: _Paged) -> None:
        raise NotImplementedError

    def _read_in(self, blk: _Paged, slot: _Slot) -> None:
        raise NotImplementedError

    def _write_back(self, blk: _Paged, slot: _Slot) -> None:
        raise NotImplementedError

    def _fetch(self, blk: _Paged) -> torch.Tensor:
        raise NotImplementedError

    # --- the protocol ---------------------------------------------------------------------------------------
    def add(self, b: int, block: nn.Module, optimizer) -> None:
        """Take block b (its module on the CPU) and page it out at once."""
        dtypes = sorted(str(p.dtype) for _, p in trained(block))  # frozen ones (a LoRA base) may be bf16
        if set(dtypes) != {"torch.float32"}:
            raise TypeError(f"block {b}: paging needs float32 trained parameters, found {dtypes}")
        for m in block.modules():  # buffers (position tables): not trained or saved; kept on the device
            for k, v in m._buffers.items():
                if v is not None:
                    m._buffers[k] = v.to(self.device)
        blk = _Paged(b, block, optimizer)
        self.blocks[b] = blk
        buf = self._new_buffer(blk.total)
        blk.gather(buf)
        self._adopt(blk, buf)

    def activate(self, b: int) -> None:
        blk, last = self.blocks[b], self._active
        if last is not None and last is not blk and last.slot is not None:
            self.copier.turn_over(last.slot)
        # not in a slot (prefetch off, or the first block): evict the least recently active block
        slot = blk.slot or self._page_in(blk, keep=last)
        self.copier.wait_ready(slot)
        slot.used = None
        self._active = blk
        blk.dirty = True

    def prefetch(self, b: int, active: int) -> None:
        """Start loading block b into the slot the active block does not use (with prefetch on)."""
        blk = self.blocks[b]
        if self.prefetches and blk.slot is None:
            self._page_in(blk, keep=self.blocks[active])

    def flush(self) -> None:
        """Write every block in a slot back to its tier and wait: all blocks then live in host memory/disk."""
        for slot in self.slots:
            if slot.block is not None:
                self._page_out(slot)
        self.copier.sync()

    def tensors(self, b: int) -> dict[str, torch.Tensor]:
        blk = self.blocks[b]
        self.copier.sync()  # the compute that wrote the slot, or a write-back in flight
        flat = blk.slot.buf[: blk.size] if blk.slot is not None else self._fetch(blk)
        return blk.layout.to_tensors(flat)

    def load(self, b: int, tensors: dict[str, torch.Tensor], steps: int) -> None:
        blk = self.blocks[b]
        flat = blk.layout.from_tensors(tensors)
        for p in blk.params:
            blk.optimizer.state.setdefault(p, {})["step"] = torch.tensor(float(steps))
        if blk.slot is not None:
            blk.slot.buf[: blk.size].copy_(flat)
        else:
            self._keep(blk, flat)

    def release(self, model, run=None) -> None:
        self.flush()

    # --- the slots ------------------------------------------------------------------------------------------
    def _slot_for(self, blk: _Paged, keep: _Paged | None) -> _Slot:
        for s in self.slots:
            if s.block is None and s.buf.numel() >= blk.total:
                return s
        if len(self.slots) < 2:
            self.slots.append(self.copier.slot(max(b.total for b in self.blocks.values())))
            return self.slots[-1]
        victim = next(s for s in self.slots if s.block is not keep)
        self._page_out(victim)
        return victim

    def _page_in(self, blk: _Paged, keep: _Paged | None) -> _Slot:
        slot = self._slot_for(blk, keep)
        self._read_in(blk, slot)
        slot.block, blk.slot, slot.used = blk, slot, None
        blk.point_at(slot.buf)
        self.bytes_in += blk.total * 4
        return slot

    def _page_out(self, slot: _Slot) -> None:
        """Move the slot's block back to its tier (writing it back if it trained) and free the slot.

        If the write fails, the slot keeps the block and the last good copy in the tier is untouched.
        """
        blk = slot.block
        if blk.dirty:
            self._write_back(blk, slot)
            self.bytes_out += blk.size * 4
        else:
            self._home(blk)
        blk.dirty = False
        slot.block, blk.slot = None, None


class HostStorage(_PagedStorage):
    """offload="host": a paged-out block's buffer stays in host memory (pinned at its exact size on CUDA)."""

    tier = "host"

    def _new_buffer(self, size: int) -> torch.Tensor:
        return self.copier.host_buffer(size)

    def _adopt(self, blk: _Paged, buf: torch.Tensor) -> None:
        blk.host = buf  # its home from now on: the block's own copies of its tensors are dropped
        blk.point_at(blk.host)

    def _keep(self, blk: _Paged, buf: torch.Tensor) -> None:
        if buf is not blk.host:
            blk.host[: blk.size].copy_(buf[: blk.size])
        blk.point_at(blk.host)

    def _home(self, blk: _Paged) -> None:
        blk.point_at(blk.host)

    def _read_in(self, blk: _Paged, slot: _Slot) -> None:
        self.copier.to_slot(slot, blk.host, self.slots)

    def _write_back(self, blk: _Paged, slot: _Slot) -> None:
        self.copier.to_host(slot, blk.host[: blk.size], active=blk is self._active)
        blk.point_at(blk.host)

    def _fetch(self, blk: _Paged) -> torch.Tensor:
        return blk.host[: blk.size]


class DiskStorage(_PagedStorage):
    """offload="disk": a paged-out block's buffer is a safetensors file under `folder`, so host memory holds
    at most the blocks in the two slots. A block's frozen weights go to a second file, written once. The files
    are scratch: written atomically (a temporary file, then a rename) but not fsynced, since a crashed run
    resumes from its checkpoint, never from them."""

    tier = "disk"

    def __init__(self, device: torch.device, *, folder: Path | None = None, prefetch: bool = True):
        super().__init__(device, folder=folder, prefetch=prefetch)
        if folder is None:  # no run folder: a temporary one, deleted with the storage
            self._tmp = tempfile.TemporaryDirectory(prefix="dblocks-paged-")
            folder = self._tmp.name
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for f in self.folder.glob(".*.tmp"):  # paged writes a killed run cut short; the folder is this run's
            f.unlink(missing_ok=True)
        self._run = None  # after release with a run folder: where the blocks are read from

    def _path(self, b: int) -> Path:
        return self.folder / f"paged-block{b:03d}.safetensors"

    def _frozen_path(self, b: int) -> Path:
        return self.folder / f"paged-frozen{b:03d}.safetensors"

    def _new_buffer(self, size: int) -> torch.Tensor:
        # only passed on to the file: pinning memory that is then freed would leave the range registered
        return torch.empty(size, dtype=torch.float32)

    def _adopt(self, blk: _Paged, buf: torch.Tensor) -> None:
        from .checkpoint import atomic_save

        if blk.fsize:
            atomic_save(self._frozen_path(blk.index), {"flat": buf[blk.size : blk.total]}, scratch=True)
        self._keep(blk, buf)

    def _keep(self, blk: _Paged, buf: torch.Tensor) -> None:
        from .checkpoint import atomic_save

        atomic_save(self._path(blk.index), {"flat": buf[: blk.size]}, scratch=True)
        blk.point_at(None)

    def _home(self, blk: _Paged) -> None:
        blk.point_at(None)

    def _read_in(self, blk: _Paged, slot: _Slot) -> None:
        def read(out: torch.Tensor) -> None:
            self._read_paged(self._path(blk.index), out[: blk.size])
            if blk.fsize:
                self._read_paged(self._frozen_path(blk.index), out[blk.size :])

        self.copier.read_into_slot(slot, blk.total, read, self.slots)

    def _write_back(self, blk: _Paged, slot: _Slot) -> None:
        # .cpu() waits for the compute that wrote the slot (on a CPU the slot is host memory already)
        self._keep(blk, slot.buf[: blk.size].cpu())

    def _fetch(self, blk: _Paged) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(self._path(blk.index))["flat"]

    @staticmethod
    def _read_paged(path: Path, out: torch.Tensor) -> None:
        """Read a paged file straight into `out` (CPU, fp32, its length), with no temporary copy."""
        from .checkpoint import CheckpointError

        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            info = json.loads(f.read(size))["flat"]
            if info["dtype"] != "F32" or info["shape"] != [out.numel()]:
                raise CheckpointError(
                    f"{path}: holds {info['dtype']} {info['shape']}, expected F32 [{out.numel()}]"
                )
            f.seek(8 + size + info["data_offsets"][0])
            got = f.readinto(memoryview(out.numpy()).cast("B"))
        if got != out.numel() * 4:
            raise CheckpointError(
                f"paged block file {path} is cut short ({got} of {out.numel() * 4} bytes); resume the run "
                f"from its last checkpoint"
            )

    def tensors(self, b: int) -> dict[str, torch.Tensor]:
        if self._run is not None:  # released: the run's checkpoint holds the block, the paged file is gone
            return self._run.read_block(b)
        return super().tensors(b)

    def release(self, model, run=None) -> None:
        """Every block stays on disk: the model gets placeholders that say where (load the run folder to use
        them). With a run folder, whose checkpoint holds every block, the paged files are deleted."""
        from .model import PagedOutBlock

        self.flush()
        for b in self.blocks:
            model.blocks[b] = PagedOutBlock(b, run.path if run is not None else None)
        if run is not None:
            for b in self.blocks:
                self._path(b).unlink(missing_ok=True)
                self._frozen_path(b).unlink(missing_ok=True)
            self._run = run


# --- preflight --------------------------------------------------------------------------------------------
def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1  # unknown: not checked


def needs(tier: str, numels: list[int], frozen: list[int] | None = None) -> dict[str, int]:
    """Bytes each tier needs for blocks of `numels` trained fp32 parameters (weights, 2 AdamW moments,
    gradients) and `frozen` bytes of frozen parameters (a LoRA base; none if None).

    Activations are not counted (they depend on the batch); the device figure is what the blocks' state
    needs before any forward pass.
    """
    frozen = frozen or [0] * len(numels)
    state = [12 * n + f for n, f in zip(numels, frozen)]  # param + exp_avg + exp_avg_sq, frozen weights
    # only the block that trains has gradients, and the fused AdamW step gathers them into one flat copy
    grads = 8 * max(numels)
    if tier == "none":
        return {"device": sum(state) + grads, "host": 0, "disk": 0}
    slots = 2 * max(state)
    if tier == "host":
        return {"device": slots + grads, "host": sum(state), "disk": 0}
    # a paged file is rewritten beside the old one, then renamed over it
    return {"device": slots + grads, "host": slots, "disk": sum(state) + 12 * max(numels)}


def preflight(
    tier: str, numels: list[int], device: torch.device, folder: Path | None, frozen: list[int] | None = None
) -> dict[str, int]:
    """Refuse, before anything is allocated, a tier whose blocks do not fit; returns what it needs.

    On a CPU device the "device" bytes are host memory too. folder: where the disk tier's files go.
    """
    need = needs(tier, numels, frozen)
    if device.type == "cpu":
        need = {"device": 0, "host": need["host"] + need["device"], "disk": need["disk"]}
    have = {"host": _host_available(), "disk": -1, "device": -1}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # under torch.cuda.set_per_process_memory_fraction the process may use less than the device has free
        get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0)
        capped = int(get_fraction(device) * total) - torch.cuda.memory_reserved(device)
        have["device"] = min(free, capped)
    if need["disk"] and folder is not None:
        probe = Path(folder)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        have["disk"] = shutil.disk_usage(probe).free
    short = [k for k in ("device", "host", "disk") if have[k] >= 0 and need[k] > have[k]]
    if short:
        where = "; ".join(f"{k}: needs {_gb(need[k])}, {_gb(have[k])} free" for k in short)
        alt = []
        for t in (t for t in TIERS if t != tier):
            sizes = ", ".join(f"{k} {_gb(v)}" for k, v in needs(t, numels, frozen).items() if v)
            alt.append(f"offload={t!r} needs {sizes}")
        alt = "; ".join(alt)
        fixed = f" and {_gb(sum(frozen))} of frozen weights" if frozen and sum(frozen) else ""
        raise MemoryError(
            f"offload={tier!r} does not fit {len(numels)} blocks ({sum(numels) / 1e6:.1f}M parameters, "
            f"{_gb(12 * sum(numels))} of weights and AdamW state{fixed}): {where}. Activations come on top. "
            f"Other tiers: {alt}. More blocks (--blocks) make each slot smaller."
        )
    return need
