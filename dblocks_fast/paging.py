"""Blocks kept in host memory and brought to the device when needed.

This module holds the inference side: `StreamedBlockModel` samples with every block in (pinned) host memory
and at most two on the device, the one in use and the next, which is copied on a side stream while the
current block computes. A sampling run visits the blocks in order (block 0 owns the highest noise), so the
next block is always known. The training side (flat AdamW state, host and disk tiers) builds on the same
flat layout.
"""

from __future__ import annotations

import json
import struct
import weakref
from pathlib import Path

import torch
from torch import nn

from .model import BlockModel
from .nn import set_kernels
from .optim import part_stride

__all__ = ["StreamedBlockModel", "flatten_module"]


_ALIGN = 64  # elements: every tensor of a flattened module starts 256 bytes (fp32) into an aligned buffer


def flatten_module(module: nn.Module, device, pinned: list[int] | None = None) -> torch.Tensor:
    """Move every parameter and buffer of `module` into one flat buffer on `device`; they become views of it.

    Returns the buffer. All tensors must share one dtype. Two modules of the same architecture get the same
    layout, so one copy of the whole buffer moves all of a block's weights. Each tensor starts at a multiple
    of 64 elements, as a tensor of its own would be aligned: cuBLAS picks its algorithm by the alignment of
    the operands, so the same alignment gives the same bits as the unflattened module. The gaps are zeros.
    pinned: a host buffer is pinned at its exact size (cudaHostRegister) and its pointer appended here; the
    caller unpins it (`_unregister`). If pinning fails, a warning says so and the buffer stays pageable.
    """
    tensors = list(module.parameters()) + list(module.buffers())
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise TypeError(f"flatten_module needs one dtype for all tensors, found {sorted(map(str, dtypes))}")
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() // _ALIGN) * _ALIGN
    flat = torch.zeros(total, dtype=dtypes.pop(), device=device)
    if pinned is not None and flat.device.type == "cpu" and _pin(flat, stacklevel=3):
        pinned.append(flat.data_ptr())
    with torch.no_grad():
        for t, offset in zip(tensors, offsets):
            view = flat[offset : offset + t.numel()].view_as(t)
            view.copy_(t)
            t.data = view
    return flat


def _pin(buf: torch.Tensor, stacklevel: int = 2) -> bool:
    """Pin a CPU tensor's own memory at its exact size; on failure warn and return False (it stays pageable).

    torch's pinned allocator would round the allocation up to a power of two (up to twice the host memory).
    """
    size = buf.numel() * buf.element_size()
    err = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), size, 1))  # 1: cudaHostRegisterPortable
    if err == 0:
        return True
    # the failed call left CUDA's last-error state set, and torch's check after the next kernel launch would
    # report it there: launch one now and take the error
    try:
        torch.zeros(1, device="cuda")
    except RuntimeError:
        pass
    import warnings

    msg = (
        f"pinning {size} bytes of host memory failed (CUDA error {err}); copying from pageable memory, slower"
    )
    warnings.warn(msg, stacklevel=stacklevel + 1)
    return False


def _signature(module: nn.Module) -> tuple:
    return tuple((name, tuple(t.shape), t.dtype) for name, t in module.state_dict().items())


class _Slot:
    """A device copy of one block architecture whose weights are one flat buffer, refilled per block."""

    def __init__(self, template: nn.Module, device: torch.device):
        import copy

        self.module = copy.deepcopy(template).to(device)
        self.flat = flatten_module(self.module, device)
        self.signature = _signature(template)
        self.block: int | None = None  # the block whose weights it holds (or is receiving)
        self.ready: torch.cuda.Event | None = None  # recorded on the copy stream after the copy
        self.released: torch.cuda.Event | None = None  # recorded on the compute stream after the last use
        if self.flat.is_cuda:  # filled on the compute stream: the first copy into it must wait for that
            self.released = torch.cuda.Event()
            self.released.record(torch.cuda.current_stream(self.flat.device))


class StreamedBlockModel(BlockModel):
    """A BlockModel for sampling whose blocks live in host memory, with at most two on the device.

    `denoise` makes the block it needs resident (copying it if it is not) and starts copying the next block
    on a side stream, so on a GPU the copy overlaps the current block's steps. Events order the copies
    against the compute: a slot is refilled only after the kernels that read it have finished. The
    results are the same as the resident model's, bit for bit.

    It takes over `model`'s blocks: their weights move into one flat host buffer per block (pinned when the
    device is CUDA). Do not move it with .to(); pass the device here.
    """

    def __init__(self, model: BlockModel, device=None):
        super().__init__(model.task, model.schedule, model.layers, [b.cpu() for b in model.blocks])
        self._device = torch.device(
            device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        cuda = self._device.type == "cuda"
        self._pinned: list[int] = []
        self._host = [flatten_module(b, "cpu", pinned=self._pinned if cuda else None) for b in self.blocks]
        weakref.finalize(self, _unregister, self._pinned)
        self._slots: list[_Slot] = []
        for blk in self.blocks:  # two slots per distinct block architecture (blocks may differ in depth)
            sig = _signature(blk)
            while sum(s.signature == sig for s in self._slots) < 2:
                self._slots.append(_Slot(blk, self._device))
        self._copy_stream = torch.cuda.Stream(self._device) if cuda else None
        for s in self._slots:  # freed with the model: the allocator then waits for the copy stream too
            if cuda:
                s.flat.record_stream(self._copy_stream)
        self.copies = 0  # blocks copied to the device so far (for tests and benchmarks)
        if getattr(model.blocks[0], "kernels", None) is not None:
            self.set_kernels(model.blocks[0].kernels)

    @property
    def device(self) -> torch.device:
        return self._device

    def set_kernels(self, kernels: str) -> StreamedBlockModel:
        super().set_kernels(kernels)
        for s in self._slots:
            set_kernels(s.module, kernels)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for s in self._slots:
            s.module.train(mode)
        return self

    def resident(self) -> list[int]:
        """The blocks whose weights are on the device now."""
        return sorted(s.block for s in self._slots if s.block is not None)

    def _load(self, b: int, avoid: _Slot | None) -> _Slot:
        sig = _signature(self.blocks[b])
        for s in self._slots:
            if s.block == b:
                return s
        # refill an empty slot first, then one holding an earlier block (never the next one, prefetched)
        free = [s for s in self._slots if s.signature == sig and s is not avoid]
        slot = min(free, key=lambda s: (s.block is not None, s.block == b + 1))
        slot.block = None  # until the copy is issued: if it fails, the slot holds no block
        if self._copy_stream is None:
            slot.flat.copy_(self._host[b])
        else:
            with torch.cuda.stream(self._copy_stream):
                if slot.released is not None:
                    self._copy_stream.wait_event(slot.released)  # its last reader has finished
                slot.flat.copy_(self._host[b], non_blocking=bool(self._pinned))
                slot.ready = torch.cuda.Event()
                slot.ready.record(self._copy_stream)
        slot.block = b
        self.copies += 1
        return slot

    def _block_module(self, b: int) -> nn.Module:
        slot = self._load(b, avoid=None)
        if slot.ready is not None:
            torch.cuda.current_stream(self._device).wait_event(slot.ready)
            slot.ready = None
        if b + 1 < self.num_blocks:
            self._load(b + 1, avoid=slot)  # prefetch the next block into the other slot
        return slot.module

    def _after_use(self, b: int) -> None:
        if self._copy_stream is None:
            return
        for s in self._slots:
            if s.block == b:
                s.released = torch.cuda.Event()
                s.released.record(torch.cuda.current_stream(self._device))


# --- training: blocks and their AdamW moments paged between device slots and host memory or disk ---------
TIERS = ("none", "host", "disk")
_PARTS = ("param", "exp_avg", "exp_avg_sq")  # the three flat parts of a block's buffer, in this order


class _Paged:
    """One block under paging: its parameters, optimizer, and where its flat [param|exp_avg|exp_avg_sq] is."""

    def __init__(self, index: int, block: nn.Module, optimizer):
        self.index = index
        self.params = list(block.parameters())
        self.names = [n for n, _ in block.named_parameters()]
        self.optimizer = optimizer
        self.numel = sum(p.numel() for p in self.params)
        self.stride = part_stride(self.numel)  # from one part to the next: 16-byte aligned parts
        self.size = 3 * self.stride  # elements of the flat buffer
        self.host: torch.Tensor | None = None  # host tier: the block's buffer while paged out
        self.slot: _TrainSlot | None = None  # the device slot holding it, if any
        self.dirty = False  # trained since it was paged in: must be written back

    def point_at(self, buf: torch.Tensor | None) -> None:
        """Make the parameters and AdamW moments views of `buf` (self.size), or placeholders when None."""
        offset = 0
        for p in self.params:
            n = p.numel()
            if p not in self.optimizer.state:
                self.optimizer.state[p] = {"step": torch.tensor(0.0)}
            state = self.optimizer.state[p]
            if buf is None:
                p.data = torch.zeros((), dtype=p.dtype).expand(p.shape)  # paged out to disk: no memory held
                state["exp_avg"] = state["exp_avg_sq"] = p.data
            else:
                lo = [k * self.stride + offset for k in range(3)]
                p.data = buf[lo[0] : lo[0] + n].view(p.shape)
                state["exp_avg"] = buf[lo[1] : lo[1] + n].view(p.shape)
                state["exp_avg_sq"] = buf[lo[2] : lo[2] + n].view(p.shape)
            offset += n

    def fill(self, buf: torch.Tensor) -> None:
        """Write the block's current values (parameters and moments, zeros where none yet) into `buf`."""
        offset = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                state = self.optimizer.state.get(p, {})
                for k, src in enumerate((p.data, state.get("exp_avg"), state.get("exp_avg_sq"))):
                    dst = buf[k * self.stride + offset : k * self.stride + offset + n]
                    dst.copy_(src.reshape(-1)) if src is not None else dst.zero_()
                offset += n
            for k in range(3):  # the gaps between parts: zeros, so a buffer's bytes depend on its values only
                buf[k * self.stride + self.numel : (k + 1) * self.stride].zero_()


class _TrainSlot:
    def __init__(self, size: int, device: torch.device, streams=()):
        self.buf = torch.empty(size, dtype=torch.float32, device=device)
        self.block: _Paged | None = None
        self.ready: torch.cuda.Event | None = None  # its page-in copy is done
        self.free: torch.cuda.Event | None = None  # its page-out copy (and every reader) is done
        self.used: torch.cuda.Event | None = None  # after the last kernel of its block's last turn as active
        if self.buf.is_cuda:
            # the memory may have been freed by kernels still queued on the compute stream: the first copy
            # into it waits for them; and when the slot goes, the allocator waits for the copy streams
            self.free = torch.cuda.Event()
            self.free.record(torch.cuda.current_stream(device))
            for stream in streams:
                self.buf.record_stream(stream)


class BlockStore:
    """Keeps inactive blocks, with their AdamW moments, in host memory or on disk (offload="host"/"disk").

    Each paged block's parameters and moments live in one flat fp32 buffer [param | exp_avg | exp_avg_sq];
    its module's parameters and its optimizer's state are views into whichever copy is current. Two device
    slots hold the active block and the next one, which `prefetch` loads on a copy stream (CUDA) while the
    active one trains; write-back goes on a second stream, and events make sure no buffer is reused before
    its copy is done. On a CPU the same code runs with plain synchronous copies, so the tests can hold that
    every tier gives the same bits.

    offload="host": paged-out blocks in host memory (pinned on CUDA, exact size). "disk": in safetensors files
    under `folder`, so host memory holds at most the blocks in the two slots.
    """

    def __init__(self, tier: str, device: torch.device, folder: Path | None = None):
        if tier not in ("host", "disk"):
            raise ValueError(f"BlockStore tier must be 'host' or 'disk', got {tier!r}")
        self.tier, self.device = tier, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.folder = Path(folder) if folder is not None else None
        if tier == "disk":
            if self.folder is None:
                raise ValueError("offload='disk' needs a folder for the paged blocks (set out_dir)")
            self.folder.mkdir(parents=True, exist_ok=True)
        self.blocks: dict[int, _Paged] = {}
        self.slots: list[_TrainSlot] = []
        self._h2d = torch.cuda.Stream(self.device) if self.cuda else None
        self._d2h = torch.cuda.Stream(self.device) if self.cuda else None
        self.pinned = True
        self.bytes_in = self.bytes_out = 0  # bytes copied to and from the device slots
        self.closed = False
        self._active: _Paged | None = None  # the block of the last activate()
        self._staging: torch.Tensor | None = None  # disk tier on CUDA: where a paged file is read to
        self._staging_free: torch.cuda.Event | None = None
        self._registered: list[int] = []  # host buffers pinned with cudaHostRegister
        # unpin when the store goes; the memory itself stays valid (pageable) for views that outlive it
        weakref.finalize(self, _unregister, self._registered)

    # --- registration -------------------------------------------------------------------------------------
    def add(self, b: int, block: nn.Module, optimizer) -> None:
        """Take block b (its module on the CPU) and page it out at once: host buffer or disk file."""
        dtypes = {p.dtype for p in block.parameters()}
        if dtypes != {torch.float32} or list(block.buffers()):
            raise TypeError(f"block {b}: paging needs fp32 parameters and no buffers, found {dtypes}")
        blk = _Paged(b, block, optimizer)
        self.blocks[b] = blk
        # the host tier keeps this buffer (pinned); the disk tier only passes it to the file, and pinning
        # memory that is then freed would leave the range registered for whatever is allocated there next
        buf = self._host_buffer(blk.size) if self.tier == "host" else torch.empty(blk.size)
        blk.fill(buf)
        self._store(blk, buf)

    def _host_buffer(self, size: int) -> torch.Tensor:
        """`size` fp32 of host memory that lives as long as the store (on CUDA: pinned, exact size)."""
        buf = torch.empty(size, dtype=torch.float32)
        if self.cuda and self.pinned:
            if _pin(buf, stacklevel=3):
                self._registered.append(buf.data_ptr())
            else:
                self.pinned = False
        return buf

    def _path(self, b: int) -> Path:
        return self.folder / f"paged-block{b:03d}.safetensors"

    def _store(self, blk: _Paged, buf: torch.Tensor) -> None:
        """Keep `buf` (the block's current values, on the host) in the tier and point the block at it."""
        if self.tier == "host":
            blk.host = buf
            blk.point_at(buf)
            return
        from . import checkpoint

        checkpoint.atomic_save(self._path(blk.index), {"flat": buf}, scratch=True)
        blk.point_at(None)

    def _read_paged(self, blk: _Paged, out: torch.Tensor) -> None:
        """Read block's paged file straight into `out` (CPU, fp32, blk.size), with no temporary copy."""
        from .checkpoint import CheckpointError

        path = self._path(blk.index)
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

    def _fetch(self, blk: _Paged) -> torch.Tensor:
        if self.tier == "host":
            return blk.host
        from safetensors.torch import load_file

        return load_file(self._path(blk.index))["flat"]

    # --- paging --------------------------------------------------------------------------------------------
    def _slot_for(self, blk: _Paged, keep: _Paged | None) -> _TrainSlot:
        for s in self.slots:
            if s.block is None and s.buf.numel() >= blk.size:
                return s
        if len(self.slots) < 2:
            streams = (self._h2d, self._d2h) if self.cuda else ()
            self.slots.append(_TrainSlot(max(b.size for b in self.blocks.values()), self.device, streams))
            return self.slots[-1]
        victim = next(s for s in self.slots if s.block is not keep)
        self._page_out(victim)
        return victim

    def _page_out(self, slot: _TrainSlot) -> None:
        """Move the slot's block back to its tier (writing it back if it trained) and free the slot.

        If the write fails, the slot keeps the block and the last good copy in the tier is untouched.
        """
        blk = slot.block
        n = blk.size
        if not blk.dirty:
            self._point_host(blk)
        elif self.tier == "host" and not self.cuda:
            blk.host.copy_(slot.buf[:n])
            blk.point_at(blk.host)
        elif self.tier == "host":
            ev = slot.used  # after the last kernel of the block's last turn, recorded when it stopped
            if ev is None or blk is self._active:  # active still: after every kernel queued so far
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._d2h):
                self._d2h.wait_event(ev)
                blk.host.copy_(slot.buf[:n], non_blocking=self.pinned)
                slot.free = torch.cuda.Event()
                slot.free.record(self._d2h)
            blk.point_at(blk.host)
        else:
            # on a CPU the slot is host memory already; .cpu() waits for the compute that wrote the slot
            self._store(blk, slot.buf[:n].cpu())
        if blk.dirty:
            self.bytes_out += n * 4
        blk.dirty = False
        slot.block, blk.slot = None, None

    def _point_host(self, blk: _Paged) -> None:
        if self.tier == "host":
            blk.point_at(blk.host)
        else:
            blk.point_at(None)

    def _page_in(self, blk: _Paged, keep: _Paged | None) -> _TrainSlot:
        slot = self._slot_for(blk, keep)
        n = blk.size
        if self.tier == "disk" and not self.cuda:
            self._read_paged(blk, slot.buf[:n])  # straight into the slot: no second copy of the block
        elif not self.cuda:
            slot.buf[:n].copy_(blk.host)
        else:
            src = blk.host
            if self.tier == "disk":  # read into a pinned staging buffer, reused once its last copy is done
                if self._staging is None:
                    self._staging = self._host_buffer(max(b.size for b in self.blocks.values()))
                if self._staging_free is not None:
                    self._staging_free.synchronize()
                src = self._staging[:n]
                self._read_paged(blk, src)
            with torch.cuda.stream(self._h2d):
                if slot.free is not None:
                    self._h2d.wait_event(slot.free)  # the slot's previous block has left it
                for s in self.slots:  # and this block's own write-back, if one is in flight, has landed
                    if s.free is not None:
                        self._h2d.wait_event(s.free)
                slot.buf[:n].copy_(src, non_blocking=self.pinned)
                slot.ready = torch.cuda.Event()
                slot.ready.record(self._h2d)
                if self.tier == "disk":
                    self._staging_free = slot.ready
        slot.block, blk.slot, slot.used = blk, slot, None
        blk.point_at(slot.buf)
        self.bytes_in += n * 4
        return slot

    def activate(self, b: int) -> None:
        """Make block b trainable on the device (its parameters and moments in a slot)."""
        blk, last = self.blocks[b], self._active
        if self.cuda and last is not None and last is not blk and last.slot is not None:
            # every kernel of the last block's turn is queued by now: a write-back of it waits for them
            # alone, not for the kernels queued after (the next block's), so it overlaps those
            last.slot.used = torch.cuda.Event()
            last.slot.used.record(torch.cuda.current_stream(self.device))
        # not in a slot (prefetch off, or the first block): evict the least recently active block
        slot = blk.slot or self._page_in(blk, keep=last)
        if slot.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
            slot.ready = None
        slot.used = None
        self._active = blk
        blk.dirty = True

    def prefetch(self, b: int, active: int) -> None:
        """Start loading block b into the slot the active block does not use."""
        blk = self.blocks[b]
        if blk.slot is None:
            self._page_in(blk, keep=self.blocks[active])

    def flush(self) -> None:
        """Write every block in a slot back to its tier and wait: all blocks then live in host memory/disk."""
        for slot in self.slots:
            if slot.block is not None:
                self._page_out(slot)
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Delete the disk tier's files (after training; the run's checkpoint holds every block)."""
        if self.tier == "disk":
            for b in self.blocks:
                self._path(b).unlink(missing_ok=True)
        self.closed = True

    def tensors(self, b: int) -> dict[str, torch.Tensor]:
        """Block b's parameters and moments as named CPU tensors (the checkpoint format), wherever it is."""
        blk = self.blocks[b]
        if blk.slot is not None:
            if self.cuda:
                torch.cuda.synchronize(self.device)
            flat = blk.slot.buf[: blk.size].cpu()
        else:
            if self.cuda:
                torch.cuda.synchronize(self.device)  # a write-back may be in flight
            flat = self._fetch(blk)
        out, offset = {}, 0
        for name, p in zip(blk.names, blk.params):
            n = p.numel()
            for k, part in enumerate(_PARTS):
                t = flat[k * blk.stride + offset : k * blk.stride + offset + n]
                out[f"{part}/{name}"] = t.view(p.shape).clone()
            offset += n
        return out

    def load(self, b: int, tensors: dict[str, torch.Tensor], steps: int) -> None:
        """Put checkpointed weights and moments (the `tensors` format) into block b, wherever it lives."""
        blk = self.blocks[b]
        flat = torch.zeros(blk.size, dtype=torch.float32)
        offset = 0
        for name, p in zip(blk.names, blk.params):
            n = p.numel()
            for k, part in enumerate(_PARTS):
                src = tensors.get(f"{part}/{name}")
                dst = flat[k * blk.stride + offset : k * blk.stride + offset + n]
                dst.copy_(src.reshape(-1)) if src is not None else dst.zero_()
            blk.optimizer.state.setdefault(p, {})["step"] = torch.tensor(float(steps))
            offset += n
        if blk.slot is not None:
            blk.slot.buf[: blk.size].copy_(flat)
        elif self.tier == "host":
            blk.host.copy_(flat)
        else:
            self._store(blk, flat)


def _unregister(pointers: list[int]) -> None:
    """Unpin host buffers pinned with `_pin`, after every copy that may still read or write them."""
    if not pointers:
        return
    try:
        torch.cuda.synchronize()
    except RuntimeError:  # CUDA is shutting down (a finalizer at exit): the process takes the memory with it
        pointers.clear()
        return
    for ptr in pointers:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    pointers.clear()


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


def needs(tier: str, numels: list[int]) -> dict[str, int]:
    """Bytes each tier needs for blocks of `numels` fp32 parameters (weights, 2 AdamW moments, gradients).

    Activations are not counted (they depend on the batch); the device figure is what the blocks' state
    needs before any forward pass.
    """
    state = [12 * n for n in numels]  # param + exp_avg + exp_avg_sq
    # only the block that trains has gradients, and the fused AdamW step gathers them into one flat copy
    grads = 8 * max(numels)
    if tier == "none":
        return {"device": sum(state) + grads, "host": 0, "disk": 0}
    slots = 2 * 12 * max(numels)
    if tier == "host":
        return {"device": slots + grads, "host": sum(state), "disk": 0}
    # a paged file is rewritten beside the old one, then renamed over it
    return {"device": slots + grads, "host": 2 * 12 * max(numels), "disk": sum(state) + 12 * max(numels)}


def preflight(tier: str, numels: list[int], device: torch.device, folder: Path | None) -> dict[str, int]:
    """Refuse, before anything is allocated, a tier whose blocks do not fit; returns what it needs.

    On a CPU device the "device" bytes are host memory too.
    """
    import shutil

    need = needs(tier, numels)
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
            sizes = ", ".join(f"{k} {_gb(v)}" for k, v in needs(t, numels).items() if v)
            alt.append(f"offload={t!r} needs {sizes}")
        alt = "; ".join(alt)
        raise MemoryError(
            f"offload={tier!r} does not fit {len(numels)} blocks ({sum(numels) / 1e6:.1f}M parameters, "
            f"{_gb(12 * sum(numels))} of weights and AdamW state): {where}. Activations come on top. "
            f"Other tiers: {alt}. More blocks (--blocks) make each slot smaller."
        )
    return need
