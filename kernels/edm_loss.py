"""Fused EDM L2 loss (Karras et al. 2022, eq. 2 and Table 1) with its backward, as Triton kernels.

For z, f, y of shape (N, ...) with M = numel / N elements per sample and noise levels sigma (N,):

    D             = c_skip(sigma) z + c_out(sigma) f          c_skip = sd^2 / (sigma^2 + sd^2)
    per_sample[n] = w(sigma_n) mean_j (D_nj - y_nj)^2         c_out  = sigma sd / sqrt(sigma^2 + sd^2)
    loss          = mean_n per_sample[n]                      w      = (sigma^2 + sd^2) / (sigma sd)^2

with sd = sigma_data. The forward reads z, f and y once: a (N, chunks of M) grid writes one partial sum of
(D - y)^2 per program and, when some input needs a gradient, r = 2 w (D - y) / M, the gradient of
per_sample[n] with respect to D_n. A one-program kernel reduces the partials (no atomics, so the result is
deterministic). The backward is a scale of r: dD = (g_loss / N + g_per[n]) r, then df = c_out dD,
dz = c_skip dD, dy = -dD, written in one pass for the inputs that need them. sigma is a constant: it gets
no gradient.

Both directions are torch.library custom ops (`dblocks::edm_l2_loss`, `dblocks::edm_l2_loss_backward`),
built by `_custom_op` from the op's definition in `_opdefs` (which the CUDA op shares), so the op composes
with autograd and traces under torch.compile.
"""

import torch
import triton
import triton.language as tl

from . import _custom_op, _opdefs, _utils

__all__ = ["edm_l2_loss"]

_OP = "edm_l2_loss"
_MAX_BLOCK = 4096  # elements of one sample per program: 16 KiB of each fp32 input, plenty to hide latency
_REDUCE_TILE = 4096  # partial sums the one reducing program holds at a time


@triton.jit
def _coefficients(s, sigma_data):
    """(c_skip, 1 - c_skip, c_out, w) of sigma values s, computed in fp64 and returned in fp32.

    1 - c_skip = sigma^2 / (sigma^2 + sd^2) is formed directly, never as a difference: it is what keeps
    D - y accurate at small sigma (see _edm_loss_fwd_kernel). No term below cancels, so fp32 would do;
    fp64 costs nothing on a handful of scalars per program.
    """
    s = s.to(tl.float64)
    sd = tl.cast(sigma_data, tl.float64)  # a float argument arrives as fp32 (or a Python float)
    s2 = s * s
    sd2 = sd * sd
    den = s2 + sd2
    c_skip = sd2 / den
    one_minus_c_skip = s2 / den
    c_out = s * sd / tl.sqrt(den)
    w = den / (s2 * sd2)
    return c_skip.to(tl.float32), one_minus_c_skip.to(tl.float32), c_out.to(tl.float32), w


@triton.jit
def _edm_loss_fwd_kernel(
    z_ptr,
    f_ptr,
    y_ptr,
    sigma_ptr,
    r_ptr,
    part_ptr,
    M,
    n_chunks,
    stride_z,
    stride_f,
    stride_y,
    stride_sigma,
    sigma_data,
    BLOCK: tl.constexpr,
    WRITE_R: tl.constexpr,
):
    n = tl.program_id(0)
    chunk = tl.program_id(1)
    row = n.to(tl.int64)  # row * stride can pass 2^31 on large batches
    c_skip, one_minus_c_skip, c_out, w = _coefficients(tl.load(sigma_ptr + row * stride_sigma), sigma_data)

    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    z = tl.load(z_ptr + row * stride_z + offs, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + row * stride_f + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
    # D - y = c_skip z + c_out f - y, regrouped as c_skip (z - y) + c_out f - (1 - c_skip) y. At small sigma
    # c_skip z and y agree to ~sigma / |y| and the textbook order loses those digits (w ~ 2.5e5 at
    # sigma = 0.002 then magnifies the loss); here z - y is exact for z close to y, and every product is of
    # the size of the result it contributes to, at any sigma. Masked lanes load zeros and give e = 0.
    e = c_skip * (z - y) + c_out * f - one_minus_c_skip * y
    tl.store(part_ptr + row * n_chunks + chunk, tl.sum(e * e, axis=0))
    if WRITE_R:
        r_scale = (2.0 * w / M).to(tl.float32)
        tl.store(r_ptr + row * M + offs, r_scale * e, mask=mask)


@triton.jit
def _edm_loss_reduce_kernel(
    part_ptr,
    sigma_ptr,
    per_ptr,
    loss_ptr,
    N,
    M,
    n_chunks,
    stride_sigma,
    sigma_data,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One program: per_sample = w * sum of the row's partials / M, loss = mean of per_sample."""
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c0 in range(0, n_chunks, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = row_mask[:, None] & (cols < n_chunks)[None, :]
            part = tl.load(
                part_ptr + rows[:, None].to(tl.int64) * n_chunks + cols[None, :], mask=mask, other=0.0
            )
            acc += tl.sum(part, axis=1)
        sigma = tl.load(sigma_ptr + rows * stride_sigma, mask=row_mask, other=1.0)
        _, _, _, w = _coefficients(sigma, sigma_data)
        per = (w * acc.to(tl.float64) / M).to(tl.float32)
        tl.store(per_ptr + rows, per, mask=row_mask)
        total += tl.where(row_mask, per, 0.0)
    tl.store(loss_ptr, tl.sum(total, axis=0) / N)


@triton.jit
def _edm_loss_bwd_kernel(
    r_ptr,
    sigma_ptr,
    g_loss_ptr,
    g_per_ptr,
    dz_ptr,
    df_ptr,
    dy_ptr,
    M,
    inv_N,
    stride_sigma,
    stride_g_per,
    sigma_data,
    BLOCK: tl.constexpr,
    HAS_G_LOSS: tl.constexpr,
    HAS_G_PER: tl.constexpr,
    NEED_DZ: tl.constexpr,
    NEED_DF: tl.constexpr,
    NEED_DY: tl.constexpr,
):
    n = tl.program_id(0)
    chunk = tl.program_id(1)
    row = n.to(tl.int64)
    c_skip, _, c_out, _ = _coefficients(tl.load(sigma_ptr + row * stride_sigma), sigma_data)
    coef = 0.0
    if HAS_G_LOSS:
        coef += tl.load(g_loss_ptr).to(tl.float32) * inv_N
    if HAS_G_PER:
        coef += tl.load(g_per_ptr + row * stride_g_per).to(tl.float32)

    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    ptr_offs = row * M + offs  # r and the gradients are contiguous (N, M)
    d_D = coef * tl.load(r_ptr + ptr_offs, mask=mask, other=0.0)
    if NEED_DZ:
        tl.store(dz_ptr + ptr_offs, (c_skip * d_D).to(dz_ptr.dtype.element_ty), mask=mask)
    if NEED_DF:
        tl.store(df_ptr + ptr_offs, (c_out * d_D).to(df_ptr.dtype.element_ty), mask=mask)
    if NEED_DY:
        tl.store(dy_ptr + ptr_offs, (-d_D).to(dy_ptr.dtype.element_ty), mask=mask)


# --- host launchers ---------------------------------------------------------------------------------------
def _check_inputs(z, f, y, sigma, sigma_data) -> torch.device:
    _utils.check_float(_OP, z=z, f=f, y=y)
    _utils.check(
        z.shape == f.shape == y.shape,
        f"{_OP}: z, f and y must have the same shape (N, ...), got z {tuple(z.shape)}, f {tuple(f.shape)}, "
        f"y {tuple(y.shape)}; broadcast or reshape them before the call",
    )
    _utils.check(z.dim() >= 1, f"{_OP}: z, f and y must have a batch dimension (N, ...), got a 0-d tensor")
    n = z.shape[0]
    _utils.check(n > 0, f"{_OP}: the batch is empty (N = 0); skip the loss for an empty batch")
    _utils.check(
        z.numel() > 0, f"{_OP}: each sample has no elements (shape {tuple(z.shape)}); the mean is undefined"
    )
    _utils.check(
        sigma.dim() == 1 and sigma.shape[0] == n,
        f"{_OP}: sigma must be 1-D of length N = {n} (one noise level per sample), got shape "
        f"{tuple(sigma.shape)}; use sigma.reshape(-1) if it is (N, 1, ...)",
    )
    _utils.check(
        sigma.dtype in (torch.float32, torch.float64),
        f"{_OP}: sigma must be float32 or float64 (w reaches 2.5e5 at sigma = 0.002), got {sigma.dtype}; "
        f"pass sigma.float()",
    )
    _utils.check(sigma_data > 0, f"{_OP}: sigma_data must be positive, got {sigma_data}")
    return _utils.check_device(_OP, z=z, f=f, y=y, sigma=sigma)


def _rows(t: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """t as an (N, M) matrix with unit stride along M: a view where possible (e.g. a slice of a batch)."""
    t = t.reshape(n, m)
    return t if m == 1 or t.stride(1) == 1 else t.contiguous()


def _block(m: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for chunks of a sample of m elements."""
    block = min(triton.next_power_of_2(m), _MAX_BLOCK)
    # >= 8 elements a thread (two 16-byte fp32 vectors in flight), 8 warps at most: the kernels are bandwidth
    # bound and the (N, chunks) grid, not the block, supplies the parallelism
    return block, max(1, min(8, block // 256))


def _forward(z, f, y, sigma, sigma_data: float, save_r: bool):
    """(loss, per_sample, r); r = 2 w (D - y) / M of f's shape when save_r, else an empty placeholder."""
    device = _check_inputs(z, f, y, sigma, sigma_data)
    n = z.shape[0]
    m = z.numel() // n
    z2, f2, y2 = (_rows(t, n, m) for t in (z, f, y))
    block, num_warps = _block(m)
    n_chunks = triton.cdiv(m, block)

    partials = _utils.empty((n, n_chunks), torch.float32, device)
    # r is only for the backward: not even allocated when no input needs a gradient
    r = _utils.empty(f.shape if save_r else (0,), torch.float32, device)
    per_sample = _utils.empty((n,), torch.float32, device)
    loss = _utils.empty((), torch.float32, device)
    _edm_loss_fwd_kernel[(n, n_chunks)](
        z2, f2, y2, sigma, r if save_r else partials, partials, m, n_chunks,  # partials: a placeholder
        z2.stride(0), f2.stride(0), y2.stride(0), sigma.stride(0), sigma_data,
        BLOCK=block, WRITE_R=save_r, num_warps=num_warps,
    )  # fmt: skip
    block_c = min(triton.next_power_of_2(n_chunks), 64, _REDUCE_TILE)
    block_n = min(triton.next_power_of_2(n), max(1, _REDUCE_TILE // block_c))
    _edm_loss_reduce_kernel[(1,)](
        partials, sigma, per_sample, loss, n, m, n_chunks, sigma.stride(0), sigma_data,
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return loss, per_sample, r


def _backward(r, sigma, g_loss, g_per, sigma_data: float, dz_dtype, df_dtype, dy_dtype):
    """(dz, df, dy) in the dtypes asked for; a placeholder for each one not asked for. None g_*: zero."""
    device = r.device
    n = r.shape[0]
    m = r.numel() // n
    r = r.contiguous()  # already is (made by _forward); cheap insurance for direct callers of the op
    grads = [
        _utils.empty(r.shape if dt is not None else (0,), dt or torch.float32, device)
        for dt in (dz_dtype, df_dtype, dy_dtype)
    ]
    if all(dt is None for dt in (dz_dtype, df_dtype, dy_dtype)):
        return tuple(grads)
    # upstream gradients are often expanded (stride 0, e.g. from per_sample.sum()): index g_per by its stride
    g_loss_t = g_loss if g_loss is not None else r  # placeholder pointers, never read (HAS_G_* False)
    g_per_t = g_per if g_per is not None else r
    block, num_warps = _block(m)
    _edm_loss_bwd_kernel[(n, triton.cdiv(m, block))](
        r, sigma, g_loss_t, g_per_t, *(g if g.numel() else r for g in grads), m, 1.0 / n,
        sigma.stride(0), g_per.stride(0) if g_per is not None else 0, sigma_data,
        BLOCK=block, HAS_G_LOSS=g_loss is not None, HAS_G_PER=g_per is not None,
        NEED_DZ=dz_dtype is not None, NEED_DF=df_dtype is not None, NEED_DY=dy_dtype is not None,
        num_warps=num_warps,
    )  # fmt: skip
    return tuple(grads)


# --- custom ops (kernels/_custom_op.py: the schema, fake and autograd come from kernels/_opdefs.py) -------
_edm_l2_loss_op = _custom_op.build("dblocks::edm_l2_loss", _opdefs.EDM_L2_LOSS, _forward, _backward)


def edm_l2_loss(
    z: torch.Tensor, f: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, sigma_data: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM-weighted L2 loss of the denoiser D = c_skip z + c_out f against the clean target y, fused.

    per_sample[n] = w(sigma_n) * mean_j (c_skip(sigma_n) z_nj + c_out(sigma_n) f_nj - y_nj)^2 over the
    M = numel / N elements of sample n, loss = mean_n per_sample[n], with
    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), w = (sigma^2 + sd^2) / (sigma
    sd)^2 and sd = sigma_data. All arithmetic is fp32 (coefficients in fp64). Gradients flow to z, f and y;
    sigma is treated as a constant (it gets no gradient).

    Args:
        z: (N, ...) noisy input y + sigma * eps; float32, bfloat16 or float16, any strides.
        f: (N, ...) raw network output F, same shape; its own float dtype.
        y: (N, ...) clean target, same shape; its own float dtype.
        sigma: (N,) noise levels, float32 or float64.
        sigma_data: the data's standard deviation, > 0.
    Returns:
        (loss, per_sample): loss a 0-d float32 tensor, per_sample the (N,) float32 per-example values.
    """
    _check_inputs(z, f, y, sigma, sigma_data)  # here too: under torch.compile the fake runs, not _forward
    save_r = torch.is_grad_enabled() and (z.requires_grad or f.requires_grad or y.requires_grad)
    loss, per_sample, _ = _edm_l2_loss_op(z, f, y, sigma, float(sigma_data), save_r)
    return loss, per_sample
