"""Fused AdaLN modulation (DiT), with and without the gated residual in front of it.

    adaln_modulate(x, shift, scale):                 h = LN(x) * (1 + scale) + shift
    gated_residual_adaln(x, y, gate, shift, scale):  x' = x + gate * y,  h = LN(x') * (1 + scale) + shift

LN is LayerNorm over the last dimension without affine parameters; x, y are (N, T, D), gate, shift and scale
(N, D), per sample. A row sits in registers as two power-of-two parts (1152 = 1024 + 128: `_row_parts`),
so model widths leave no lanes idle. Forward: one pass over blocks of rows, saving each row's fp32 mean and
1/std. Backward: program (n, c) walks a chunk of sample n's rows, writes dx (and dy) and keeps partial sums
of dshift, dscale (and dgate) in registers; the (N, chunks, D) partials are summed afterwards by one small
kernel, so nothing needs atomics. The grid is one wave of what the compiled kernel's occupancy fits.
Inputs are read through their strides (chunks of a modulation vector are views); math is fp32 throughout.
Kernel signatures and launches keep related arguments on one line (`fmt: skip`): pointer, shape and stride
groups read better than one argument a line.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _custom_op, _opdefs, _utils

__all__ = ["adaln_modulate", "gated_residual_adaln"]


@triton.jit
def _fwd_part(
    x_ptr, y_ptr, gate_ptr, xnew_ptr, n, t, rows, rmask, c0, D,
    sxn, sxt, sxd, syn, syt, syd, sgn, sgd,
    GATED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Columns [c0, c0 + BLOCK) of a block of rows: x (x' = x + gate * y, stored, when GATED) in fp32, their
    column offsets and mask."""
    c = (c0 + tl.arange(0, BLOCK)).to(tl.int64)
    mask = rmask[:, None] & (c[None, :] < D)
    x = tl.load(x_ptr + (n * sxn + t * sxt)[:, None] + c[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        y = tl.load(y_ptr + (n * syn + t * syt)[:, None] + c[None, :] * syd, mask=mask, other=0.0).to(
            tl.float32
        )
        g = tl.load(gate_ptr + n[:, None] * sgn + c[None, :] * sgd, mask=mask, other=0.0).to(tl.float32)
        # the statistics and h are those of x' as stored (rounded to its dtype): the backward re-reads the
        # stored x', and the CUDA kernel and the torch reference normalise that same rounded x'
        x = (x + g * y).to(xnew_ptr.dtype.element_ty)
        tl.store(xnew_ptr + rows.to(tl.int64)[:, None] * D + c[None, :], x, mask=mask)
        x = x.to(tl.float32)
    return x, c, mask


@triton.jit
def _fwd_store_h(h_ptr, shift_ptr, scale_ptr, n, rows, xc, rstd, c, mask, D, ssn, ssd, scn, scd):
    shift = tl.load(shift_ptr + n[:, None] * ssn + c[None, :] * ssd, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + n[:, None] * scn + c[None, :] * scd, mask=mask, other=0.0).to(tl.float32)
    h = xc * rstd[:, None] * (1.0 + scale) + shift
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * D + c[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_kernel(
    x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr,  # inputs (y and gate only when GATED)
    xnew_ptr, h_ptr, mean_ptr, rstd_ptr,  # outputs (xnew only when GATED); contiguous (N, T, D) and (N*T,)
    R, T, D, eps,
    sxn, sxt, sxd, syn, syt, syd, sgn, sgd, ssn, ssd, scn, scd,
    GATED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, TAIL: tl.constexpr,
):  # fmt: skip
    """A block of rows, each held in registers as BLOCK_D columns and, when TAIL > 0, TAIL more (see
    `_row_parts`)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    n = (rows // T).to(tl.int64)
    t = (rows % T).to(tl.int64)
    strides = (sxn, sxt, sxd, syn, syt, syd, sgn, sgd)
    x, c, mask = _fwd_part(
        x_ptr, y_ptr, gate_ptr, xnew_ptr, n, t, rows, rmask, 0, D, *strides, GATED, BLOCK_D
    )
    total = tl.sum(x, axis=1)
    if TAIL > 0:
        x2, c2, mask2 = _fwd_part(
            x_ptr, y_ptr, gate_ptr, xnew_ptr, n, t, rows, rmask, BLOCK_D, D, *strides, GATED, TAIL
        )
        total += tl.sum(x2, axis=1)
    mean = total / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1)
    if TAIL > 0:
        xc2 = tl.where(mask2, x2 - mean[:, None], 0.0)
        var += tl.sum(xc2 * xc2, axis=1)
    rstd = 1.0 / tl.sqrt(var / D + eps)
    _fwd_store_h(h_ptr, shift_ptr, scale_ptr, n, rows, xc, rstd, c, mask, D, ssn, ssd, scn, scd)
    if TAIL > 0:
        _fwd_store_h(h_ptr, shift_ptr, scale_ptr, n, rows, xc2, rstd, c2, mask2, D, ssn, ssd, scn, scd)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _bwd_load(
    dh_ptr, x_ptr, n, t, c, mask, scale, mean, rstd,
    sdn, sdt, sdd, sxn, sxt, sxd,
):  # fmt: skip
    """dh, x-hat and g = dh * (1 + scale) of a block of rows, at columns c."""
    x = tl.load(x_ptr + (n * sxn + t * sxt)[:, None] + c[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + (n * sdn + t * sdt)[:, None] + c[None, :] * sdd, mask=mask, other=0.0).to(
        tl.float32
    )
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    return dh, xhat, dh * (1.0 + scale[None, :])


@triton.jit
def _bwd_store(
    dxnew_ptr, y_ptr, dx_ptr, dy_ptr, n, t, row, c, mask, gate, dh, xhat, g, m1, m2, rstd,
    acc_shift, acc_scale, acc_gate, D,
    sen, set_, sed, syn, syt, syd,
    GATED: tl.constexpr,
):  # fmt: skip
    """Writes dx (and dy) of a block of rows at columns c from the rows' means m1 of g and m2 of g * x-hat;
    returns the column sums updated."""
    acc_shift += tl.sum(dh, axis=0)
    acc_scale += tl.sum(dh * xhat, axis=0)
    dx = rstd[:, None] * (g - m1[:, None] - xhat * m2[:, None])
    out = row[:, None] * D + c[None, :]
    if GATED:
        dxn = tl.load(dxnew_ptr + (n * sen + t * set_)[:, None] + c[None, :] * sed, mask=mask, other=0.0)
        dx = dx + dxn.to(tl.float32)
        y = tl.load(y_ptr + (n * syn + t * syt)[:, None] + c[None, :] * syd, mask=mask, other=0.0).to(
            tl.float32
        )
        acc_gate += tl.sum(tl.where(mask, dx * y, 0.0), axis=0)
        tl.store(dy_ptr + out, (dx * gate[None, :]).to(dy_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + out, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    return acc_shift, acc_scale, acc_gate


@triton.jit
def _bwd_store_parts(dshift_part, dscale_part, dgate_part, part, cmask, acc_shift, acc_scale, acc_gate,
                     GATED: tl.constexpr):  # fmt: skip
    tl.store(dshift_part + part, acc_shift, mask=cmask)
    tl.store(dscale_part + part, acc_scale, mask=cmask)
    if GATED:
        tl.store(dgate_part + part, acc_gate, mask=cmask)


@triton.jit(do_not_specialize=["rows_per_prog"])  # the grid sets it: one compile a shape
def _bwd_kernel(
    dh_ptr, dxnew_ptr, x_ptr, y_ptr, gate_ptr, scale_ptr, mean_ptr, rstd_ptr,  # inputs
    dx_ptr, dy_ptr, dshift_part, dscale_part, dgate_part,  # outputs: (N, T, D) and (N, CHUNKS, D) partials
    T, D, rows_per_prog,
    sdn, sdt, sdd, sen, set_, sed, sxn, sxt, sxd, syn, syt, syd, sgn, sgd, scn, scd,
    GATED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, TAIL: tl.constexpr,
):  # fmt: skip
    """Program (n, chunk): rows_per_prog rows of sample n, BLOCK_R at a time, each row in registers as
    BLOCK_D columns and, when TAIL > 0, TAIL more (`_row_parts`)."""
    n = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    c = tl.arange(0, BLOCK_D).to(tl.int64)
    cmask = c < D
    scale = tl.load(scale_ptr + n * scn + c * scd, mask=cmask, other=0.0).to(tl.float32)
    gate = scale  # read only when GATED
    if GATED:
        gate = tl.load(gate_ptr + n * sgn + c * sgd, mask=cmask, other=0.0).to(tl.float32)
    acc_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_gate = tl.zeros([BLOCK_D], dtype=tl.float32)
    if TAIL > 0:
        c2 = BLOCK_D + tl.arange(0, TAIL).to(tl.int64)
        cmask2 = c2 < D
        scale2 = tl.load(scale_ptr + n * scn + c2 * scd, mask=cmask2, other=0.0).to(tl.float32)
        gate2 = scale2
        if GATED:
            gate2 = tl.load(gate_ptr + n * sgn + c2 * sgd, mask=cmask2, other=0.0).to(tl.float32)
        acc_shift2 = tl.zeros([TAIL], dtype=tl.float32)
        acc_scale2 = tl.zeros([TAIL], dtype=tl.float32)
        acc_gate2 = tl.zeros([TAIL], dtype=tl.float32)
    loads = (sdn, sdt, sdd, sxn, sxt, sxd)
    stores = (sen, set_, sed, syn, syt, syd)
    t_begin = chunk * rows_per_prog
    t_end = tl.minimum(t_begin + rows_per_prog, T)
    for t0 in range(t_begin, t_end, BLOCK_R):
        t = (t0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        rmask = t < t_end
        row = n * T + t
        mean = tl.load(mean_ptr + row, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=rmask, other=0.0)
        # x is x' (the saved gated sum) when GATED, the input x otherwise: a contiguous saved tensor or a view
        mask = rmask[:, None] & cmask[None, :]
        dh, xhat, g = _bwd_load(dh_ptr, x_ptr, n, t, c, mask, scale, mean, rstd, *loads)
        s1 = tl.sum(g, axis=1)
        s2 = tl.sum(g * xhat, axis=1)
        if TAIL > 0:
            mask2 = rmask[:, None] & cmask2[None, :]
            dh2, xhat2, g2 = _bwd_load(dh_ptr, x_ptr, n, t, c2, mask2, scale2, mean, rstd, *loads)
            s1 += tl.sum(g2, axis=1)
            s2 += tl.sum(g2 * xhat2, axis=1)
        m1 = s1 / D
        m2 = s2 / D
        acc_shift, acc_scale, acc_gate = _bwd_store(
            dxnew_ptr, y_ptr, dx_ptr, dy_ptr, n, t, row, c, mask, gate, dh, xhat, g, m1, m2, rstd,
            acc_shift, acc_scale, acc_gate, D, *stores, GATED,
        )  # fmt: skip
        if TAIL > 0:
            acc_shift2, acc_scale2, acc_gate2 = _bwd_store(
                dxnew_ptr, y_ptr, dx_ptr, dy_ptr, n, t, row, c2, mask2, gate2, dh2, xhat2, g2, m1, m2, rstd,
                acc_shift2, acc_scale2, acc_gate2, D, *stores, GATED,
            )  # fmt: skip
    part = (n * chunks + chunk) * D
    _bwd_store_parts(dshift_part, dscale_part, dgate_part, part + c, cmask, acc_shift, acc_scale, acc_gate,
                     GATED)  # fmt: skip
    if TAIL > 0:
        _bwd_store_parts(dshift_part, dscale_part, dgate_part, part + c2, cmask2, acc_shift2, acc_scale2,
                         acc_gate2, GATED)  # fmt: skip


@triton.jit(do_not_specialize=["rows_per_prog"])
def _bwd_tiled_kernel(
    dh_ptr, dxnew_ptr, x_ptr, y_ptr, gate_ptr, scale_ptr, mean_ptr, rstd_ptr,  # inputs
    rowsum_ptr,  # (N*T, 2) fp32 scratch: each row's mean of g and of g * x-hat
    dx_ptr, dy_ptr, dshift_part, dscale_part, dgate_part,  # outputs, as _bwd_kernel's
    T, D, rows_per_prog,
    sdn, sdt, sdd, sen, set_, sed, sxn, sxt, sxd, syn, syt, syd, sgn, sgd, scn, scd,
    GATED: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """_bwd_kernel for rows too wide for registers: the row in tiles of BLOCK_D, in two passes. Pass 1 takes
    each row's two sums of the LayerNorm backward (reading x and dh); pass 2, tile by tile over the same
    rows, writes dx (and dy) and keeps the tile's column sums in registers. x and dh are read twice."""
    n = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    t_begin = chunk * rows_per_prog
    t_end = tl.minimum(t_begin + rows_per_prog, T)
    for t in range(t_begin, t_end):
        row = n * T + t
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        a1 = tl.zeros([BLOCK_D], dtype=tl.float32)
        a2 = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            c = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
            cmask = c < D
            x = tl.load(x_ptr + n * sxn + t * sxt + c * sxd, mask=cmask, other=0.0).to(tl.float32)
            dh = tl.load(dh_ptr + n * sdn + t * sdt + c * sdd, mask=cmask, other=0.0).to(tl.float32)
            scale = tl.load(scale_ptr + n * scn + c * scd, mask=cmask, other=0.0).to(tl.float32)
            xhat = tl.where(cmask, (x - mean) * rstd, 0.0)
            g = dh * (1.0 + scale)
            a1 += g
            a2 += g * xhat
        tl.store(rowsum_ptr + 2 * row, tl.sum(a1, axis=0) / D)
        tl.store(rowsum_ptr + 2 * row + 1, tl.sum(a2, axis=0) / D)
    tl.debug_barrier()  # pass 2's threads read the sums other threads of this program stored
    for d0 in range(0, D, BLOCK_D):
        c = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        cmask = c < D
        scale = tl.load(scale_ptr + n * scn + c * scd, mask=cmask, other=0.0).to(tl.float32)
        if GATED:
            gate = tl.load(gate_ptr + n * sgn + c * sgd, mask=cmask, other=0.0).to(tl.float32)
        acc_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_gate = tl.zeros([BLOCK_D], dtype=tl.float32)
        for t in range(t_begin, t_end):
            row = n * T + t
            mean = tl.load(mean_ptr + row)
            rstd = tl.load(rstd_ptr + row)
            m1 = tl.load(rowsum_ptr + 2 * row)
            m2 = tl.load(rowsum_ptr + 2 * row + 1)
            x = tl.load(x_ptr + n * sxn + t * sxt + c * sxd, mask=cmask, other=0.0).to(tl.float32)
            dh = tl.load(dh_ptr + n * sdn + t * sdt + c * sdd, mask=cmask, other=0.0).to(tl.float32)
            xhat = tl.where(cmask, (x - mean) * rstd, 0.0)
            acc_shift += dh
            acc_scale += dh * xhat
            dx = rstd * (dh * (1.0 + scale) - m1 - xhat * m2)
            out = row * D + c
            if GATED:
                dxn = tl.load(dxnew_ptr + n * sen + t * set_ + c * sed, mask=cmask, other=0.0)
                dx = dx + dxn.to(tl.float32)
                y = tl.load(y_ptr + n * syn + t * syt + c * syd, mask=cmask, other=0.0).to(tl.float32)
                acc_gate += tl.where(cmask, dx * y, 0.0)
                tl.store(dy_ptr + out, (dx * gate).to(dy_ptr.dtype.element_ty), mask=cmask)
            tl.store(dx_ptr + out, dx.to(dx_ptr.dtype.element_ty), mask=cmask)
        part = (n * chunks + chunk) * D + c
        tl.store(dshift_part + part, acc_shift, mask=cmask)
        tl.store(dscale_part + part, acc_scale, mask=cmask)
        if GATED:
            tl.store(dgate_part + part, acc_gate, mask=cmask)


@triton.jit
def _sum_parts_kernel(
    dshift_part, dscale_part, dgate_part,  # (N, CHUNKS, D) fp32 partial sums of the backward
    dshift_ptr, dscale_ptr, dgate_ptr,  # (N, D) results, each in its own dtype
    CHUNKS, D,
    GATED: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dshift, dscale (and dgate) = the partials summed over chunks, in fp32, written once in their dtypes:
    one launch instead of a sum and a cast per result."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_gate = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c0 in range(0, CHUNKS, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c < CHUNKS)[:, None] & cmask[None, :]
        offs = (n * CHUNKS + c)[:, None] * D + cols[None, :]
        acc_shift += tl.sum(tl.load(dshift_part + offs, mask=mask, other=0.0), axis=0)
        acc_scale += tl.sum(tl.load(dscale_part + offs, mask=mask, other=0.0), axis=0)
        if GATED:
            acc_gate += tl.sum(tl.load(dgate_part + offs, mask=mask, other=0.0), axis=0)
    out = n * D + cols
    tl.store(dshift_ptr + out, acc_shift.to(dshift_ptr.dtype.element_ty), mask=cmask)
    tl.store(dscale_ptr + out, acc_scale.to(dscale_ptr.dtype.element_ty), mask=cmask)
    if GATED:
        tl.store(dgate_ptr + out, acc_gate.to(dgate_ptr.dtype.element_ty), mask=cmask)


# --- launchers ----------------------------------------------------------------------------------------------
def _row_parts(d: int) -> tuple[int, int]:
    """(BLOCK_D, TAIL): a row of d columns held as a power-of-two part and, unless d is one, a second after it
    (Triton's tensors have power-of-two sides). Model widths are mostly sums of two powers of two (DiT-S 384 =
    256 + 128, DiT-XL 1152 = 1024 + 128, Flux 3072 = 2048 + 1024): no dead lanes, where one part of
    next_power_of_2(d) lanes (2048 for 1152) leaves 44% of them idle. Never more lanes than that one part."""
    head = 1 << (d.bit_length() - 1)
    return head, (0 if head == d else triton.next_power_of_2(d - head))


def _per_thread(d: int, aligned: int) -> int:
    """Elements of a row tensor a thread holds: `aligned` where rows start 16-byte aligned (d a multiple of
    16, as Triton's specialisation sees it), a quarter of that otherwise: without vector loads every element
    has an address of its own in registers, and at d = 3000 or 8200 the gated backward spilled."""
    return aligned if d % 16 == 0 else max(1, aligned // 4)


def _block_sizes(d: int) -> tuple[int, int, int, int]:
    """(BLOCK_D, TAIL, BLOCK_R, num_warps) of the forward: about 4K elements a program, whole rows in
    registers, up to 32 elements a thread (8 without vector loads)."""
    head, tail = _row_parts(d)
    block_r = max(1, min(16, _pow2_floor(4096 // (head + tail))))
    elements = triton.next_power_of_2((head + tail) * block_r)
    return head, tail, block_r, min(16, max(1, elements // (32 * _per_thread(d, 32))))


def _pow2_floor(v: int) -> int:
    return 1 << (max(v, 1).bit_length() - 1)


_MAX_BWD_ROW = 8192  # row lanes above which the backward walks rows in tiles (_bwd_tiled_kernel)
_BWD_TILE = 4096  # the tiled backward's columns at a time: 16 a thread over 8 warps
# the same without vector loads (d not a multiple of 16): 4 a thread over 16 warps, rows from 2048 lanes tiled
_MAX_BWD_ROW_UNALIGNED, _BWD_TILE_UNALIGNED = 2048, 2048


def _bwd_block_sizes(d: int) -> tuple[int, int, int, int]:
    """(BLOCK_D, TAIL, BLOCK_R, num_warps) of the backward: the forward's tile, over more warps. The gated
    backward keeps about ten values per element live (x', dh, dx', y, x-hat, dx and three column sums); at 32
    elements a thread (D = 1152 as 2 x 2048 over 4 warps) it took 238 registers, and it spilled from D = 4096
    (fp32). Up to 16 elements a thread (4 without vector loads), up to 16 warps (at 32, a thread may hold 64
    registers), keeps it under 255 without spills; wider rows take the tiled kernel."""
    head, tail, block_r, _ = _block_sizes(d)
    elements = triton.next_power_of_2((head + tail) * block_r)
    return head, tail, block_r, min(16, max(4, elements // (32 * _per_thread(d, 16))))


def _check(op: str, x: torch.Tensor, vectors: dict, tensors: dict, eps: float) -> torch.device:
    _utils.check_float(op, x=x, **vectors, **tensors)
    device = _utils.check_device(op, x=x, **vectors, **tensors)
    _utils.check(x.ndim == 3, f"{op}: x must be (N, T, D), got shape {tuple(x.shape)}")
    n, t, d = x.shape
    _utils.check(n > 0 and t > 0 and d > 0, f"{op}: x must not be empty, got shape {tuple(x.shape)}")
    for name, v in vectors.items():
        _utils.check(v.shape == (n, d), f"{op}: {name} must be (N, D) = {(n, d)}, got {tuple(v.shape)}")
    for name, v in tensors.items():
        _utils.check(
            v.shape == x.shape, f"{op}: {name} must have x's shape {tuple(x.shape)}, got {tuple(v.shape)}"
        )
    _utils.check(eps > 0, f"{op}: eps must be positive, got {eps}")
    return device


def _strides3(t: torch.Tensor | None) -> tuple[int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0)


def _strides2(t: torch.Tensor | None) -> tuple[int, int]:
    return tuple(t.stride()) if t is not None else (0, 0)


def _forward(x, y, gate, shift, scale, eps):
    n, t, d = x.shape
    out_dtype = (
        x.dtype if y is None else torch.promote_types(torch.promote_types(x.dtype, y.dtype), gate.dtype)
    )
    h = _utils.empty((n, t, d), out_dtype, x.device)
    xnew = _utils.empty((n, t, d), out_dtype, x.device) if y is not None else h  # h: an unused placeholder
    mean = _utils.empty((n * t,), torch.float32, x.device)
    rstd = _utils.empty((n * t,), torch.float32, x.device)
    block_d, tail, block_r, warps = _block_sizes(d)
    grid = (triton.cdiv(n * t, block_r),)
    _fwd_kernel[grid](
        x, y if y is not None else x, gate if gate is not None else shift, shift, scale,
        xnew, h, mean, rstd,
        n * t, t, d, eps,
        *_strides3(x), *_strides3(y), *_strides2(gate), *_strides2(shift), *_strides2(scale),
        GATED=y is not None, BLOCK_R=block_r, BLOCK_D=block_d, TAIL=tail, num_warps=warps,
    )  # fmt: skip
    return xnew, h, mean, rstd


def _backward(x, y, gate, scale, mean, rstd, dxnew, dh, *dtypes):
    """(dx, dy, dgate, dshift, dscale) in `dtypes` (see `_opdefs.build_adaln`); x is the forward's x, or its
    x_new when gated (y given). dx is written in its own dtype, not x_new's (one rounding, not two)."""
    n, t, d = x.shape
    gated = y is not None
    # None: that output did not reach the loss. The kernel reads both gradients, so it reads zeros.
    dh = torch.zeros_like(x) if dh is None else dh
    dxnew = torch.zeros_like(x) if gated and dxnew is None else dxnew
    block_d, tail, block_r, warps = _bwd_block_sizes(d)
    aligned = d % 16 == 0
    tiled = block_d + tail > (_MAX_BWD_ROW if aligned else _MAX_BWD_ROW_UNALIGNED)
    if tiled:  # too wide a row for registers (D = 16384 spilled over 32 warps): tiles, one row a time
        block_d = min(_BWD_TILE if aligned else _BWD_TILE_UNALIGNED, triton.next_power_of_2(d))
        tail, block_r, warps = 0, 1, max(1, min(16, block_d // (32 * _per_thread(d, 16))))
    dx = _utils.empty((n, t, d), dtypes[0] or x.dtype, x.device)
    dy = _utils.empty((n, t, d), y.dtype, x.device) if gated else dx
    inputs = (dh, dxnew if gated else dh, x, y if gated else x, gate if gated else scale, scale, mean, rstd)
    if tiled:
        inputs += (_utils.empty((n * t * 2,), torch.float32, x.device),)  # rowsum: each row's two sums
    strides = (*_strides3(dh), *_strides3(dxnew), *_strides3(x), *_strides3(y), *_strides2(gate),
               *_strides2(scale))  # fmt: skip
    kernel = _bwd_tiled_kernel if tiled else _bwd_kernel
    consts = dict(GATED=gated, BLOCK_D=block_d, num_warps=warps)
    if not tiled:
        consts.update(BLOCK_R=block_r, TAIL=tail)

    def args(parts, rows_per_prog):
        return (*inputs, dx, dy, *parts, t, d, rows_per_prog, *strides)

    # Program (n, c) owns whole rows of sample n and keeps its rows' column sums: as many programs as the GPU
    # holds at once (from the compiled kernel's registers, warps and shared memory), so that they run in one
    # wave and leave the fewest partial sums. `mean` stands in for the fp32 partials: one compile either way.
    resident = _utils.programs_per_sm(kernel, args([mean] * 3, block_r), consts, x.device)
    chunks = max(1, min(triton.cdiv(t, block_r), resident * _utils.num_sms(x.device) // n))
    rows_per_prog = triton.cdiv(triton.cdiv(t, chunks), block_r) * block_r
    chunks = triton.cdiv(t, rows_per_prog)
    parts = [_utils.empty((n, chunks, d), torch.float32, x.device) for _ in range(3 if gated else 2)]
    kernel[(n, chunks)](*args([parts[0], parts[1], parts[-1]], rows_per_prog), **consts)  # [-1]: if gated
    # the three column sums in one launch, each written in the dtype asked for (fp32 where none was: unused)
    dgate_dt, dshift_dt, dscale_dt = (dt or torch.float32 for dt in dtypes[2:])
    sums = [
        _utils.empty((n, d), dt, x.device) for dt in (dshift_dt, dscale_dt, dgate_dt)[: 3 if gated else 2]
    ]
    block = min(256, triton.next_power_of_2(d))
    _sum_parts_kernel[(n, triton.cdiv(d, block))](
        parts[0], parts[1], parts[-1], sums[0], sums[1], sums[-1],  # the last: unread unless gated
        chunks, d,
        GATED=gated, BLOCK_C=min(16, triton.next_power_of_2(chunks)), BLOCK_D=block, num_warps=4,
    )  # fmt: skip
    dgate = sums[2] if gated else None
    return _custom_op.as_requested((dx, dy, dgate, sums[0], sums[1]), dtypes)


# custom ops with the schemas, fakes and autograd of kernels/_opdefs.py (the CUDA ops' too)
_adaln_op, _gated_op = _opdefs.build_adaln("dblocks::", _forward, _backward)


# --- public functions ---------------------------------------------------------------------------------------
def adaln_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """AdaLN modulation: h = LayerNorm(x) * (1 + scale[:, None]) + shift[:, None] (no affine LayerNorm).

    Args:
        x: (N, T, D) float32/bfloat16/float16, any strides. shift, scale: (N, D), any float dtype and strides.
        eps: added to the variance.
    Returns:
        h: (N, T, D) contiguous, x's dtype. Differentiable in x, shift and scale.
    """
    _check("adaln_modulate", x, {"shift": shift, "scale": scale}, {}, eps)
    return _adaln_op(x, shift, scale, float(eps))[0]


def gated_residual_adaln(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Between AdaLN-Zero sub-layers: x' = x + gate[:, None] * y, h = adaln_modulate(x', shift, scale).

    Args:
        x: (N, T, D) residual stream. y: (N, T, D) branch output. gate, shift, scale: (N, D). Any float dtypes
        and strides.
    Returns:
        (x', h): (N, T, D), contiguous, in the promoted dtype of x, y and gate. Differentiable in all inputs.
    """
    _check("gated_residual_adaln", x, {"gate": gate, "shift": shift, "scale": scale}, {"y": y}, eps)
    xnew, h, _, _ = _gated_op(x, y, gate, shift, scale, float(eps))
    return xnew, h
