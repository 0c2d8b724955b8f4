"""What each op is, whatever kernels compute it: its schema, its outputs' shapes, its gradients.

The Triton kernels of this package and the CUDA kernels of dblocks_fast.cuda_ops build their custom ops from
these definitions (`_custom_op.build`), so an op's schema, fake and autograd wiring exist once. torch only,
like `_custom_op`, so the CUDA ops can use it where triton is not installed.
"""

from __future__ import annotations

import torch

from ._custom_op import OpDef, build


def _row_stats(x: torch.Tensor) -> list[torch.Tensor]:
    """Fakes of the per-row fp32 mean and 1/std that the AdaLN forward keeps for the backward."""
    n, t, _ = x.shape
    return [x.new_empty((n * t,), dtype=torch.float32) for _ in range(2)]


def _adaln_fake(x, shift, scale, eps):
    return x.new_empty(x.shape), *_row_stats(x)


def _gated_fake(x, y, gate, shift, scale, eps):
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), gate.dtype)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype), *_row_stats(x)


def _edm_fake(z, f, y, sigma, sigma_data, save_r):
    f32 = torch.float32
    r = f.new_empty(f.shape if save_r else (0,), dtype=f32)
    return f.new_empty((), dtype=f32), f.new_empty((f.shape[0],), dtype=f32), r


def _lce_fake(h, weight, target, row_weight, chunk, need_dh, need_dweight, check_targets):
    grad_h = h.new_empty(h.shape if need_dh else (0,))
    grad_weight = weight.new_empty(weight.shape if need_dweight else (0,))
    return h.new_empty((), dtype=torch.float32), grad_h, grad_weight


# h = LN(x) (1 + scale) + shift; mean and rstd are the rows' statistics, kept for the backward
ADALN_MODULATE = OpDef(
    "(Tensor x, Tensor shift, Tensor scale, float eps) -> (Tensor h, Tensor mean, Tensor rstd)",
    fake=_adaln_fake,
    grad_inputs=("x", "shift", "scale"),
    grad_outputs=("h",),
    saves=("x", "scale", "mean", "rstd"),
    grad_like=("x", "scale", "scale"),
)

# x_new = x + gate y, h = LN(x_new) (1 + scale) + shift
GATED_RESIDUAL_ADALN = OpDef(
    "(Tensor x, Tensor y, Tensor gate, Tensor shift, Tensor scale, float eps)"
    " -> (Tensor x_new, Tensor h, Tensor mean, Tensor rstd)",
    fake=_gated_fake,
    grad_inputs=("x", "y", "gate", "shift", "scale"),
    grad_outputs=("x_new", "h"),
    saves=("x_new", "y", "gate", "scale", "mean", "rstd"),
    grad_like=("x_new", "y", "gate", "scale", "scale"),
)

# (loss, per-sample loss, r): r = 2 w (D - y) / M of f's shape when save_r, the backward's only input
EDM_L2_LOSS = OpDef(
    "(Tensor z, Tensor f, Tensor y, Tensor sigma, float sigma_data, bool save_r)"
    " -> (Tensor loss, Tensor per, Tensor r)",
    fake=_edm_fake,
    grad_inputs=("z", "f", "y"),
    grad_outputs=("loss", "per"),
    saves=("r", "sigma", "sigma_data"),
    grad_like=("r", "r", "r"),
)

# the forward also computes the loss's gradients (grad_h, grad_weight) where need_*; the backward scales them
WEIGHTED_LINEAR_CROSS_ENTROPY = OpDef(
    "(Tensor h, Tensor weight, Tensor target, Tensor? row_weight, SymInt chunk, bool need_dh,"
    " bool need_dweight, bool check_targets) -> (Tensor loss, Tensor grad_h, Tensor grad_weight)",
    fake=_lce_fake,
    grad_inputs=("h", "weight"),
    grad_outputs=("loss",),
    saves=("grad_h", "grad_weight"),
    grad_like=("grad_h", "grad_weight"),
)


def build_adaln(prefix: str, forward, backward) -> tuple:
    """`prefix`adaln_modulate and `prefix`gated_residual_adaln of one backend, from its two launchers of the
    gated form (the plain op is the gated one without the residual):

        forward(x, y, gate, shift, scale, eps) -> (x_new, h, mean, rstd)      y = gate = None: plain
        backward(x, y, gate, scale, mean, rstd, dx_new, dh, dx_dtype, dy_dtype, dgate_dtype, dshift_dtype,
                 dscale_dtype) -> (dx, dy, dgate, dshift, dscale)              y = gate = dx_new = None: plain

    with x the forward's x_new when gated, and the placeholder rule of _custom_op for the gradients.
    """

    def plain_forward(x, shift, scale, eps):
        _, h, mean, rstd = forward(x, None, None, shift, scale, eps)
        return h, mean, rstd

    def plain_backward(x, scale, mean, rstd, dh, dx_dtype, dshift_dtype, dscale_dtype):
        dtypes = (dx_dtype, None, None, dshift_dtype, dscale_dtype)  # no dy, no dgate
        dx, _, _, dshift, dscale = backward(x, None, None, scale, mean, rstd, None, dh, *dtypes)
        return dx, dshift, dscale

    return (
        build(f"{prefix}adaln_modulate", ADALN_MODULATE, plain_forward, plain_backward),
        build(f"{prefix}gated_residual_adaln", GATED_RESIDUAL_ADALN, forward, backward),
    )
