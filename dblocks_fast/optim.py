"""AdamW over a block's flat buffers: one kernel launch a step, whatever the number of parameter tensors.

`AdamW` keeps a block's parameters and both moments in one float32 buffer laid out
[param | exp_avg | exp_avg_sq] (`FlatLayout`, the layout `storage` pages between device, host and disk), with
every parameter and its `state[p]["exp_avg"]`, `state[p]["exp_avg_sq"]` a view into it. Each part starts
`part_stride(numel)` elements after the last, a multiple of 4, so all three are 16-byte aligned and the
fused kernel takes its vector path whatever the block's size. On CUDA a step gathers the
gradients into one flat buffer and updates all of it at once through `ops.adamw_`; on the CPU it updates one
parameter at a time (the same bits, without temporaries the size of the block). The implementation is what
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

__all__ = ["AdamW", "FlatLayout", "part_stride"]


def part_stride(numel: int) -> int:
    """Elements from one part of a flat [param | exp_avg | exp_avg_sq] buffer to the next: numel rounded up to
    a multiple of 4, so that every part of an aligned buffer is 16-byte aligned (the gaps are zeros)."""
    return -(-numel // 4) * 4


def trained(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """A block's trained parameters (name, parameter): those with requires_grad. The others are frozen (a LoRA
    block's base weights): no gradients, no optimizer state, not in checkpoints (the block's builder gives
    them again), kept beside the trained state by the storage."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def frozen(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """A block's frozen parameters (requires_grad False), see `trained`."""
    return [p for p in module.parameters() if not p.requires_grad]


class FlatLayout:
    """Where each parameter of a block and its two AdamW moments sit in one flat float32 buffer.

    The buffer is [param | exp_avg | exp_avg_sq]: three parts `stride` elements apart (`part_stride`), each
    holding every parameter back to back in order, the gaps after each part zeros. `AdamW` packs a block this
    way; paging moves the whole buffer with one copy; checkpoints store it as named tensors
    (`"param/<name>"`, `"exp_avg/<name>"`, `"exp_avg_sq/<name>"`). This class is the one place that knows the
    arithmetic.
    """

    PARTS = ("param", "exp_avg", "exp_avg_sq")

    def __init__(self, shapes, names=None):
        self.shapes = [torch.Size(s) for s in shapes]
        self.names = list(names) if names is not None else [str(i) for i in range(len(self.shapes))]
        if len(self.names) != len(self.shapes):
            raise ValueError(f"{len(self.names)} names for {len(self.shapes)} shapes")
        self.offsets, n = [], 0
        for s in self.shapes:
            self.offsets.append(n)
            n += s.numel()
        self.numel = n  # elements of one part (the parameters)
        self.stride = part_stride(n)  # from one part to the next
        self.size = 3 * self.stride  # elements of the whole buffer

    @classmethod
    def of(cls, module: torch.nn.Module) -> FlatLayout:
        """The layout of a module's trained parameters, named as in its state dict."""
        named = trained(module)
        return cls([p.shape for _, p in named], [n for n, _ in named])

    def view(self, buf: torch.Tensor, part: int, i: int) -> torch.Tensor:
        """Parameter i's tensor of part `part` (0 param, 1 exp_avg, 2 exp_avg_sq), a view of `buf`."""
        lo = part * self.stride + self.offsets[i]
        return buf[lo : lo + self.shapes[i].numel()].view(self.shapes[i])

    def part(self, buf: torch.Tensor, part: int) -> torch.Tensor:
        """Part `part` of `buf` as one flat view (every parameter of it, back to back)."""
        return buf[part * self.stride : part * self.stride + self.numel]

    @torch.no_grad()
    def fill(self, buf: torch.Tensor, values) -> torch.Tensor:
        """Write `values(part, i)` (a tensor of parameter i's shape, or None for zeros) into `buf`, gaps
        zeroed, so that a buffer's bytes depend on its values only. Returns buf."""
        for k in range(3):
            for i in range(len(self.shapes)):
                src, dst = values(k, i), self.view(buf, k, i)
                dst.copy_(src.reshape(dst.shape)) if src is not None else dst.zero_()
            buf[k * self.stride + self.numel : (k + 1) * self.stride].zero_()
        return buf

    def gather(self, buf: torch.Tensor, params, state) -> torch.Tensor:
        """Write the parameters' current values and their moments in `state` (an optimizer's per-parameter
        state; zeros where a moment does not exist yet) into `buf`. Returns buf."""
        params = list(params)

        def values(k, i):
            return (
                params[i].data
                if k == 0
                else state[params[i]].get(self.PARTS[k])
                if params[i] in state
                else None
            )

        return self.fill(buf, values)

    def bind(self, buf: torch.Tensor | None, params, state) -> None:
        """Make the parameters and their moments in `state` views of `buf`, or, with None, zero-stride
        placeholders that hold no memory (a block paged out to disk). Nothing is copied."""
        for i, p in enumerate(params):
            st = state.setdefault(p, {})
            st.setdefault("step", torch.tensor(0.0))
            if buf is None:
                p.data = torch.zeros((), dtype=p.dtype).expand(p.shape)
                st["exp_avg"] = st["exp_avg_sq"] = p.data
            else:
                p.data, st["exp_avg"], st["exp_avg_sq"] = (self.view(buf, k, i) for k in range(3))

    def to_tensors(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """The buffer as named CPU tensors, the checkpoint format (copies: `buf` may be reused)."""
        buf = buf.cpu()
        return {
            f"{part}/{name}": self.view(buf, k, i).clone()
            for i, name in enumerate(self.names)
            for k, part in enumerate(self.PARTS)
        }

    def from_tensors(self, tensors: dict[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """The inverse of `to_tensors`, into `out` (a new CPU buffer if None); a missing moment is zeros."""
        out = torch.empty(self.size, dtype=torch.float32) if out is None else out
        return self.fill(out, lambda k, i: tensors.get(f"{self.PARTS[k]}/{self.names[i]}"))


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
        self.layout = FlatLayout([p.shape for p in self.params])
        self.numel, self.stride = self.layout.numel, self.layout.stride
        self.param_bf16: torch.Tensor | None = None
        self._bf16_copy = bf16_copy
        if pack:
            self.pack()

    @torch.no_grad()
    def pack(self) -> None:
        """Move the parameters and moments (zeros where none yet) into one new flat buffer, unchanged."""
        buf = torch.empty(self.layout.size, dtype=torch.float32, device=self.params[0].device)
        self.layout.bind(self.layout.gather(buf, self.params, self.state), self.params, self.state)
        for p in self.params:
            # a copy: a loaded state dict may share its step tensors with the optimizer it came from
            self.state[p]["step"] = self.state[p]["step"].detach().clone()
        if self._bf16_copy:
            self.param_bf16 = self.layout.part(buf, 0).to(torch.bfloat16)

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
        device = self.params[0].device
        # One call over the flat buffers pays on CUDA (one launch). On the CPU the update is the reference,
        # elementwise, and over the flat buffers it would hold three temporaries the size of the block (the
        # gathered gradients, sqrt(exp_avg_sq) and its quotient): 1.4 GB on bench_memory's 120M end-to-end
        # step, 70% above the rest of its peak. One parameter at a time gives the same bits with temporaries
        # the size of the largest parameter.
        one_call = device.type == "cuda" and len(with_grad) == len(self.params) and len(steps) == 1
        flat = self.flat() if one_call else None
        if device.type != "cuda":
            ops.select("adamw_", self.kernels, device)  # an explicit request that cannot run here raises
        if flat is not None:
            grad = torch.cat([p.grad.reshape(-1) for p in self.params])
            ops.adamw_(
                flat[0], grad, flat[1], flat[2], **hp, step=steps.pop(), grad_scale=grad_scale,
                param_bf16=self.param_bf16, kernels=self.kernels,
            )  # fmt: skip
        else:  # the CPU, not laid out flat, or some parameters without a gradient: one tensor at a time
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
