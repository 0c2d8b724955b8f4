import pytest
import torch
import torch.nn.functional as F

from dblocks_fast import ops, precond

SHAPES = [(1, 1, 37), (3, 5, 113), (2, 17, 64)]  # N, T, D: T = 1, odd D
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=5e-2, rtol=2e-2),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
}


def _adaln64(x, shift, scale, eps):
    x = x.double()
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * (1 + scale.double()[:, None]) + shift.double()[:, None]


def _inputs(shape, dtype, seed, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in [shape] + [shape[::2]] * (n - 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", list(TOL))
def test_adaln_modulate_forward_and_gradients(shape, dtype):
    x, shift, scale = _inputs(shape, dtype, seed=hash((shape, str(dtype))) % 2**31)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous input
    y = ops.adaln_modulate(x, shift, scale, 1e-6, kernels="torch")
    leaves64 = [t.detach().double().requires_grad_() for t in (x, shift, scale)]
    ref = _adaln64(*leaves64, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), ref, **TOL[dtype])
    gy = torch.randn(y.shape, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, shift, scale), gy.to(dtype))
    want = torch.autograd.grad(ref, leaves64, gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **{k: 4 * v for k, v in TOL[dtype].items()})


@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual_adaln(shape):
    g = torch.Generator().manual_seed(3)
    x, y = (torch.randn(shape, generator=g, requires_grad=True) for _ in range(2))
    gate, shift, scale = (torch.randn(shape[::2], generator=g, requires_grad=True) for _ in range(3))
    x_new, h = ops.gated_residual_adaln(x, y, gate, shift, scale, kernels="torch")
    x_ref = x.double() + gate.double()[:, None] * y.double()
    torch.testing.assert_close(x_new.double(), x_ref)
    torch.testing.assert_close(h.double(), _adaln64(x_ref, shift, scale, 1e-6), atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad((x_new.sum() + (h * h).sum()), (x, y, gate, shift, scale))
    x64, y64, gate64, shift64, scale64 = (
        t.detach().double().requires_grad_() for t in (x, y, gate, shift, scale)
    )
    xr = x64 + gate64[:, None] * y64
    ref_h = _adaln64(xr, shift64, scale64, 1e-6)
    want = torch.autograd.grad((xr.sum() + (ref_h * ref_h).sum()), (x64, y64, gate64, shift64, scale64))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_edm_l2_loss_matches_float64_and_its_gradient(dtype):
    g = torch.Generator().manual_seed(7)
    n = 5
    y = torch.randn(n, 1, 3, 5, generator=g)
    sigma = torch.tensor([0.002, 0.05, 0.5, 4.0, 80.0])
    z = y + sigma.view(-1, 1, 1, 1) * torch.randn(y.shape, generator=g)
    f = torch.randn(y.shape, generator=g).to(dtype).requires_grad_()
    loss, per = ops.edm_l2_loss(z, f, y, sigma, 0.5, kernels="torch")
    s = sigma.double()
    d = precond.denoise(z.double(), f.double(), s)
    per_ref = precond.loss_weight(s) * ((d - y.double()) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(per.double(), per_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.double(), per_ref.mean(), rtol=1e-5, atol=0)
    (gf,) = torch.autograd.grad(loss, f)
    # d loss / d f = 2 w c_out (D - y) / numel  (w c_out = 1 / c_out)
    scale = (2 / precond.c_out(s) / y.numel()).view(-1, 1, 1, 1)
    want = scale * (d - y.double())
    # D - y cancels at small sigma: fp32 rounding of its three terms bounds the error, not a fixed rtol
    terms = (
        (precond.c_skip(s).view(-1, 1, 1, 1) * z.double()).abs()
        + (d - precond.c_skip(s).view(-1, 1, 1, 1) * z.double()).abs()
        + y.abs()
    )
    bound = (
        scale * 8 * torch.finfo(torch.float32).eps * terms
        + (1e-5 if dtype == torch.float32 else 1e-2) * want.abs()
    )
    assert ((gf.double() - want).abs() <= bound).all()


def test_selection_rules(monkeypatch):
    x = torch.zeros(1, 1, 4)
    assert ops.select("adaln_modulate", "torch", x.device) is ops.adaln_modulate_ref
    assert ops.select("adaln_modulate", "auto", x.device) is ops.adaln_modulate_ref
    with pytest.raises(ValueError, match="kernels must be one of"):
        ops.select("adaln_modulate", "fast", x.device)
    # Triton: "auto" picks it on CUDA only; on the CPU it runs when asked for, under the interpreter
    assert "triton" in ops.available("adaln_modulate")
    assert ops.select("adaln_modulate", "triton", x.device).__name__ == "triton_adaln_modulate"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="cannot run on device cpu"):
        ops.select("adaln_modulate", "triton", x.device)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(ops._REGISTRY, "edm_l2_loss", {"torch": ops._REGISTRY["edm_l2_loss"]["torch"]})
    with pytest.raises(RuntimeError, match="no triton implementation of it"):
        ops.select("edm_l2_loss", "triton", x.device)
    # a registered fast path wins "auto" where usable; a disabled or unusable one falls back to the reference
    monkeypatch.setitem(ops._REGISTRY, "adaln_modulate", dict(ops._REGISTRY["adaln_modulate"]))

    def fake(*a):
        return "fake"

    ops.register("adaln_modulate", "triton", fake, lambda d: d.type == "cpu")
    assert ops.select("adaln_modulate", "auto", x.device) is fake
    monkeypatch.setenv("DBLOCKS_DISABLE_TRITON", "1")
    assert ops.select("adaln_modulate", "auto", x.device) is ops.adaln_modulate_ref
    monkeypatch.delenv("DBLOCKS_DISABLE_TRITON")
    ops.register("adaln_modulate", "triton", fake, lambda d: False)
    assert ops.select("adaln_modulate", "auto", x.device) is ops.adaln_modulate_ref
    with pytest.raises(RuntimeError, match="cannot run on device"):
        ops.select("adaln_modulate", "triton", x.device)


def test_cuda_kernels_are_registered_but_never_chosen_on_the_cpu():
    x = torch.zeros(1, 1, 4)
    for name in ("adaln_modulate", "gated_residual_adaln", "edm_l2_loss"):
        assert "cuda" in ops.available(name)
        assert ops.select(name, "auto", x.device).__name__ != f"cuda_{name}"
        with pytest.raises(RuntimeError, match="cannot run on device cpu"):
            ops.select(name, "cuda", x.device)
    with pytest.raises(RuntimeError, match="no cuda implementation"):
        ops.select("weighted_linear_cross_entropy", "cuda", x.device)


def test_layer_norm_reference_agrees_with_torch():
    x = torch.randn(2, 3, 37)
    z = torch.zeros(2, 37)
    torch.testing.assert_close(ops.adaln_modulate_ref(x, z, z), F.layer_norm(x, (37,), eps=1e-6))


def test_every_op_routes_to_its_triton_kernel_and_agrees_with_torch():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    gate, shift, scale = (torch.randn(2, 8, generator=g) for _ in range(3))
    sigma = torch.tensor([0.01, 5.0])
    h, w = torch.randn(6, 8, generator=g), torch.randn(11, 8, generator=g)
    target, rw = torch.randint(0, 11, (6,), generator=g), torch.rand(6, generator=g)
    calls = {
        "adaln_modulate": (x, shift, scale),
        "gated_residual_adaln": (x, y, gate, shift, scale),
        "edm_l2_loss": (x, y, x * 0.9, sigma),
        "weighted_linear_cross_entropy": (h, w, target, rw),
    }
    for name, args in calls.items():
        cuda = ("cuda",) if name != "weighted_linear_cross_entropy" else ()
        assert ops.available(name) == (*cuda, "triton", "torch"), name
        fast, ref = (getattr(ops, name)(*args, kernels=k) for k in ("triton", "torch"))
        for a, b in zip(
            fast if isinstance(fast, tuple) else (fast,), ref if isinstance(ref, tuple) else (ref,)
        ):
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5, msg=name)
