"""Fused output head for discrete targets: linear layer + weighted cross-entropy, never holding all logits.

    loss = (1/R) * sum_r row_weight[r] * CE(h[r] @ weight.T, target[r]),
    CE(z, t) = logsumexp(z) - z[t]

At a vocabulary of V = 32k the (R x V) logits of a batch are larger than the model's activations, so the op
walks the rows in chunks (the recipe of Liger-Kernel's fused linear cross-entropy, our own code):

  1. logits_c = h_c @ weight.T                         torch matmul in the input dtype (fp32 accumulation)
  2. one Triton program per row: row max and logsumexp in fp32 over V in blocks (online softmax), the row's
     weighted loss, and the logits row overwritten in place by row_weight[r] * (softmax - onehot(target))
  3. dh_c = dlogits_c @ weight / R,  dweight += dlogits_c.T @ h_c / R    (dweight accumulated in fp32)

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
CHUNK_ELEMENTS = 2**24  # default bound on one chunk's logits: 64 MiB in fp32, 32 MiB in bf16/fp16
_MAX_BLOCK_V = 4096  # vocabulary elements a program holds at once (16 fp32 registers a thread at 8 warps)


@triton.jit
def _ce_rows_kernel(
    logits_ptr,  # (C, V) contiguous, input dtype: read as logits, overwritten by their gradient
    target_ptr,  # (C,) integer
    row_weight_ptr,  # (C,) float, read only when HAS_WEIGHT
    row_loss_ptr,  # (C,) fp32 out: row_weight * CE
    V,
    HAS_WEIGHT: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)  # int64: r * V may exceed 2^31 for a large user chunk
    row = logits_ptr + r * V
    t = tl.load(target_ptr + r).to(tl.int64)
    # An out-of-range target (possible with check_targets=False) must not read outside the row: NaN loss.
    t_ok = (t >= 0) & (t < V)
    z_t = tl.load(row + t, mask=t_ok, other=float("nan")).to(tl.float32)

    # Online logsumexp: one pass keeps the running max m and sum s of exp(z - m).
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
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
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            z = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) - tl.where(offs == t, 1.0, 0.0)
            tl.store(row + offs, (w * g).to(logits_ptr.dtype.element_ty), mask=mask)


def default_chunk(V: int) -> int:
    """Rows per chunk when none is given: as many as keep a chunk's logits within CHUNK_ELEMENTS (>= 1)."""
    return max(1, CHUNK_ELEMENTS // V)


def _check_targets(target: torch.Tensor, V: int) -> None:
    tmin, tmax = torch.stack(torch.aminmax(target)).tolist()  # the one device sync of check_targets=True
    _utils.check(
        0 <= tmin and tmax < V,
        f"{_OP}: target values must lie in [0, V) = [0, {V}), got min {tmin} and max {tmax}; fix the labels "
        f"(or pass check_targets=False to skip this check and its device sync: out-of-range rows give NaN)",
    )


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

    Memory beyond inputs and outputs: one (chunk, V) logits buffer in the input dtype, R fp32 row losses and,
    with dweight over more than one chunk of a half-precision input, one (V, D) fp32 accumulator.
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

    logits = _utils.empty((chunk, V), dtype, device)
    row_loss = _utils.empty((R,), torch.float32, device)
    loss = _utils.empty((), torch.float32, device)
    dh = _utils.empty((R, D) if need_dh else (0,), dtype, device)
    dweight = _utils.empty((V, D) if need_dweight else (0,), dtype, device)
    # dweight sums the chunks' GEMMs in fp32: in place for fp32 inputs or a single chunk, else each chunk's
    # product (rounded once to the input dtype, in dweight) is added to a separate fp32 accumulator.
    direct = dtype == torch.float32 or n_chunks == 1
    acc = _utils.empty((V, D), torch.float32, device) if need_dweight and not direct else None

    BLOCK_V = min(_MAX_BLOCK_V, triton.next_power_of_2(V))
    num_warps = 8 if BLOCK_V >= 2048 else 4
    for i in range(n_chunks):
        lo, hi = i * chunk, min((i + 1) * chunk, R)
        h_c, z_c = h[lo:hi], logits[: hi - lo]
        torch.mm(h_c, weight.t(), out=z_c)
        _ce_rows_kernel[(hi - lo,)](
            z_c,
            target[lo:hi],
            row_weight[lo:hi] if row_weight is not None else row_loss,  # an unread placeholder when None
            row_loss[lo:hi],
            V,
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
        chunk: rows per chunk; the logits never take more than one (chunk, V) buffer in h's dtype. None: the
            most rows keeping it within 2^24 elements (`default_chunk(V)` = max(1, 2^24 // V); 32 MiB in
            bf16). Other working memory: R fp32 row losses, the dh (R, D) and dweight (V, D) results, and
            with half inputs and several chunks a (V, D) fp32 accumulator for dweight.
        check_targets: verify 0 <= target < V with one device sync (min/max read on the host); False skips
            it, and a row with an out-of-range target then gives a NaN loss (never an out-of-bounds read).

    Returns:
        The loss, a 0-d float32 tensor. The forward also computes dloss/dh and dloss/dweight when they are
        needed (grad mode on, h / weight requiring grad); the backward scales them by the upstream grad.
    """
    _check_inputs(h, weight, target, row_weight, chunk)
    D, V = h.shape[-1], weight.shape[0]
    h2 = h.reshape(-1, D)
    grad = torch.is_grad_enabled()
    loss, _, _ = _lce_op(
        h2,
        weight,
        target.reshape(-1),
        row_weight.reshape(-1) if row_weight is not None else None,
        default_chunk(V) if chunk is None else int(chunk),
        grad and h.requires_grad,
        grad and weight.requires_grad,
        check_targets,
    )
    return loss
