"""kernels/_custom_op.py: the one helper that makes every custom op, its fake and its autograd.

A toy op with torch launchers holds the helper's contract (a None gradient, gradients in the inputs' dtypes,
placeholders, opcheck, torch.compile); the real ops are held to it through the Triton kernels here and,
with `pytest -m gpu`, the CUDA kernels; and every `dblocks::` op is checked to come from the helper, the
Triton and the CUDA version of an op from one definition.
"""

import pytest
import torch

from dblocks_fast import cuda_ops, kernels
from dblocks_fast.kernels import _custom_op, _opdefs
from tests import test_kernel_adaln as adaln_tests
from tests.kerneltest import device

pytestmark = pytest.mark.kernel  # on the GPU, gpu_session.py runs these (its stage "triton")

# --- the helper on a toy op ---------------------------------------------------------------------------------
TOY = _custom_op.OpDef(
    "(Tensor a, Tensor b, float alpha) -> (Tensor prod, Tensor total, Tensor stat)",
    fake=lambda a, b, alpha: (a.new_empty(a.shape), a.new_empty(a.shape), a.new_empty(())),
    grad_inputs=("a", "b"),
    grad_outputs=("prod", "total"),
    saves=("a", "b", "alpha"),
    grad_like=("a", "b"),
)
RECEIVED = []  # (g_prod is None, g_total is None, da_dtype, db_dtype) of each backward call


def _toy_forward(a, b, alpha):
    prod = a * b * alpha
    return prod, (a + b).to(prod.dtype), prod.sum().detach()  # stat: a by-product, no gradient


def _toy_backward(a, b, g_prod, g_total, alpha, da_dtype, db_dtype):
    RECEIVED.append((g_prod is None, g_total is None, da_dtype, db_dtype))
    da = torch.zeros(a.shape, dtype=torch.float32, device=a.device)
    db = torch.zeros_like(da)
    if g_prod is not None:  # None: prod did not reach the loss, a zero gradient
        da, db = da + g_prod * b * alpha, db + g_prod * a * alpha
    if g_total is not None:
        da, db = da + g_total, db + g_total
    return _custom_op.as_requested((da, db), (da_dtype, db_dtype))


_toy = _custom_op.build("dblocks_test::toy", TOY, _toy_forward, _toy_backward)


def _toy_inputs(b_grad=True):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, generator=g).requires_grad_()
    b = torch.randn(3, 5, generator=g).to(torch.bfloat16).requires_grad_(b_grad)
    return a, b


def _eager(a, b, alpha):
    prod = a * b * alpha
    return prod, (a + b).to(prod.dtype)


@pytest.mark.parametrize("used", ["prod", "total", "both"])
def test_an_unused_output_reaches_the_backward_as_none_and_counts_as_zero(used):
    a, b = _toy_inputs()
    w = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))

    def loss(outs):
        picked = {"prod": outs[0], "total": outs[1], "both": outs[0] + outs[1]}[used]
        return (picked * w).sum()

    RECEIVED.clear()
    got = torch.autograd.grad(loss(_toy(a, b, 2.0)), (a, b))
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    want = torch.autograd.grad(loss(_eager(a64, b64, 2.0)), (a64, b64))
    assert RECEIVED == [(used == "total", used == "prod", torch.float32, torch.bfloat16)]
    for g, wg, x in zip(got, want, (a, b)):
        assert g.dtype == x.dtype  # each gradient in its input's dtype, rounded to it once
        tol = 4 * torch.finfo(x.dtype).eps
        torch.testing.assert_close(g.double(), wg, rtol=tol, atol=tol * wg.abs().max().item())


def test_no_gradient_asked_means_none_and_a_placeholder():
    a, b = _toy_inputs(b_grad=False)
    RECEIVED.clear()
    (da,) = torch.autograd.grad(_toy(a, b, 2.0)[0].sum(), (a,))
    assert RECEIVED == [(False, True, torch.float32, None)]  # b needs none: the launcher is told so
    torch.testing.assert_close(da, b.float() * 2.0)
    prod, total, stat = _toy(a, b, 2.0)
    assert prod.requires_grad and total.requires_grad and not stat.requires_grad  # stat is a by-product


def test_toy_op_passes_opcheck_and_compiles_in_one_graph():
    a, b = _toy_inputs()
    torch.library.opcheck(_toy._opoverload, (a, b, 2.0))
    torch._dynamo.reset()

    def f(a, b):
        return (_toy(a, b, 2.0)[1] * 3.0).sum()  # prod unused: its gradient is None in the traced backward

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for g, w in zip(torch.autograd.grad(compiled(a, b), (a, b)), torch.autograd.grad(f(a, b), (a, b))):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_a_definition_that_names_no_field_is_refused():
    with pytest.raises(ValueError, match="must name fields"):
        _custom_op.OpDef(TOY.schema, TOY.fake, ("a", "c"), ("prod",), ("a",), ("a", "a"))
    with pytest.raises(ValueError, match="inputs"):
        _custom_op.OpDef("a, b -> c", TOY.fake, (), (), (), ())


# --- the real ops -------------------------------------------------------------------------------------------
def test_every_op_is_built_by_the_helper_and_triton_and_cuda_share_one_definition():
    pairs = {
        "adaln_modulate": _opdefs.ADALN_MODULATE,
        "gated_residual_adaln": _opdefs.GATED_RESIDUAL_ADALN,
        "edm_l2_loss": _opdefs.EDM_L2_LOSS,
    }
    assert kernels.adaln_modulate and cuda_ops.adaln_modulate  # both backends imported, so registered
    for name, opdef in pairs.items():
        assert _custom_op.BUILT[f"dblocks::{name}"] is _custom_op.BUILT[f"dblocks::cuda_{name}"] is opdef
        for suffix in ("", "_backward"):
            triton_op = str(getattr(torch.ops.dblocks, name + suffix).default._schema)
            cuda_op = str(getattr(torch.ops.dblocks, f"cuda_{name}{suffix}").default._schema)
            assert triton_op.split("(", 1)[1] == cuda_op.split("(", 1)[1]  # the signature, without the name
    assert kernels.weighted_linear_cross_entropy  # Triton only
    for n in [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("dblocks::")]:
        assert n.removesuffix("_backward") in _custom_op.BUILT, f"{n} was not built by kernels/_custom_op.py"


def test_opcheck_of_the_triton_adaln_ops_with_mixed_dtypes():
    """Schemas, fakes and autograd of the ops built from _opdefs; the backward ops' fakes and real outputs
    agree on every gradient's dtype (the Triton dscale once came in shift's dtype, its fake in scale's)."""
    dev = device()
    x, y = (torch.randn(2, 3, 16, device=dev, requires_grad=True) for _ in range(2))
    gate, shift = (torch.randn(2, 16, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    scale = torch.randn(2, 16, device=dev, requires_grad=True)  # another dtype than shift's
    ops = torch.ops.dblocks
    torch.library.opcheck(ops.adaln_modulate.default, (x, shift, scale, 1e-6))
    torch.library.opcheck(ops.gated_residual_adaln.default, (x, y, gate, shift, scale, 1e-6))
    x, y, gate, shift, scale = (t.detach() for t in (x, y, gate, shift, scale))  # no double backward
    h, mean, rstd = ops.adaln_modulate(x, shift, scale, 1e-6)
    dtypes = (x.dtype, shift.dtype, scale.dtype)
    torch.library.opcheck(ops.adaln_modulate_backward.default, (x, scale, mean, rstd, h, *dtypes))
    bf16, f32 = torch.bfloat16, torch.float32  # dx in bf16 and no dy wanted: a placeholder
    args = (x, y, gate, scale, mean, rstd, None, h, bf16, None, bf16, bf16, f32)
    torch.library.opcheck(ops.gated_residual_adaln_backward.default, args)


def _gated_grads(fn, inputs, used, w):
    x_new, h = fn(**inputs)
    loss = ((x_new if used == "x_new" else h) * w).sum()
    return torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)


def _check_one_output_used(fn, used, dtype, dev):
    """Gradients of gated_residual_adaln when only one of its outputs reaches the loss, against float64."""
    names = ["x", "y", "gate", "shift", "scale"]
    inputs = adaln_tests._inputs((2, 5, 37), dtype, hash((used, str(dtype))) % 2**31, names)
    w = torch.randn(2, 5, 37, generator=torch.Generator().manual_seed(2)).to(dev)

    def ref(x, y, gate, shift, scale):
        x_new = x + gate[:, None] * y
        return x_new, adaln_tests._adaln(x_new, shift, scale)

    got = _gated_grads(fn, inputs, used, w)
    want = _gated_grads(ref, {k: v.detach().double().requires_grad_() for k, v in inputs.items()}, used, w)
    for name, g, r in zip(names, got, want):
        assert g.dtype == inputs[name].dtype, name
        if r is None:  # the output that carries this input's gradient was not used: exactly zero
            assert not g.any(), name
        else:
            tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
            torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * r.abs().max().item(), msg=name)


@pytest.mark.parametrize("used", ["x_new", "h"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gated_adaln_with_one_output_used(used, dtype, poison_outputs):
    _check_one_output_used(kernels.gated_residual_adaln, used, dtype, device())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("used", ["x_new", "h"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_gated_adaln_with_one_output_used(used, dtype):
    _check_one_output_used(cuda_ops.gated_residual_adaln, used, dtype, torch.device("cuda"))


def test_the_kernels_folder_imported_by_its_own_name_registers_nothing():
    """transformers (through peft) probes for Hugging Face's `kernels` package with import_module("kernels"),
    which finds this repository's kernels/ folder when the repository root is on sys.path. That import must
    define no op a second time: the dblocks:: ops would then run the copy's code."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys, importlib\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "import dblocks_fast.kernels as ours\n"
        "probe = importlib.import_module('kernels')\n"
        "assert probe is not ours and probe.__all__ == [] and not hasattr(probe, '__version__')\n"
        "assert not [m for m in sys.modules if m.startswith('kernels.')], sorted(sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
