"""The CUDA C++ kernels of csrc/ (module dblocks_fast._C) as torch custom ops with autograd.

`dblocks_fast.ops` registers these as the "cuda" implementation of adaln_modulate, gated_residual_adaln,
edm_l2_loss and adamw_ (kernels="cuda"; of these, "auto" picks only the AdamW step, see ops). The C library
takes contiguous rows of one dtype per role; the launchers here bring inputs to that form (casting mixed
dtypes to their promotion, copying only what is not already contiguous) and launch on the current stream.
Each op is a `dblocks::cuda_*` torch.library custom op built by `kernels._custom_op` from the definition the
Triton op has too (`kernels._opdefs`): only the forward and backward launchers differ, the schema, fake and
autograd are the same code.
"""

from __future__ import annotations

import torch

from . import _C_loader
from .kernels import _custom_op, _opdefs

__all__ = ["available", "adaln_modulate", "gated_residual_adaln", "edm_l2_loss", "fused_adamw_"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def available(device: torch.device) -> bool:
    """Can the CUDA kernels run on tensors of `device`? (a CUDA device, and _C built and importable)"""
    return device.type == "cuda" and _C_loader.load() is not None


def _ext():
    ext = _C_loader.load()
    if ext is None:
        raise RuntimeError(f"dblocks_fast._C is unavailable: {_C_loader.why_unavailable()}")
    return ext


def _code(dtype: torch.dtype) -> int:
    ext = _ext()
    return {torch.float32: ext.FLOAT32, torch.bfloat16: ext.BFLOAT16, torch.float16: ext.FLOAT16}[dtype]


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _on(device: torch.device):
    """Make `device` current around a _C call: its kernels launch on the current device, and a stream of
    another device (tensors on cuda:1 while cuda:0 is current) would fail the launch."""
    return torch.cuda.device(device)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _check(op: str, device_of: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype not in _FLOATS:
            raise ValueError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.device != device_of.device:
            raise ValueError(f"{op}: {name} is on {t.device}, expected {device_of.device} like the others")
    if not available(device_of.device):
        raise RuntimeError(
            f"{op}: the CUDA kernels need CUDA tensors and a built dblocks_fast._C (tensors on "
            f"{device_of.device}; _C: {_C_loader.why_unavailable() or 'built'}). "
            "Use kernels='auto' or 'torch'."
        )


# --- adaln ------------------------------------------------------------------------------------------------
def _modulation(act: torch.dtype, *vectors: torch.Tensor, also=()) -> tuple[list[torch.Tensor], int]:
    """(vectors, row stride) with one dtype, unit column stride and a shared row stride (no copy if so).

    The C library takes modulation in the activations' dtype `act` or in float32; any other mix is
    converted to float32 (the vectors are (N, D): small). `also`: more dtypes the choice must hold, such as
    that of a gradient the kernel writes in the modulation dtype for a vector it does not read (dshift).
    """
    dtype = vectors[0].dtype
    for dt in [v.dtype for v in vectors[1:]] + list(also):
        dtype = torch.promote_types(dtype, dt)
    if dtype not in (act, torch.float32):
        dtype = torch.float32
    d = vectors[0].shape[1]
    strides = {v.stride(0) for v in vectors}
    if all(v.dtype == dtype and (v.stride(1) == 1 or d == 1) for v in vectors) and len(strides) == 1:
        stride = strides.pop()
        if stride >= d:  # e.g. the chunks of one (N, 6D) modulation vector
            return list(vectors), stride
    return [v.to(dtype).contiguous() for v in vectors], d


def _adaln_checks(op, x, vectors: dict, tensors: dict, eps: float) -> None:
    _check(op, x, x=x, **vectors, **tensors)
    if x.ndim != 3 or x.numel() == 0:
        raise ValueError(f"{op}: x must be a non-empty (N, T, D) tensor, got shape {tuple(x.shape)}")
    n, _, d = x.shape
    for name, v in vectors.items():
        if v.shape != (n, d):
            raise ValueError(f"{op}: {name} must be (N, D) = {(n, d)}, got {tuple(v.shape)}")
    for name, v in tensors.items():
        if v.shape != x.shape:
            raise ValueError(f"{op}: {name} must have x's shape {tuple(x.shape)}, got {tuple(v.shape)}")
    if not eps > 0:
        raise ValueError(f"{op}: eps must be positive, got {eps}")


def _adaln_forward(x, y, gate, shift, scale, eps):
    n, t, d = x.shape
    gated = y is not None
    act = x.dtype if not gated else torch.promote_types(torch.promote_types(x.dtype, y.dtype), gate.dtype)
    x = x.to(act).contiguous()
    y = y.to(act).contiguous() if gated else None
    mods, stride = _modulation(act, shift, scale, *([gate] if gated else []))
    h = torch.empty((n, t, d), dtype=act, device=x.device)
    x_new = torch.empty_like(h) if gated else None
    mean = torch.empty((n * t,), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    with _on(x.device):
        _ext().adaln_forward(
            _ptr(x), _ptr(y), _ptr(mods[2] if gated else None), _ptr(mods[0]), _ptr(mods[1]), _ptr(x_new),
            _ptr(h), _ptr(mean), _ptr(rstd), n, t, d, stride, _code(act), _code(mods[0].dtype), float(eps),
            _stream(x.device),
        )  # fmt: skip
    return x_new, h, mean, rstd


def _adaln_backward(x, y, gate, scale, mean, rstd, dx_new, dh, *dtypes):
    """(dx, dy, dgate, dshift, dscale) in `dtypes` (see `kernels._opdefs.build_adaln`); x is the forward's
    x, or its x_new when gated (y given).

    The kernel writes the modulation gradients in the modulation dtype, chosen to hold dshift's dtype too: a
    float32 shift beside bf16 scale gets a float32 dshift, not a bf16 one cast up."""
    n, t, d = x.shape
    gated = y is not None
    act = x.dtype
    # None: that output did not reach the loss. The kernel reads dh, and takes a NULL dx_new as zero.
    dh = torch.zeros_like(x) if dh is None else dh
    x = x.contiguous()
    dh = dh.to(act).contiguous()
    dx_new = dx_new.to(act).contiguous() if dx_new is not None else None
    y = y.to(act).contiguous() if gated else None  # the kernel reads y in x_new's dtype (e.g. bf16 y, fp32 x)
    also = (dtypes[3],) if dtypes[3] is not None else ()
    mods, stride = _modulation(act, scale, *([gate] if gated else []), also=also)
    mod = mods[0].dtype
    dx = torch.empty((n, t, d), dtype=act, device=x.device)
    dy = torch.empty_like(dx) if gated else None
    dshift = torch.empty((n, d), dtype=mod, device=x.device)
    dscale = torch.empty_like(dshift)
    dgate = torch.empty_like(dshift) if gated else None
    ext = _ext()
    workspace = torch.empty(
        (ext.adaln_backward_workspace(n, t, d, int(gated)),), dtype=torch.float32, device=x.device
    )
    with _on(x.device):
        ext.adaln_backward(
            _ptr(dh), _ptr(dx_new), _ptr(x), _ptr(y),
            _ptr(mods[1] if gated else None), _ptr(mods[0]), _ptr(mean), _ptr(rstd), _ptr(dx), _ptr(dy),
            _ptr(dshift), _ptr(dscale), _ptr(dgate), _ptr(workspace), n, t, d, stride, _code(act), _code(mod),
            _stream(x.device),
        )  # fmt: skip
    return _custom_op.as_requested((dx, dy, dgate, dshift, dscale), dtypes)


# custom ops with the schemas, fakes and autograd of kernels/_opdefs.py (the Triton ops' too)
_adaln_op, _gated_op = _opdefs.build_adaln("dblocks::cuda_", _adaln_forward, _adaln_backward)


def adaln_modulate(x, shift, scale, eps: float = 1e-6) -> torch.Tensor:
    """h = LayerNorm(x) * (1 + scale[:, None]) + shift[:, None] by the CUDA kernel (ops.adaln_modulate)."""
    _adaln_checks("adaln_modulate", x, {"shift": shift, "scale": scale}, {}, eps)
    return _adaln_op(x, shift, scale, float(eps))[0]


def gated_residual_adaln(x, y, gate, shift, scale, eps: float = 1e-6):
    """(x + gate * y, adaln_modulate of that) on the CUDA kernel (see ops.gated_residual_adaln)."""
    _adaln_checks("gated_residual_adaln", x, {"gate": gate, "shift": shift, "scale": scale}, {"y": y}, eps)
    xnew, h, _, _ = _gated_op(x, y, gate, shift, scale, float(eps))
    return xnew, h


# --- edm_l2_loss ------------------------------------------------------------------------------------------
def _loss_checks(z, f, y, sigma, sigma_data) -> None:
    _check("edm_l2_loss", f, z=z, f=f, y=y)
    if not (z.shape == f.shape == y.shape) or z.dim() < 1 or z.shape[0] == 0 or z.numel() == 0:
        raise ValueError(
            f"edm_l2_loss: z, f and y must have one non-empty shape (N, ...), got z {tuple(z.shape)}, "
            f"f {tuple(f.shape)}, y {tuple(y.shape)}"
        )
    if sigma.dim() != 1 or sigma.shape[0] != z.shape[0] or sigma.device != z.device:
        raise ValueError(
            f"edm_l2_loss: sigma must be 1-D of length N = {z.shape[0]} on {z.device}, got shape "
            f"{tuple(sigma.shape)} on {sigma.device}"
        )
    if not sigma_data > 0:
        raise ValueError(f"edm_l2_loss: sigma_data must be positive, got {sigma_data}")


def _common(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _loss_forward(z, f, y, sigma, sigma_data: float, save_r: bool):
    """(loss, per_sample, r); r = 2 w (D - y) / M of f's shape when save_r, else an empty placeholder."""
    n = f.shape[0]
    m = f.numel() // n
    dtype = _common(z, f, y)
    z2, f2, y2 = (t.to(dtype).reshape(n, m).contiguous() for t in (z, f, y))
    s = sigma.to(torch.float32).contiguous()
    per = torch.empty((n,), dtype=torch.float32, device=f.device)
    loss = torch.empty((), dtype=torch.float32, device=f.device)
    r = torch.empty(f.shape if save_r else (0,), dtype=torch.float32, device=f.device)
    ext = _ext()
    workspace = torch.empty((ext.edm_l2_loss_workspace(n, m),), dtype=torch.float32, device=f.device)
    with _on(f.device):
        ext.edm_l2_loss_forward(
            _ptr(z2), _ptr(f2), _ptr(y2), _ptr(s), _ptr(per), _ptr(loss), _ptr(r) if save_r else 0,
            _ptr(workspace), n, m, float(sigma_data), _code(dtype), _stream(f.device),
        )  # fmt: skip
    return loss, per, r


def _loss_backward(r, sigma, g_loss, g_per, sigma_data: float, dz_dtype, df_dtype, dy_dtype):
    """(dz, df, dy) in the dtypes asked for, a placeholder for each one not asked for; one pass per dtype.
    A None g_loss or g_per is zero (a NULL pointer to the kernel)."""
    n = r.shape[0]
    m = r.numel() // n
    dtypes = (dz_dtype, df_dtype, dy_dtype)
    grads = [
        torch.empty(r.shape if dt else (0,), dtype=dt or torch.float32, device=r.device) for dt in dtypes
    ]
    g_loss = g_loss.to(torch.float32).contiguous() if g_loss is not None else None
    g_per = g_per.to(torch.float32) if g_per is not None else None
    r = r.contiguous()
    s = sigma.to(torch.float32).contiguous()
    ext = _ext()
    for dtype in dict.fromkeys(dt for dt in dtypes if dt is not None):  # usually one dtype: one launch
        wanted = [_ptr(g) if dt == dtype else 0 for g, dt in zip(grads, dtypes)]
        with _on(r.device):
            ext.edm_l2_loss_backward(
                _ptr(r), _ptr(s), _ptr(g_loss), _ptr(g_per), g_per.stride(0) if g_per is not None else 0,
                *wanted, n, m, float(sigma_data), _code(dtype), _stream(r.device),
            )  # fmt: skip
    return tuple(grads)


_loss_op = _custom_op.build("dblocks::cuda_edm_l2_loss", _opdefs.EDM_L2_LOSS, _loss_forward, _loss_backward)


def edm_l2_loss(z, f, y, sigma, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per_sample) of the EDM-weighted L2 loss on the CUDA kernel (see ops.edm_l2_loss)."""
    _loss_checks(z, f, y, sigma, sigma_data)
    save_r = torch.is_grad_enabled() and (z.requires_grad or f.requires_grad or y.requires_grad)
    loss, per_sample, _ = _loss_op(z, f, y, sigma, float(sigma_data), save_r)
    return loss, per_sample


# --- fused AdamW ------------------------------------------------------------------------------------------
def fused_adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    param_bf16: torch.Tensor | None = None,
) -> None:
    """One AdamW step in place over flat contiguous float32 CUDA buffers, in one kernel (see ops.adamw_).

    grad_scale / found_inf: optional one-element float32 tensors on the device (grad is divided by the
    scale; a nonzero flag skips the update). param_bf16: optional bfloat16 buffer that receives the new param.
    """
    flat = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    for name, t in flat.items():
        if t.dtype != torch.float32 or not t.is_contiguous() or t.shape != param.shape:
            raise ValueError(
                f"fused_adamw_: {name} must be a contiguous float32 tensor of param's shape "
                f"{tuple(param.shape)}, got {t.dtype} {tuple(t.shape)}"
                + ("" if t.is_contiguous() else " (not contiguous)")
            )
        if t.device != param.device:
            raise ValueError(f"fused_adamw_: {name} is on {t.device}, param on {param.device}")
    bad_copy = param_bf16 is not None and (
        param_bf16.dtype != torch.bfloat16
        or param_bf16.shape != param.shape
        or not param_bf16.is_contiguous()
    )
    if bad_copy:
        raise ValueError("fused_adamw_: param_bf16 must be a contiguous bfloat16 tensor of param's shape")
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and (t.numel() != 1 or t.dtype != torch.float32 or t.device != param.device):
            raise ValueError(f"fused_adamw_: {name} must be a one-element float32 tensor on {param.device}")
    if not available(param.device):
        raise RuntimeError(f"fused_adamw_ needs a CUDA tensor and a built _C ({_C_loader.why_unavailable()})")
    with _on(param.device):
        _ext().fused_adamw_f32(
            _ptr(param), _ptr(grad), _ptr(exp_avg), _ptr(exp_avg_sq), _ptr(param_bf16), param.numel(),
            float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), int(step),
            _ptr(grad_scale), _ptr(found_inf), _stream(param.device),
        )  # fmt: skip
