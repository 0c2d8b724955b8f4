"""One entry per fusable op, and the one function that picks its implementation.

Models and the optimizer call these functions, never a kernel directly. Each op has a torch reference here
(the fallback, the test oracle and the benchmark baseline); fast implementations (Triton in
`dblocks_fast.kernels`, CUDA in `dblocks_fast.cuda_ops`, both custom ops built by one helper,
`kernels/_custom_op.py`) register themselves with `register` and are chosen by `select`:

  kernels="auto"   the first of cuda, triton, torch that may be picked on the inputs' device: today Triton
                   on CUDA (the CUDA C++ ops are opt-in until a GPU run has checked and timed them; the AdamW
                   step is the exception, for the reason given where it is registered), else the torch
                   implementation; a fast path that cannot run on a CUDA device falls back with one warning.
  kernels="torch"  the reference (for adamw_ on CUDA: torch._fused_adamw_).
  kernels="triton" / "cuda"  exactly that implementation; raises if it is not registered or cannot run
                   (`check_kernels` says so up front, for all ops at once: the trainer calls it first).

Env flags DBLOCKS_DISABLE_TRITON=1 / DBLOCKS_DISABLE_CUDA=1 take a backend out of "auto" (for bisecting).
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import precond
from .config import KERNELS

__all__ = [
    "KERNELS",
    "register",
    "select",
    "check_kernels",
    "available",
    "adaln_modulate",
    "gated_residual_adaln",
    "edm_l2_loss",
    "adaln_modulate_ref",
    "gated_residual_adaln_ref",
    "edm_l2_loss_ref",
    "weighted_linear_cross_entropy",
    "weighted_linear_cross_entropy_ref",
    "adamw_",
    "adamw_ref_",
]

_PREFERENCE = ("cuda", "triton", "torch")  # what "auto" tries, in order


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    usable: Callable[[torch.device], bool]  # can this implementation run on tensors of that device?
    auto: Callable[[torch.device], bool]  # may kernels="auto" pick it there? (not the Triton interpreter)
    needs: str  # what it needs to run, for the error of an explicit request that cannot be met


_REGISTRY: dict[str, dict[str, _Impl]] = {}
_WARNED: set[tuple[str, str]] = set()


def register(
    op: str,
    backend: str,
    fn: Callable,
    usable: Callable[[torch.device], bool],
    auto: Callable[[torch.device], bool] | None = None,
    needs: str = "",
) -> None:
    """Make `fn` the `backend` implementation of `op`; `auto`: where "auto" may pick it (default: usable);
    `needs`: what it needs to run, said when it is asked for where it cannot."""
    if backend not in _PREFERENCE:
        raise ValueError(f"unknown backend {backend!r}; expected one of {_PREFERENCE}")
    _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, usable, auto or usable, needs)


def available(op: str) -> tuple[str, ...]:
    """Backends registered for `op`."""
    return tuple(b for b in _PREFERENCE if b in _REGISTRY.get(op, {}))


def _disabled(backend: str) -> bool:
    return os.environ.get(f"DBLOCKS_DISABLE_{backend.upper()}", "0") not in ("", "0")


def select(op: str, kernels: str, device: torch.device) -> Callable:
    """The implementation of `op` for `kernels` on `device` (see the module docstring)."""
    impls = _REGISTRY[op]
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels != "auto":
        impl = impls.get(kernels)
        if impl is None:
            raise RuntimeError(
                f"kernels={kernels!r} was requested for {op}, but this build has no {kernels} implementation "
                f"of it (registered: {', '.join(available(op))}). Use kernels='auto' or 'torch'."
            )
        if not impl.usable(device):
            needs = f": it needs {impl.needs}" if impl.needs else ""
            raise RuntimeError(f"the {kernels} implementation of {op} cannot run on device {device}{needs}.")
        return impl.fn
    skipped = None  # a fast path "auto" would have taken on this device, had it been able to run
    for backend in _PREFERENCE:
        impl = impls.get(backend)
        if impl is None or _disabled(backend):
            continue
        if impl.auto(device):
            if skipped is not None and (op, skipped) not in _WARNED:
                _WARNED.add((op, skipped))
                msg = f"{op}: the {skipped} kernel is unavailable on {device}; using the {backend} one."
                warnings.warn(msg, stacklevel=3)
            return impl.fn
        # usable but not for "auto" (the Triton interpreter), or never an "auto" candidate: nothing to say
        if not impl.usable(device) and impl.auto is not _not_auto and device.type == "cuda":
            skipped = skipped or backend
    raise AssertionError(f"{op} has no usable implementation")  # the torch reference is always usable


def check_kernels(kernels: str, device: torch.device) -> None:
    """Raise ValueError now if `kernels` names a backend that cannot run on `device`, which `select` would
    otherwise raise at the first call of an op (in the trainer: after the run folder is written).

    "auto" and "torch" always run. An explicit "triton" or "cuda" must run every op it implements.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels in ("auto", "torch"):
        return
    impls = {op: by_backend[kernels] for op, by_backend in _REGISTRY.items() if kernels in by_backend}
    unusable = [(op, impl) for op, impl in impls.items() if not impl.usable(device)]
    if impls and not unusable:
        return
    why = f"it needs {unusable[0][1].needs}" if unusable else f"this build has no {kernels} implementation"
    raise ValueError(
        f"kernels={kernels!r} (--kernels {kernels}) cannot run on device {device}: {why}. Use kernels='auto' "
        f"(the fastest implementation that runs here) or 'torch' (the reference)."
    )


def _any_device(device: torch.device) -> bool:
    return True


def _not_auto(device: torch.device) -> bool:
    """The `auto` of an implementation that kernels="auto" never picks (it must be asked for by name)."""
    return False


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# --- adaln_modulate ---------------------------------------------------------------------------------------
def adaln_modulate_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """LayerNorm(x, no affine) * (1 + scale[:, None]) + shift[:, None], computed in fp32 for half inputs."""
    xf = _upcast(x)
    y = F.layer_norm(xf, (x.shape[-1],), eps=eps)
    y = y * (1 + _upcast(scale)[:, None]) + _upcast(shift)[:, None]
    return y.to(x.dtype)


def adaln_modulate(x, shift, scale, eps: float = 1e-6, kernels: str = "auto") -> torch.Tensor:
    """AdaLN modulation (DiT): y = LayerNorm(x) * (1 + scale) + shift.

    Args:
        x: (N, T, D) activations. shift, scale: (N, D) per-sample modulation.
    Returns:
        y of x's shape and dtype.
    """
    return select("adaln_modulate", kernels, x.device)(x, shift, scale, eps)


# --- gated_residual_adaln ---------------------------------------------------------------------------------
def gated_residual_adaln_ref(x, y, gate, shift, scale, eps: float = 1e-6):
    """(x + gate[:, None] * y, adaln_modulate(that, shift, scale))."""
    x_new = x + gate[:, None] * y
    return x_new, adaln_modulate_ref(x_new, shift, scale, eps)


def gated_residual_adaln(x, y, gate, shift, scale, eps: float = 1e-6, kernels: str = "auto"):
    """The seam between one AdaLN-Zero sub-layer and the next: the gated residual, then the next norm.

    Args:
        x: (N, T, D) residual stream. y: (N, T, D) branch output. gate, shift, scale: (N, D).
    Returns:
        (x_new, h): x_new = x + gate * y, h = LayerNorm(x_new) * (1 + scale) + shift.
    """
    return select("gated_residual_adaln", kernels, x.device)(x, y, gate, shift, scale, eps)


# --- edm_l2_loss ------------------------------------------------------------------------------------------
def edm_l2_loss_ref(z, f, y, sigma, sigma_data: float = precond.SIGMA_DATA):
    """(loss, per_sample): per_sample[i] = w(sigma_i) * mean_j (D_ij - y_ij)^2, loss = mean_i per_sample[i].

    D = c_skip z + c_out f. Computed in fp32 (or fp64 for fp64 inputs) whatever the input dtype.
    """
    dt = torch.float64 if f.dtype == torch.float64 else torch.float32
    s = sigma.to(dt)
    d = precond.denoise(z.to(dt), f.to(dt), s, sigma_data)
    per_sample = precond.loss_weight(s, sigma_data) * (d - y.to(dt)).square().flatten(1).mean(1)
    return per_sample.mean(), per_sample


def edm_l2_loss(z, f, y, sigma, sigma_data: float = precond.SIGMA_DATA, kernels: str = "auto"):
    """EDM score-matching loss of a denoiser output, weighted by w(sigma) = 1 / c_out^2.

    Args:
        z: (N, ...) noisy input y + sigma * eps. f: (N, ...) raw network output F. y: (N, ...) clean target.
        sigma: (N,) noise levels.
    Returns:
        (loss, per_sample): loss = mean over all elements of w(sigma) (c_skip z + c_out f - y)^2, a scalar;
        per_sample the (N,) per-example means, for logging (no second pass).
    """
    return select("edm_l2_loss", kernels, f.device)(z, f, y, sigma, sigma_data)


# --- weighted_linear_cross_entropy -----------------------------------------------------------------------
def weighted_linear_cross_entropy_ref(h, weight, target, row_weight=None):
    """mean_r row_weight[r] * CE(h[r] @ weight.T, target[r]), with the full logits (half upcast to fp32)."""
    logits = _upcast(h.reshape(-1, h.shape[-1]) @ weight.t())
    ce = F.cross_entropy(logits, target.reshape(-1).long(), reduction="none")
    return (ce if row_weight is None else ce * row_weight.reshape(-1).to(ce.dtype)).mean()


def weighted_linear_cross_entropy(h, weight, target, row_weight=None, kernels: str = "auto") -> torch.Tensor:
    """The output head of discrete targets: a linear map to logits, then weighted cross-entropy.

    Args:
        h: (..., D) hidden states. weight: (V, D) the head's matrix. target: (...) int64 in [0, V).
        row_weight: (...) per-row weights (e.g. w(sigma) of DiffusionBlocks), or None for ones.
    Returns:
        The scalar mean over rows of row_weight * CE(h @ weight.T, target). The Triton implementation works
        in chunks of rows, so the (rows x V) logits never exist at once.
    """
    return select("weighted_linear_cross_entropy", kernels, h.device)(h, weight, target, row_weight)


# --- adamw_ -----------------------------------------------------------------------------------------------
def adamw_ref_(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """One AdamW step in place: torch.optim.AdamW's single-tensor update (torch 2.x), operation for operation.

    step is the step being taken (1 for the first). Python floats meet the tensors as torch's do.
    """
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def _adamw_torch_(
    param, grad, exp_avg, exp_avg_sq, *, grad_scale=None, found_inf=None, param_bf16=None, **hp
):
    """kernels="torch": torch._fused_adamw_ on CUDA; elsewhere the reference, whose result is bit for bit
    torch.optim.AdamW's (torch's fused CPU kernel differs in the last bit)."""
    if param.device.type == "cuda":
        steps = torch.full((), float(hp.pop("step")), device=param.device)
        torch._fused_adamw_(
            [param], [grad], [exp_avg], [exp_avg_sq], [], [steps], **hp, amsgrad=False, maximize=False,
            grad_scale=grad_scale, found_inf=found_inf,
        )  # fmt: skip
    elif found_inf is not None and bool(found_inf.item()):
        return
    else:
        adamw_ref_(param, grad if grad_scale is None else grad / grad_scale, exp_avg, exp_avg_sq, **hp)
    if param_bf16 is not None:
        param_bf16.copy_(param)


def adamw_(param, grad, exp_avg, exp_avg_sq, *, kernels: str = "auto", **hyper) -> None:
    """One AdamW step in place over flat float32 buffers (the update of optim.AdamW).

    Args:
        param, grad, exp_avg, exp_avg_sq: float32 tensors of one shape on one device (contiguous for "cuda").
        hyper: lr, beta1, beta2, eps, weight_decay and step (the step being taken, 1 for the first), as in
            adamw_ref_; optional grad_scale (a one-element tensor: the gradient is grad / grad_scale),
            found_inf (a one-element tensor: when nonzero nothing changes, and the caller should not count
            the step) and param_bf16 (a bfloat16 buffer that receives the new weights).
    """
    select("adamw_", kernels, param.device)(param, grad, exp_avg, exp_avg_sq, **hyper)


# --- registration ---------------------------------------------------------------------------------------
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_usable(device: torch.device) -> bool:
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return _HAS_TRITON and (device.type == "cuda" or interpreting)


def _triton_auto(device: torch.device) -> bool:
    return _HAS_TRITON and device.type == "cuda"  # the interpreter is for tests, never chosen by itself


def _triton(name: str) -> Callable:
    """The Triton op `name`, imported on first use so `import dblocks_fast` never imports triton."""

    def call(*args, **kwargs):
        from . import kernels

        return getattr(kernels, name)(*args, **kwargs)

    call.__name__ = f"triton_{name}"
    return call


for _op, _ref in [
    ("adaln_modulate", adaln_modulate_ref),
    ("gated_residual_adaln", gated_residual_adaln_ref),
    ("edm_l2_loss", edm_l2_loss_ref),
    ("weighted_linear_cross_entropy", weighted_linear_cross_entropy_ref),
]:
    register(_op, "torch", _ref, _any_device)
register("adamw_", "torch", _adamw_torch_, _any_device)
_TRITON_NEEDS = "CUDA tensors (or TRITON_INTERPRET=1 on the CPU) and triton installed"
for _op in ("adaln_modulate", "gated_residual_adaln", "edm_l2_loss", "weighted_linear_cross_entropy"):
    register(_op, "triton", _triton(_op), _triton_usable, _triton_auto, _TRITON_NEEDS)


def _cuda_usable(device: torch.device) -> bool:
    from . import _C_loader

    return device.type == "cuda" and _C_loader.load() is not None


def _cuda(name: str) -> Callable:
    """The csrc/ op `name` (dblocks_fast.cuda_ops), imported on first use."""

    def call(*args, **kwargs):
        from . import cuda_ops

        return getattr(cuda_ops, name)(*args, **kwargs)

    call.__name__ = f"cuda_{name}"
    return call


_CUDA_NEEDS = "CUDA tensors and a built dblocks_fast._C"
# The CUDA ops are not picked by "auto" until a GPU run has checked them and timed them against Triton (the
# GPU tests and benchmarks/bench_kernels.py); kernels="cuda" selects them.
for _op in ("adaln_modulate", "gated_residual_adaln", "edm_l2_loss"):
    register(_op, "cuda", _cuda(_op), _cuda_usable, _not_auto, _CUDA_NEEDS)
# AdamW's "auto" takes the CUDA kernel wherever _C is built, as optim.AdamW always did: there is no Triton
# AdamW for it to be timed against, and torch._fused_adamw_ (the fallback) cannot write the bf16 copy of the
# weights in the same pass.
register("adamw_", "cuda", _cuda("fused_adamw_"), _cuda_usable, needs=_CUDA_NEEDS)
