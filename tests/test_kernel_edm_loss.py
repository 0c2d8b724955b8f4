"""Triton edm_l2_loss against float64, calibrated against eager torch, and a bound from fp32 rounding.

Two comparisons, because eager torch is a weak yardstick here: at sigma = 0.002 the reference's
c_skip z + c_out f - y cancels (c_skip z and y agree to ~sigma), so eager fp32 loses ~|y| / sigma ulps,
which w = 2.5e5 then magnifies. The kernel regroups the sum so that it loses nothing there; so every value
is checked (1) calibrated against eager (the project rule, per sample so that the large gradients of
small-sigma samples do not hide the others) and (2) against a bound from fp32 rounding of the terms that
actually make up D - y, which eager's ordering would fail.
"""

import zlib

import pytest
import torch

from dblocks_fast import ops, precond
from dblocks_fast.kernels import _utils, edm_loss
from dblocks_fast.kernels.edm_loss import edm_l2_loss
from tests.kerneltest import DTYPES, assert_calibrated, device

pytestmark = pytest.mark.kernel  # on the GPU, gpu_session.py runs these (its stage "triton")

SHAPES = [(1, 1), (3, 1, 5, 7), (2, 37), (5, 3, 11, 13)]  # N = 1 and M = 1; odd M; several chunks
EPS32 = torch.finfo(torch.float32).eps


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _inputs(shape, dtypes, seed, sigma_dtype=torch.float32):
    """z = y + sigma eps, f, y (each in its dtype, requiring grad) and sigma log-uniform over [0.002, 80]."""
    g = torch.Generator().manual_seed(seed)
    n = shape[0]
    sigma = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-6.2146, 4.3820, generator=g))
    sigma[-1], sigma[0] = 80.0, 0.002  # both ends of the EDM range (N = 1: the hard one, 0.002)
    y = 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)  # sigma_data = 0.5
    z = y + sigma.view((n,) + (1,) * (len(shape) - 1)) * torch.randn(shape, generator=g, dtype=torch.float64)
    f = torch.randn(shape, generator=g, dtype=torch.float64)
    dz, df, dy = dtypes
    tensors = [t.to(device(), dt).requires_grad_() for t, dt in ((z, dz), (f, df), (y, dy))]
    return (*tensors, sigma.to(device(), sigma_dtype))


def _upstream(n, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn((), generator=g).to(device()), torch.randn(n, generator=g).to(device())


def _run(fn, z, f, y, sigma, a, b):
    """(loss, per_sample, dz, df, dy) with upstream gradients a on loss and b on per_sample."""
    loss, per = fn(z, f, y, sigma)
    grads = torch.autograd.grad(loss * a.to(loss.dtype) + (per * b.to(per.dtype)).sum(), (z, f, y))
    return (loss.detach(), per.detach(), *grads)


def _ref64(z, f, y, sigma, a, b):
    leaves = [t.detach().double().requires_grad_() for t in (z, f, y)]
    return _run(ops.edm_l2_loss_ref, *leaves, sigma.double(), a.double(), b.double())


def _rounding_bounds(z, f, y, sigma, a, b, out_dtypes):
    """Per-element bounds on |got - float64| for per_sample, dz, df, dy from fp32 rounding.

    e = D - y is computed as c_skip (z - y) + c_out f - (1 - c_skip) y: a few roundings of each term, so
    |e error| <= 4 eps32 T with T the sum of the terms' magnitudes; coefficients, the upstream scale and the
    reductions add a few eps32 relative, and a low-precision gradient one rounding of its dtype: a full ulp,
    since Triton's CPU interpreter truncates fp32 -> bf16 where the GPU rounds to nearest, and absolute in
    fp16's subnormal range, which dz of large-sigma samples reaches (c_skip(80) = 4e-5).
    """
    z, f, y, s = (t.detach().double() for t in (z, f, y, sigma))
    n, m = z.shape[0], z[0].numel()
    rows = (n,) + (1,) * (z.dim() - 1)
    c_skip, c_out, w = precond.c_skip(s).view(rows), precond.c_out(s).view(rows), precond.loss_weight(s)
    e = precond.denoise(z, f, s) - y
    terms = (c_skip * (z - y)).abs() + (c_out * f).abs() + ((1 - c_skip) * y).abs()
    per = w * e.square().flatten(1).mean(1)
    per_bound = w * (8 * EPS32 * e.abs() * terms).flatten(1).mean(1) + 32 * EPS32 * per
    coef = (a.double() / n + b.double()).view(rows) * 2 * w.view(rows) / m
    grad_bounds = []
    for k, dt in zip((c_skip, c_out, -1.0), out_dtypes):
        scale = (coef * k).abs()
        fi = torch.finfo(dt)
        grad_bounds.append(scale * (4 * EPS32 * terms + (8 * EPS32 + fi.eps) * e.abs()) + fi.tiny * fi.eps)
    return (per_bound, *grad_bounds)


def _check(z, f, y, sigma, seed, fn=edm_l2_loss):
    n = z.shape[0]
    a, b = _upstream(n, seed)
    got = _run(fn, z, f, y, sigma, a, b)
    ref = _ref64(z, f, y, sigma, a, b)
    # eager: the torch reference on the same-dtype inputs (fp32 arithmetic, gradients in the input dtype)
    eager = _run(ops.edm_l2_loss_ref, z, f, y, sigma, a, b)
    names = ("loss", "per_sample", "dz", "df", "dy")
    for name, g, r in zip(names, got, ref):
        assert g.shape == r.shape, name
    assert got[0].dtype == got[1].dtype == torch.float32
    assert [g.dtype for g in got[2:]] == [z.dtype, f.dtype, y.dtype]
    # calibrated, sample by sample (each with its own scale); eager fp32 can be exact on easy samples, so
    # the floor (1e-6 for fp32 outputs, kerneltest.FLOOR) is what bounds those
    assert_calibrated("loss", got[0], ref[0], eager[0])
    for i in range(n):
        for name, g, r, e in zip(names[1:], got[1:], ref[1:], eager[1:]):
            assert_calibrated(f"{name}[{i}]", g[i], r[i], e[i])
    bounds = _rounding_bounds(z, f, y, sigma, a, b, [t.dtype for t in (z, f, y)])
    for name, g, r, bound in zip(names[1:], got[1:], ref[1:], bounds):
        excess = ((g.double() - r).abs() - bound).max().item()
        assert excess <= 0, f"{name}: error exceeds the fp32 rounding bound by {excess:.3g}"
    return got, ref, eager


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_gradients(shape, dtype, poison_outputs):
    seed = _seed(shape, dtype)
    _check(*_inputs(shape, (dtype,) * 3, seed), seed)


def test_several_chunks_and_reduction_tiles(monkeypatch, poison_outputs):
    """Tiny blocks: M = 429 spans 27 chunks, and the reducing program loops over rows and over chunks."""
    monkeypatch.setattr(edm_loss, "_MAX_BLOCK", 16)
    monkeypatch.setattr(edm_loss, "_REDUCE_TILE", 16)
    for shape in [(5, 3, 11, 13), (2, 37)]:
        seed = _seed("chunks", shape)
        _check(*_inputs(shape, (torch.float32,) * 3, seed), seed)


def test_mixed_dtypes_and_float64_sigma(poison_outputs):
    dtypes = (torch.float32, torch.bfloat16, torch.float32)  # z, f, y: a bf16 network on fp32 data
    seed = _seed("mixed")
    _check(*_inputs((3, 2, 9), dtypes, seed), seed)
    _check(*_inputs((3, 2, 9), (torch.float16,) * 3, seed, sigma_dtype=torch.float64), seed)


def test_non_contiguous_inputs(poison_outputs):
    seed = _seed("strides")
    z, f, y, sigma = _inputs((4, 6, 5), (torch.float32, torch.bfloat16, torch.float32), seed)
    zt = z.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # strides (30, 1, 6)
    big = torch.zeros(8, 6, 5, device=device(), dtype=torch.bfloat16)
    big[::2] = f.detach()
    fs = big.requires_grad_()[::2]  # a batch slice: a view with row stride 60
    ys = y.detach()[:1].clone().requires_grad_().expand_as(y)  # batch stride 0
    sigma_s = torch.stack([sigma, sigma], 1)[:, 0]  # stride 2
    assert not (zt.is_contiguous() or fs.is_contiguous() or ys.is_contiguous() or sigma_s.is_contiguous())
    _check(zt, fs, ys, sigma_s, seed)
    wide = torch.zeros(4, 6, 10, device=device())
    wide[..., ::2] = z.detach()
    zw = wide.requires_grad_()[..., ::2]  # flattens to (4, 30) only with element stride 2
    assert zw.reshape(4, 30).stride() == (60, 2)
    _check(zw, f, y, sigma, seed)


def test_plain_backward_gets_expanded_gradients(poison_outputs):
    """loss.backward() and per_sample.sum().backward() hand the op expanded (stride-0) gradients."""
    z, f, y, sigma = _inputs((3, 1, 5, 7), (torch.float32,) * 3, _seed("plain"))
    z, y = z.detach(), y.detach()  # training: only the network output needs a gradient
    sigma.requires_grad_()  # treated as a constant: gets no gradient
    f64 = f.detach().double().requires_grad_()
    loss64, per64 = ops.edm_l2_loss_ref(z.double(), f64, y.double(), sigma.detach().double())
    for pick in (lambda lp: lp[0], lambda lp: lp[1].sum(), lambda lp: lp[1].mean()):
        f.grad = None
        pick(edm_l2_loss(z, f, y, sigma)).backward()
        (want,) = torch.autograd.grad(pick((loss64, per64)), f64, retain_graph=True)
        torch.testing.assert_close(f.grad.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        assert sigma.grad is None


def test_no_gradient_means_no_r(monkeypatch):
    """Without an input that needs a gradient the forward allocates no (N, M) buffer for the backward."""
    z, f, y, sigma = (t.detach() for t in _inputs((2, 37), (torch.float32,) * 3, _seed("nograd")))
    shapes = []
    real_empty = _utils.empty

    def recording(shape, dtype, dev):
        shapes.append(tuple(shape))
        return real_empty(shape, dtype, dev)

    monkeypatch.setattr(_utils, "empty", recording)
    loss, per = edm_l2_loss(z, f, y, sigma)
    assert (2, 37) not in shapes and not loss.requires_grad
    with torch.no_grad():
        edm_l2_loss(z, f.requires_grad_(), y, sigma)
    assert (2, 37) not in shapes
    ref_loss, ref_per = ops.edm_l2_loss_ref(z, f, y, sigma)
    torch.testing.assert_close(per, ref_per, rtol=1e-5, atol=0)


def test_torch_compile_fullgraph(poison_outputs):
    """The fake implementations trace (aot_eager: no C++ compiler), forward and backward."""
    torch._dynamo.reset()
    z, f, y, sigma = _inputs((2, 3, 5), (torch.float32, torch.bfloat16, torch.float32), _seed("compile"))

    def step(z, f, y, sigma):
        loss, per = edm_l2_loss(z, f, y, sigma)
        return loss + 0.25 * per.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(z, f, y, sigma)
    grads = torch.autograd.grad(out, (z, f, y))
    want = step(z, f, y, sigma)
    want_grads = torch.autograd.grad(want, (z, f, y))
    torch.testing.assert_close(out, want, rtol=0, atol=0)  # the same kernels, so the same bits
    for g, w in zip(grads, want_grads):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_opcheck():
    """Schemas, fake implementations and the autograd registration of both custom ops."""
    z, f, y, sigma = _inputs((3, 5), (torch.float32, torch.bfloat16, torch.float32), _seed("opcheck"))
    torch.library.opcheck(torch.ops.dblocks.edm_l2_loss.default, (z, f, y, sigma, 0.5, True))
    r = torch.randn(3, 5, device=device())
    bwd = torch.ops.dblocks.edm_l2_loss_backward.default
    torch.library.opcheck(
        bwd, (r, sigma, torch.tensor(2.0, device=device()), None, 0.5, torch.float32, None, None)
    )
    g_per = torch.ones(1, device=device()).expand(3)
    torch.library.opcheck(bwd, (r, sigma, None, g_per, 0.5, None, torch.bfloat16, torch.float16))


def _bad(**changes):
    args = dict(
        z=torch.zeros(2, 3),
        f=torch.zeros(2, 3),
        y=torch.zeros(2, 3),
        sigma=torch.ones(2),
        sigma_data=0.5,
    )
    return {**args, **changes}


@pytest.mark.parametrize(
    "args, match",
    [
        (_bad(f=torch.zeros(2, 4)), r"edm_l2_loss: z, f and y must have the same shape .* f \(2, 4\)"),
        (_bad(y=torch.zeros(3, 3)), "must have the same shape"),
        (_bad(sigma=torch.ones(2, 1)), r"sigma must be 1-D of length N = 2 .* got shape \(2, 1\)"),
        (_bad(sigma=torch.ones(3)), "sigma must be 1-D of length N = 2"),
        (_bad(z=torch.zeros(2, 3, dtype=torch.int32)), "z must be float32, bfloat16 or float16"),
        (_bad(y=torch.zeros(2, 3, dtype=torch.float64)), "y must be float32, bfloat16 or float16"),
        (_bad(sigma=torch.ones(2, dtype=torch.float16)), "sigma must be float32 or float64"),
        (_bad(z=torch.zeros(0, 3), f=torch.zeros(0, 3), y=torch.zeros(0, 3)), r"batch is empty \(N = 0\)"),
        (_bad(z=torch.zeros(2, 0), f=torch.zeros(2, 0), y=torch.zeros(2, 0)), "each sample has no elements"),
        (_bad(sigma_data=0.0), "sigma_data must be positive"),
        (_bad(sigma_data=-0.5), "sigma_data must be positive"),
        (_bad(sigma=torch.ones(2, device="meta")), "edm_l2_loss: all inputs must be on one device"),
    ],
)
def test_input_errors(args, match):
    with pytest.raises(ValueError, match=match):
        edm_l2_loss(**args)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="edm_l2_loss: Triton kernels need CUDA tensors"):
        edm_l2_loss(**_bad())
