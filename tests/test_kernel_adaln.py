"""Triton adaln_modulate and gated_residual_adaln against float64, calibrated against eager torch."""

import pytest
import torch
import torch.nn.functional as F
import triton

from dblocks_fast.kernels import adaln_modulate, gated_residual_adaln
from tests.kerneltest import DTYPES, assert_calibrated, device

pytestmark = pytest.mark.kernel  # on the GPU, gpu_session.py runs these (its stage "triton")

SHAPES = [(1, 1, 37), (3, 5, 113), (2, 17, 64), (4, 33, 8), (2, 3, 96)]  # N, T, D: T = 1, D odd, not a power
# of two, a power of two, and 64 + 32 (a row in two parts that fit it exactly; 37 and 113 leave lanes over)


def _adaln(x, shift, scale, eps=1e-6):
    """The expression in its inputs' dtype: float64 for the reference, the input dtype for eager torch."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale[:, None]) + shift[:, None]


def _inputs(shape, dtype, seed, names):
    g = torch.Generator().manual_seed(seed)
    n, _, d = shape
    out = {}
    for name in names:
        full = shape if name in ("x", "y") else (n, d)
        out[name] = torch.randn(full, generator=g).to(device(), dtype).requires_grad_()
    return out


def _check_op(name, fn, ref_fn, inputs, upstream):
    """Forward outputs and every input gradient: kernel vs float64 reference vs eager in the input dtype."""
    outs = fn(**inputs)
    leaves64 = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    ref = ref_fn(**leaves64)
    eager_leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    eager = ref_fn(**eager_leaves)
    for i, (o, r, e) in enumerate(zip(outs, ref, eager)):
        assert_calibrated(f"{name} output {i}", o.detach(), r.detach(), e.detach())
    grads = torch.autograd.grad(outs, list(inputs.values()), [u.to(o.dtype) for u, o in zip(upstream, outs)])
    grads64 = torch.autograd.grad(ref, list(leaves64.values()), [u.double() for u in upstream])
    grads_eager = torch.autograd.grad(
        eager, list(eager_leaves.values()), [u.to(e.dtype) for u, e in zip(upstream, eager)]
    )
    for k, g, r, e in zip(inputs, grads, grads64, grads_eager):
        assert g.dtype == inputs[k].dtype, f"d{k} dtype"
        assert_calibrated(f"{name} d{k}", g, r, e)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adaln_modulate(shape, dtype, poison_outputs):
    inputs = _inputs(shape, dtype, hash((shape, str(dtype))) % 2**31, ["x", "shift", "scale"])
    upstream = [torch.randn(shape, device=device())]
    _check_op(
        "adaln_modulate", lambda **a: (adaln_modulate(**a),), lambda **a: (_adaln(**a),), inputs, upstream
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_residual_adaln(shape, dtype, poison_outputs):
    inputs = _inputs(shape, dtype, hash((shape, str(dtype), 1)) % 2**31, ["x", "y", "gate", "shift", "scale"])

    def ref(x, y, gate, shift, scale):
        x_new = x + gate[:, None] * y
        return x_new, _adaln(x_new, shift, scale)

    upstream = [torch.randn(shape, device=device()), torch.randn(shape, device=device())]
    _check_op("gated_residual_adaln", gated_residual_adaln, ref, inputs, upstream)


def test_strided_and_mixed_dtype_inputs_as_the_dit_layer_passes_them(poison_outputs):
    """x a transposed view; shift/scale/gate chunks of one (N, 6D) modulation; y bf16 (autocast), x fp32."""
    torch.manual_seed(0)
    n, t, d = 3, 7, 24
    x = torch.randn(t, n, d, device=device()).transpose(0, 1).requires_grad_()
    mod = torch.randn(n, 6 * d, device=device(), dtype=torch.bfloat16, requires_grad=True)
    shift, scale, gate = mod[:, :d], mod[:, d : 2 * d], mod[:, 2 * d : 3 * d]
    y = torch.randn(n, t, d, device=device(), dtype=torch.bfloat16, requires_grad=True)
    assert not x.is_contiguous() and not shift.is_contiguous()
    x_new, h = gated_residual_adaln(x, y, gate, shift, scale)
    assert x_new.dtype == h.dtype == torch.float32  # x + gate * y promotes to fp32, as eager torch does
    x64, y64, mod64 = (v.detach().double().requires_grad_() for v in (x, y, mod))
    xr = x64 + mod64[:, 2 * d : 3 * d, None].transpose(1, 2) * y64
    hr = _adaln(xr, mod64[:, :d], mod64[:, d : 2 * d])
    torch.testing.assert_close(x_new.double(), xr, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h.double(), hr, atol=1e-5, rtol=1e-5)
    w = torch.randn(n, t, d, device=device())
    got = torch.autograd.grad((h * w).sum() + x_new.sum(), (x, y, mod))
    want = torch.autograd.grad((hr * w.double()).sum() + xr.sum(), (x64, y64, mod64))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=2e-2, rtol=2e-2)  # dy, dmod are bf16


def test_plain_backward_of_a_sum_and_unused_outputs(poison_outputs):
    """loss.sum().backward() hands the op expanded (stride 0) gradients; an unused output gets none."""
    torch.manual_seed(1)
    x, y = (torch.randn(2, 5, 16, device=device(), requires_grad=True) for _ in range(2))
    gate, shift, scale = (torch.randn(2, 16, device=device(), requires_grad=True) for _ in range(3))
    adaln_modulate(x, shift, scale).sum().backward()
    x_ref = x.detach().requires_grad_()
    _adaln(x_ref, shift.detach(), scale.detach()).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    x.grad = None
    _, h = gated_residual_adaln(x, y, gate, shift, scale)
    h.sum().backward()  # x_new unused
    assert all(torch.isfinite(t.grad).all() for t in (x, y, gate, shift, scale))


def test_compiles_in_one_graph():
    torch.manual_seed(2)
    x, y = (torch.randn(2, 3, 12, device=device(), requires_grad=True) for _ in range(2))
    gate, shift, scale = (torch.randn(2, 12, device=device(), requires_grad=True) for _ in range(3))

    def f(x, y, gate, shift, scale):
        x_new, h = gated_residual_adaln(x, y, gate, shift, scale)
        return (adaln_modulate(x_new, shift, scale) * h).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, y, gate, shift, scale)
    grads = torch.autograd.grad(out, (x, y, gate, shift, scale))
    want = torch.autograd.grad(f(x, y, gate, shift, scale), (x, y, gate, shift, scale))
    torch.testing.assert_close(out, f(x, y, gate, shift, scale))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)


def test_bad_inputs_are_refused(monkeypatch):
    x, v = torch.randn(2, 3, 8, device=device()), torch.randn(2, 8, device=device())
    with pytest.raises(ValueError, match=r"adaln_modulate: x must be \(N, T, D\)"):
        adaln_modulate(x[0], v, v)
    with pytest.raises(ValueError, match=r"scale must be \(N, D\) = \(2, 8\)"):
        adaln_modulate(x, v, v[:, :4])
    with pytest.raises(ValueError, match="must be float32, bfloat16 or float16"):
        adaln_modulate(x.long(), v, v)
    with pytest.raises(ValueError, match="eps must be positive"):
        adaln_modulate(x, v, v, eps=0.0)
    with pytest.raises(ValueError, match="y must have x's shape"):
        gated_residual_adaln(x, x[:, :2], v, v, v)
    if x.device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="Triton kernels need CUDA tensors"):
            adaln_modulate(x, v, v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gated_statistics_are_those_of_the_stored_residual(dtype, poison_outputs):
    """mean and 1/std (kept for the backward) are x' as stored, rounded to its dtype: the backward re-reads
    the stored x', and the CUDA kernel uses the same; the unrounded sum's statistics differ by far more."""
    from dblocks_fast.kernels import adaln

    names = ["x", "y", "gate", "shift", "scale"]
    a = {k: v.detach() for k, v in _inputs((2, 6, 160), dtype, 7, names).items()}
    x_new, h, mean, rstd = adaln._forward(a["x"], a["y"], a["gate"], a["shift"], a["scale"], 1e-6)
    stored = x_new.double().reshape(12, 160)
    torch.testing.assert_close(mean.double(), stored.mean(-1), rtol=1e-6, atol=1e-6)
    want_rstd = 1 / torch.sqrt(stored.var(-1, unbiased=False) + 1e-6)
    torch.testing.assert_close(rstd.double(), want_rstd, rtol=1e-5, atol=0)
    exact = (a["x"].double() + a["gate"].double()[:, None] * a["y"].double()).reshape(12, 160)
    assert (
        exact.mean(-1) - stored.mean(-1)
    ).abs().max() > 1e-5  # 10x the tolerance: the test tells them apart
    # h is LN of the stored x' as well, within the rounding of h itself
    ref = _adaln(x_new.double(), a["shift"].double(), a["scale"].double())
    torch.testing.assert_close(
        h.double(), ref, rtol=0, atol=4 * torch.finfo(dtype).eps * ref.abs().max().item()
    )


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tiled_backward_for_wide_rows(gated, dtype, monkeypatch, poison_outputs):
    """Rows wider than _MAX_BWD_ROW take the two-pass tiled backward (D = 16384 spilled in registers): here
    with tiles of 16 over D = 37 (three tiles, the last partial) and 7 rows a sample."""
    from dblocks_fast.kernels import adaln

    for name in ("_MAX_BWD_ROW", "_BWD_TILE", "_MAX_BWD_ROW_UNALIGNED", "_BWD_TILE_UNALIGNED"):
        monkeypatch.setattr(adaln, name, 16)
    launched = []
    real = adaln._bwd_tiled_kernel
    monkeypatch.setattr(adaln, "_bwd_tiled_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: launched.append(grid) or real[grid]})())  # fmt: skip
    shape = (3, 7, 37)
    if gated:
        inputs = _inputs(shape, dtype, 21, ["x", "y", "gate", "shift", "scale"])

        def ref(x, y, gate, shift, scale):
            x_new = x + gate[:, None] * y
            return x_new, _adaln(x_new, shift, scale)

        upstream = [torch.randn(shape, device=device()), torch.randn(shape, device=device())]
        _check_op("tiled gated_residual_adaln", gated_residual_adaln, ref, inputs, upstream)
    else:
        inputs = _inputs(shape, dtype, 22, ["x", "shift", "scale"])
        upstream = [torch.randn(shape, device=device())]
        fn = lambda **a: (adaln_modulate(**a),)  # noqa: E731
        _check_op("tiled adaln_modulate", fn, lambda **a: (_adaln(**a),), inputs, upstream)
    assert launched, "the tiled backward did not run"


def test_rows_are_held_in_two_parts_without_dead_lanes_at_model_widths():
    from dblocks_fast.kernels import adaln

    for d in (384, 768, 1152, 1536, 3072, 4608):  # DiT-S/B/XL, SD3, Flux, ...: sums of two powers of two
        head, tail = adaln._row_parts(d)
        assert head + tail == d and head & (head - 1) == 0 and tail & (tail - 1) == 0, (d, head, tail)
    for d in range(1, 5000):
        head, tail = adaln._row_parts(d)
        assert d <= head + tail <= triton.next_power_of_2(d) and (tail == 0) == (head == d), d


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("gated", [False, True])
def test_backward_grid_is_one_wave_of_what_the_compiled_kernel_fits(gated, monkeypatch):
    """On the GPU the launcher reads the compiled kernel's occupancy (registers, warps, shared memory): the
    backward's programs fill the SMs once, without a warning that the occupancy was unknown."""
    import warnings

    from dblocks_fast.kernels import _utils, adaln

    grids = []
    real = adaln._bwd_kernel
    monkeypatch.setattr(adaln, "_bwd_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: grids.append(grid) or real[grid],
        "warmup": lambda self, *a, **k: real.warmup(*a, **k)})())  # fmt: skip
    monkeypatch.setattr(_utils, "_RESIDENT", {})
    names = ["x", "y", "gate", "shift", "scale"] if gated else ["x", "shift", "scale"]
    inputs = _inputs((4, 256, 1152), torch.bfloat16, 5, names)
    fn = gated_residual_adaln if gated else adaln_modulate
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fn(**inputs)
        out = out[1] if gated else out
        out.float().square().sum().backward()
    (resident,) = _utils._RESIDENT.values()
    sms = _utils.num_sms(torch.device("cuda"))
    ((n, chunks),) = grids
    assert n == 4 and resident >= 1 and resident * sms // 2 < n * chunks <= resident * sms
