"""Fused output head for discrete targets: linear layer + weighted cross-entropy, never holding all logits.

    loss = (1/R) * sum_r row_weight[r] * CE(h[r] @ weight.T, target[r]),
    CE(z, t) = logsumexp(z) - z[t]

At a vocabulary of V = 32k the (R x V) logits of a batch are larger than the model's activations, so the op
walks the rows in chunks (the recipe of Liger-Kernel's fused linear cross-entropy, our own code):

  1. logits_c = h_c @ weight.T                         torch matmul in the input dtype (fp32 accumulation)
  2. one Triton program per row: row max and logsumexp in fp32 over V in blocks (online softmax), the row's
     weighted loss, and the logits row overwritten in place by row_weight[r] * (softmax - onehot(target))
  3. dh_c = dlogits_c @ weight / R,  dweight += dlogits_c.T @ h_c / R    (dweight accumulated in fp32)

Chunks are 2048-4096 rows by default (multiples of 256, the GEMMs' tiles), fewer only where that keeps the
op's working memory within 1/8 of the logits of the unfused head (`default_chunk`). dweight's chunks add up
in an fp32 accumulator straight from the GEMM where torch has an fp32-output addmm for the device (CUDA,
torch >= 2.8); elsewhere each chunk's product is rounded to the input dtype and added. The logits buffer's
rows are padded to a multiple of 64 elements, so every row starts 128-byte aligned and the kernel's loads
and stores are 16 bytes wide at any vocabulary (50257 too).

The forward therefore does all the work; the backward multiplies the saved dh and dweight by the upstream
scalar gradient. The 1/R of the mean is applied as the GEMMs' alpha instead of in step 2, so that float16
gradients of large batches (softmax / R ~ 1e-9) do not underflow before the fp32 accumulation.

row_weight is treated as a constant (no gradient), target has none. The op is a torch.library custom op
(`dblocks::weighted_linear_cross_entropy` and its `_backward`), built by `_custom_op` from the op's
definition in `_opdefs`, so it composes with autograd and traces under torch.compile(fullgraph=True).
"""

import math

import torch
import triton
import triton.language as tl

from . import _custom_op, _opdefs, _utils

__all__ = ["weighted_linear_cross_entropy", "default_chunk"]

_OP = "weighted_linear_cross_entropy"
CHUNK_ROWS = 4096  # the default chunk's rows at most: GEMMs of 2048-4096 rows run near the matrix units' peak
CHUNK_MULTIPLE = 256  # default chunks are a multiple of this many rows (whole GEMM tiles)
PEAK_FRACTION = 1 / 8  # default chunks keep the op's working memory within this fraction of all the logits
ROW_ALIGN = 64  # elements: the logits buffer's row stride is a multiple of this (128-byte aligned rows)
_MAX_BLOCK_V = 4096  # vocabulary elements a program holds at once (16 fp32 registers a thread at 8 warps)


@triton.jit
def _ce_rows_kernel(
    logits_ptr,  # (C, V) with row stride `stride`, input dtype: read as logits, overwritten by their gradient
    target_ptr,  # (C,) integer
    row_weight_ptr,  # (C,) float, read only when HAS_WEIGHT
    row_loss_ptr,  # (C,) fp32 out: row_weight * CE
    V,
    stride,  # elements between rows, all in the buffer: V rounded up to ROW_ALIGN (Triton: divisible by 16)
    HAS_WEIGHT: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)  # int64: r * stride may exceed 2^31 for a large user chunk
    row = logits_ptr + r * stride
    t = tl.load(target_ptr + r).to(tl.int64)
    # An out-of-range target (possible with check_targets=False) must not read outside the row: NaN loss.
    t_ok = (t >= 0) & (t < V)
    z_t = tl.load(row + t, mask=t_ok, other=float("nan")).to(tl.float32)

    # Online logsumexp: one pass keeps the running max m and sum s of exp(z - m).
    m = float("-inf")
    s = 0.0
    # Loads and stores run over the padded row (`stride`, a multiple of 64: Triton sees it divisible by 16):
    # a mask at V = 50257 would split every vector access. The pad's values are replaced, never used.
    for start in range(0, stride, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(row + offs, mask=offs < stride, other=float("-inf")).to(tl.float32)
        z = tl.where(offs < V, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)

    if HAS_WEIGHT:
        w = tl.load(row_weight_ptr + r).to(tl.float32)
    else:
        w = 1.0
    tl.store(row_loss_ptr + r, w * (lse - z_t))

    if WRITE_GRAD:
        # Second pass: the row is re-read (from L2 at typical chunk sizes) and overwritten by its gradient
        # (without the 1/R, which the GEMMs apply).
        for start in range(0, stride, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < stride
            z = tl.load(row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            z = tl.where(offs < V, z, float("-inf"))  # the pad gets exp(-inf) = 0: zeros, read by nothing
            g = tl.exp(z - lse) - tl.where(offs == t, 1.0, 0.0)
            tl.store(row + offs, (w * g).to(logits_ptr.dtype.element_ty), mask=mask)


def padded(V: int) -> int:
    """The logits buffer's row stride: V rounded up to a multiple of ROW_ALIGN."""
    return -(-V // ROW_ALIGN) * ROW_ALIGN


def working_bytes(chunk: int, R: int, V: int, D: int, itemsize: int) -> int:
    """Memory the op holds beyond its inputs and the gradients it returns: the (chunk, padded V) logits, the R
    fp32 row losses and, with half inputs over several chunks, the (V, D) fp32 dweight accumulator."""
    acc = V * D * 4 if itemsize < 4 and chunk < R else 0
    return chunk * padded(V) * itemsize + R * 4 + acc


def default_chunk(R: int, V: int, D: int, itemsize: int) -> int:
    """Rows per chunk when none is given: the largest multiple of CHUNK_MULTIPLE up to CHUNK_ROWS whose
    `working_bytes` stay within PEAK_FRACTION of the unfused head's (R, V) logits in the input dtype; never
    below CHUNK_MULTIPLE (there the bound yields: at R below a few thousand rows the fp32 accumulator alone
    passes it, and smaller GEMMs would only be slower); never more than R."""
    unfused = R * V * itemsize
    chunk = CHUNK_ROWS
    while chunk > CHUNK_MULTIPLE and working_bytes(chunk, R, V, D, itemsize) > PEAK_FRACTION * unfused:
        chunk -= CHUNK_MULTIPLE
    return max(1, min(chunk, R))


def _check_targets(target: torch.Tensor, V: int) -> None:
    """0 <= target < V. On CUDA without a host sync: the device checks and an out-of-range label stops the
    program at its next synchronisation with a device-side assertion (CUDA graphs can capture it). Elsewhere
    a ValueError that gives the range found (a CPU reads it for free)."""
    skip = "(or pass check_targets=False to skip this check: out-of-range rows then give a NaN loss)"
    if target.device.type == "cuda":
        tmin, tmax = torch.aminmax(target)
        msg = f"{_OP}: target values must lie in [0, V) = [0, {V}); fix the labels {skip}"
        torch._assert_async((tmin >= 0) & (tmax < V), msg)
        return
    tmin, tmax = torch.stack(torch.aminmax(target)).tolist()
    _utils.check(
        0 <= tmin and tmax < V,
        f"{_OP}: target values must lie in [0, V) = [0, {V}), got min {tmin} and max {tmax}; fix the labels "
        f"{skip}",
    )


_FP32_ADDMM: dict[torch.device, bool] = {}  # device -> whether addmm(..., out_dtype=float32) runs there


def fp32_addmm_available(device: torch.device) -> bool:
    """Whether torch can accumulate a half-precision GEMM straight into an fp32 tensor on `device` (addmm's
    out_dtype, CUDA in torch >= 2.8). Tried once per device on a 16 x 16 product, checked against fp32."""
    if device not in _FP32_ADDMM:
        ok = False
        if device.type == "cuda":
            try:
                a = torch.ones(16, 16, device=device, dtype=torch.bfloat16)
                acc = torch.ones(16, 16, device=device)
                torch.addmm(acc, a, a, beta=1.0, alpha=0.5, out_dtype=torch.float32, out=acc)
                ok = bool((acc == 9.0).all())  # 1 + 0.5 * 16
            except (TypeError, RuntimeError, NotImplementedError):
                ok = False
        _FP32_ADDMM[device] = ok
    return _FP32_ADDMM[device]


def _launch(
    h: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    row_weight: torch.Tensor | None,
    chunk: int,
    need_dh: bool,
    need_dweight: bool,
    check_targets: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, dh (R, D) and dweight (V, D) of the mean loss for h (R, D); dh / dweight are (0,) if not needed.

    Memory beyond inputs and outputs: `working_bytes` (one (chunk, padded V) logits buffer in the input dtype,
    R fp32 row losses and, with dweight over more than one chunk of a half-precision input, one (V, D) fp32
    accumulator).
    """
    extra = {} if row_weight is None else {"row_weight": row_weight}
    device = _utils.check_device(_OP, h=h, weight=weight, target=target, **extra)
    R, D = h.shape
    V = weight.shape[0]
    # The kernel indexes these as flat memory; h and weight only meet torch matmuls, which take any strides.
    target = target.contiguous()
    row_weight = row_weight.contiguous() if row_weight is not None else None
    if check_targets:
        _check_targets(target, V)

    chunk = min(chunk, R)
    n_chunks = triton.cdiv(R, chunk)
    write_grad = need_dh or need_dweight
    dtype = h.dtype
    alpha = 1.0 / R

    stride = padded(V)
    logits = _utils.empty((chunk, stride), dtype, device)
    row_loss = _utils.empty((R,), torch.float32, device)
    loss = _utils.empty((), torch.float32, device)
    dh = _utils.empty((R, D) if need_dh else (0,), dtype, device)
    dweight = _utils.empty((V, D) if need_dweight else (0,), dtype, device)
    # dweight sums the chunks' GEMMs in fp32: in place for fp32 inputs or a single chunk; else into a separate
    # fp32 accumulator, straight from the GEMM where torch can (fp32_out), or each chunk's product rounded
    # once to the input dtype (in dweight) and added to it.
    direct = dtype == torch.float32 or n_chunks == 1
    acc = _utils.empty((V, D), torch.float32, device) if need_dweight and not direct else None
    fp32_out = acc is not None and fp32_addmm_available(device)

    BLOCK_V = min(_MAX_BLOCK_V, triton.next_power_of_2(stride))
    num_warps = 8 if BLOCK_V >= 2048 else 4
    for i in range(n_chunks):
        lo, hi = i * chunk, min((i + 1) * chunk, R)
        h_c, z_c = h[lo:hi], logits[: hi - lo, :V]  # rows `stride` apart: matmuls take the leading dimension
        torch.mm(h_c, weight.t(), out=z_c)
        _ce_rows_kernel[(hi - lo,)](
            z_c,
            target[lo:hi],
            row_weight[lo:hi] if row_weight is not None else row_loss,  # an unread placeholder when None
            row_loss[lo:hi],
            V,
            stride,
            HAS_WEIGHT=row_weight is not None,
            WRITE_GRAD=write_grad,
            BLOCK_V=BLOCK_V,
            num_warps=num_warps,
        )
        if need_dh:
            # beta=0: the output's old (possibly NaN-poisoned) content is ignored, not multiplied by 0.
            dh[lo:hi].addmm_(z_c, weight, beta=0.0, alpha=alpha)
        if need_dweight and direct:
            dweight.addmm_(z_c.t(), h_c, beta=0.0 if i == 0 else 1.0, alpha=alpha)
        elif fp32_out:
            beta = 0.0 if i == 0 else 1.0
            torch.addmm(acc, z_c.t(), h_c, beta=beta, alpha=alpha, out_dtype=torch.float32, out=acc)
        elif need_dweight:
            dweight.addmm_(z_c.t(), h_c, beta=0.0, alpha=alpha)
            if i == 0:
                acc.copy_(dweight)
            else:
                acc.add_(dweight)
    if acc is not None:
        dweight.copy_(acc)

    torch.sum(row_loss, dim=0, out=loss)
    loss.div_(R)
    return loss, dh, dweight


def _scale_saved_grads(grad_h, grad_weight, g_loss, dh_dtype, dweight_dtype):
    """The backward: the forward's gradients times the upstream one (constants: no double backward)."""
    grads = [g * g_loss.to(g.dtype) for g in (grad_h, grad_weight)]  # an unneeded one is (0,): stays so
    return _custom_op.as_requested(grads, (dh_dtype, dweight_dtype))


_OPDEF = _opdefs.WEIGHTED_LINEAR_CROSS_ENTROPY
_lce_op = _custom_op.build(f"dblocks::{_OP}", _OPDEF, _launch, _scale_saved_grads)


def _check_inputs(h, weight, target, row_weight, chunk) -> None:
    # Here and not only in the launcher: a meta / fake tensor dispatches to the fake implementation instead.
    extra = {} if row_weight is None else {"row_weight": row_weight}
    _utils.check_device(_OP, h=h, weight=weight, target=target, **extra)
    _utils.check_float(_OP, h=h, weight=weight)
    _utils.check(
        h.dtype == weight.dtype,
        f"{_OP}: h and weight must have one dtype, got {h.dtype} and {weight.dtype}; cast one of them",
    )
    _utils.check(h.dim() >= 1, f"{_OP}: h must have shape (..., D), got a 0-d tensor")
    _utils.check(
        weight.dim() == 2 and weight.shape[1] == h.shape[-1],
        f"{_OP}: weight must have shape (V, D) with D = h.shape[-1] = {h.shape[-1]}, "
        f"got {tuple(weight.shape)}",
    )
    _utils.check(weight.shape[0] >= 1, f"{_OP}: weight must have at least one row (V >= 1)")
    lead = tuple(h.shape[:-1])
    _utils.check(
        not target.dtype.is_floating_point and not target.dtype.is_complex and target.dtype != torch.bool,
        f"{_OP}: target must hold integer class indices (e.g. torch.long), got {target.dtype}",
    )
    _utils.check(
        tuple(target.shape) == lead,
        f"{_OP}: target must have h's leading shape {lead}, got {tuple(target.shape)}",
    )
    if row_weight is not None:
        _utils.check(
            row_weight.dtype.is_floating_point,
            f"{_OP}: row_weight must be a float tensor (or None for all ones), got {row_weight.dtype}",
        )
        _utils.check(
            tuple(row_weight.shape) == lead,
            f"{_OP}: row_weight must have h's leading shape {lead}, got {tuple(row_weight.shape)}",
        )
    _utils.check(
        math.prod(lead) > 0,
        f"{_OP}: h has no rows (leading shape {lead}); the mean over zero rows is undefined",
    )
    _utils.check(
        chunk is None or chunk >= 1, f"{_OP}: chunk must be >= 1 rows (or None for the default), got {chunk}"
    )


def weighted_linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    row_weight: torch.Tensor | None = None,
    chunk: int | None = None,
    *,
    check_targets: bool = True,
) -> torch.Tensor:
    """Weighted mean cross-entropy of a linear output head, without materializing the logits.

        loss = (1/R) * sum_r row_weight[r] * (logsumexp_v(h[r] . weight[v]) - h[r] . weight[target[r]])

    over the R = h.numel() / D rows of h. Gradients flow to h and weight; row_weight is a constant.

    Args:
        h: (..., D) float32, bfloat16 or float16 hidden states; the leading dims are flattened to R >= 1 rows.
        weight: (V, D) output projection, same dtype and device as h.
        target: integer class indices of h's leading shape, each in [0, V).
        row_weight: float weights of h's leading shape (0 drops a row, still counting in R), or None for ones.
        chunk: rows per chunk; the logits never take more than one (chunk, V) buffer in h's dtype (rows
            padded to a multiple of 64). None: `default_chunk(R, V, D, itemsize)`, 2048-4096 rows (a multiple
            of 256) where the working memory stays within 1/8 of the (R, V) logits, else fewer, 256 at least.
            Other working memory: R fp32 row losses and, with half inputs and several chunks, a (V, D) fp32
            accumulator for dweight (`working_bytes`).
        check_targets: verify 0 <= target < V. On CUDA the device checks, without a host sync (an
            out-of-range label stops the program at its next synchronisation with a device-side assertion);
            on the CPU a ValueError gives the range found. False skips it: a row with an out-of-range target
            then gives a NaN loss (never an out-of-bounds read).

    Returns:
        The loss, a 0-d float32 tensor. The forward also computes dloss/dh and dloss/dweight when they are
        needed (grad mode on, h / weight requiring grad); the backward scales them by the upstream grad.
    """
    _check_inputs(h, weight, target, row_weight, chunk)
    D, V = h.shape[-1], weight.shape[0]
    h2 = h.reshape(-1, D)
    if chunk is None:
        chunk = default_chunk(h2.shape[0], V, D, h.element_size())
    grad = torch.is_grad_enabled()
    loss, _, _ = _lce_op(
        h2,
        weight,
        target.reshape(-1),
        row_weight.reshape(-1) if row_weight is not None else None,
        int(chunk),
        grad and h.requires_grad,
        grad and weight.requires_grad,
        check_targets,
    )
    return loss
