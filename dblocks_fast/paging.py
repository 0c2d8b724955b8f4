"""Blocks kept in host memory and brought to the device when needed.

This module holds the inference side: `StreamedBlockModel` samples with every block in (pinned) host memory
and at most two on the device, the one in use and the next, which is copied on a side stream while the
current block computes. A sampling run visits the blocks in order (block 0 owns the highest noise), so the
next block is always known. The training side (blocks and their AdamW moments in host memory or on disk
while others train) is `storage.py`; both use the exact-size pinning here (`_pin`, `_unregister`).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch
from torch import nn

from .model import BlockModel
from .nn import set_kernels

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

    @contextlib.contextmanager
    def block(self, b: int):
        """Block b's slot module: copied in if it is not resident (waiting for that copy), the next block
        prefetched into the other slot; on exit the slot is marked free once the work queued on it is done."""
        try:
            yield self._resident_module(b)
        finally:
            self._after_use(b)

    def _resident_module(self, b: int) -> nn.Module:
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
