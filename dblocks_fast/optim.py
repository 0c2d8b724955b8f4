"""AdamW over a block's flat buffers: one kernel launch a step, whatever the number of parameter tensors.

`AdamW` keeps a block's parameters and both moments in one float32 buffer laid out
[param | exp_avg | exp_avg_sq] (the layout `paging.BlockStore` pages between device, host and disk), with
every parameter and its `state[p]["exp_avg"]`, `state[p]["exp_avg_sq"]` a view into it. Each part starts
`part_stride(numel)` elements after the last, a multiple of 4, so all three are 16-byte aligned and the
fused kernel takes its vector path whatever the block's size. A step gathers the
gradients into one flat buffer and updates all of it at once through `ops.adamw_`, whose implementation
`ops.select` picks from the same `kernels` vocabulary as every op:

  "cuda"   dblocks_fast._C's fused_adamw (csrc/fused_adamw.cu): one read and one write of each buffer,
           optionally writing a bfloat16 copy of the new weights in the same pass; CUDA tensors, _C built.
  "torch"  on CUDA torch._fused_adamw_ on the flat buffers; elsewhere `ops.adamw_ref_`, torch.optim.AdamW's
           single-tensor update op for op, because its result is bit for bit torch.optim.AdamW's (torch's
           own fused CPU kernel differs in the last bit), so a run's weights do not depend on which
           optimizer trained them.
  "auto"   "cuda" where it can run, else "torch" (unlike the other ops, see ops.py).

On the GPU the fused paths agree with the reference to float32 rounding (they contract multiply-adds).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch

from . import ops

__all__ = ["AdamW", "part_stride"]


def part_stride(numel: int) -> int:
    """Elements from one part of a flat [param | exp_avg | exp_avg_sq] buffer to the next: numel rounded up to
    a multiple of 4, so that every part of an aligned buffer is 16-byte aligned (the gaps are zeros)."""
    return -(-numel // 4) * 4


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensors as one flat view if they lie back to back in one storage, in order; else None."""
    first = tensors[0]
    if first.device.type == "meta":
        return None
    start = offset = first.storage_offset()
    storage = first.untyped_storage().data_ptr()
    for t in tensors:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != storage or t.storage_offset() != offset:
            return None
        offset += t.numel()
    return first.as_strided((offset - start,), (1,), start)


class AdamW(torch.optim.Optimizer):
    """AdamW for one block: its weights and moments in one flat buffer, updated by one fused kernel.

    The update is torch.optim.AdamW's (decoupled weight decay, bias correction, the same defaults), and on
    the CPU it is bit for bit the same. Construction moves the parameters into a new flat buffer
    [param | exp_avg | exp_avg_sq] (parameters become views; their values are unchanged). Code that moves the
    block's storage elsewhere (paging) may re-point the parameters and state tensors at another buffer of
    the same layout; a step then runs on that buffer. If the tensors are no longer laid out flat, a step
    updates them one by one with the reference (same result, slower).

    Args:
        params: the block's parameters: float32, one device, one group.
        lr, betas, eps, weight_decay: as torch.optim.AdamW. The group's "lr" may change between steps.
        kernels: "auto", "cuda", "triton" or "torch", as every op of `ops` (see the module docstring; there is
            no Triton AdamW). `backend=` is its old name, deprecated; its "reference" is now "torch", which
            is the same update on the CPU and torch._fused_adamw_ on CUDA.
        bf16_copy: keep `param_bf16`, a flat bfloat16 copy of the weights written by each step (on the cuda
            backend in the same pass), for bf16 compute without a separate cast.
        pack: False leaves the tensors where they are, for a caller that lays them out itself (paging).
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        kernels: str = "auto",
        bf16_copy: bool = False,
        pack: bool = True,
        backend: str | None = None,
    ):
        if not (lr >= 0 and eps >= 0 and weight_decay >= 0):
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if backend is not None:
            kernels = _kernels_of_backend(backend)
        if kernels not in ops.KERNELS:
            raise ValueError(f"kernels must be one of {ops.KERNELS}, got {kernels!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        if len(self.param_groups) != 1:
            raise ValueError("AdamW takes one parameter group (one block's parameters)")
        self.params = list(self.param_groups[0]["params"])
        devices = {p.device for p in self.params}
        dtypes = {p.dtype for p in self.params}
        if len(devices) != 1 or dtypes != {torch.float32}:
            raise ValueError(
                f"AdamW needs float32 parameters on one device, got {sorted(map(str, dtypes))} on "
                f"{sorted(map(str, devices))}"
            )
        self.kernels = kernels
        self.numel = sum(p.numel() for p in self.params)
        self.stride = part_stride(self.numel)
        self.param_bf16: torch.Tensor | None = None
        self._bf16_copy = bf16_copy
        if pack:
            self.pack()

    @torch.no_grad()
    def pack(self) -> None:
        """Move the parameters and moments (zeros where none yet) into one new flat buffer, unchanged."""
        device = self.params[0].device
        buf = torch.zeros(3 * self.stride, dtype=torch.float32, device=device)
        offset = 0
        for p in self.params:
            n = p.numel()
            state = self.state[p]
            views = [
                buf[k * self.stride + offset : k * self.stride + offset + n].view(p.shape) for k in range(3)
            ]
            views[0].copy_(p.data)
            for k, key in ((1, "exp_avg"), (2, "exp_avg_sq")):
                if key in state:
                    views[k].copy_(state[key])
            p.data = views[0]
            state["exp_avg"], state["exp_avg_sq"] = views[1], views[2]
            # a copy: a loaded state dict may share its step tensors with the optimizer it came from
            state["step"] = state["step"].detach().clone() if "step" in state else torch.tensor(0.0)
            offset += n
        if self._bf16_copy:
            self.param_bf16 = buf[: self.numel].to(torch.bfloat16)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.pack()  # the loaded moments are new tensors: bring them back into one buffer

    def flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(param, exp_avg, exp_avg_sq) as flat views if laid out flat (in any buffer), else None."""
        if any("exp_avg" not in self.state[p] for p in self.params):
            return None
        parts = [
            _flat([p.data for p in self.params]),
            _flat([self.state[p]["exp_avg"] for p in self.params]),
            _flat([self.state[p]["exp_avg_sq"] for p in self.params]),
        ]
        return None if any(t is None for t in parts) else tuple(parts)

    @torch.no_grad()
    def step(
        self, closure=None, *, grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None
    ):
        """One update of every parameter that has a gradient. grad_scale / found_inf: see `ops.adamw_`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        with_grad = [p for p in self.params if p.grad is not None]
        if not with_grad:
            return loss
        if any(p.grad.is_sparse for p in with_grad):
            raise RuntimeError("AdamW does not support sparse gradients")
        if found_inf is not None and bool(found_inf.item()):
            return loss  # skipped: the step is not counted (one sync, only with loss scaling)
        beta1, beta2 = group["betas"]
        hp = dict(
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"]
        )
        for p in with_grad:
            state = self.state[p]
            if "exp_avg" not in state:  # not packed: the moments start at zero, as torch.optim.AdamW's
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            state.setdefault("step", torch.tensor(0.0))
            state["step"] += 1
        steps = {int(self.state[p]["step"].item()) for p in with_grad}
        flat = self.flat() if len(with_grad) == len(self.params) and len(steps) == 1 else None
        if flat is not None:
            grad = torch.cat([p.grad.reshape(-1) for p in self.params])
            ops.adamw_(
                flat[0], grad, flat[1], flat[2], **hp, step=steps.pop(), grad_scale=grad_scale,
                param_bf16=self.param_bf16, kernels=self.kernels,
            )  # fmt: skip
        else:  # not laid out flat, or some parameters without a gradient: one tensor at a time
            for p in with_grad:
                state = self.state[p]
                g = p.grad if grad_scale is None else p.grad / grad_scale
                step = int(state["step"].item())
                ops.adamw_ref_(p.data, g, state["exp_avg"], state["exp_avg_sq"], **hp, step=step)
            if self.param_bf16 is not None:
                self.param_bf16.copy_(torch.cat([p.data.reshape(-1) for p in self.params]))
        return loss


def _kernels_of_backend(backend: str) -> str:
    """AdamW(backend=...), the name before the ops' `kernels` vocabulary, as a `kernels` value."""
    old = {"auto": "auto", "cuda": "cuda", "torch": "torch", "reference": "torch"}
    if backend not in old:
        raise ValueError(f"backend must be one of {tuple(old)}, got {backend!r} (and is now named kernels)")
    warnings.warn(
        f"AdamW(backend={backend!r}) is deprecated: pass kernels={old[backend]!r} (the ops' vocabulary; "
        "'torch' is the reference on the CPU and torch._fused_adamw_ on CUDA).",
        DeprecationWarning,
        stacklevel=3,
    )
    return old[backend]
