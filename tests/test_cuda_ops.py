"""The CUDA C++ ops (csrc/, through dblocks_fast.cuda_ops) against float64 and against the Triton kernels.

The numeric tests need a GPU and a built _C (`pytest -m gpu`); they reuse the Triton tests' checks, so the
CUDA kernels meet the same calibrated tolerances. One test runs the ops under compute-sanitizer (memcheck
and racecheck). On a machine without a GPU only the input checks run here; tests/test_csrc.py covers the
build, the C header and the argument checks of the C entry points.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dblocks_fast import _C_loader, cuda_ops, kernels
from tests import test_kernel_adaln as adaln_tests
from tests import test_kernel_edm_loss as loss_tests
from tests.kerneltest import DTYPES

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


def gpu(test):
    """A GPU test: marked `gpu` (deselect with -m "not gpu"), skipped where there is no CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs a CUDA device")(test))


# N, T, D: D odd (scalar path), D a multiple of 8 (16-byte vectors), D beyond the register-cached rows,
# T = 1, and T long enough for several backward chunks per sample
ADALN_SHAPES = [(1, 1, 37), (3, 5, 113), (2, 17, 64), (4, 33, 8), (2, 300, 1152), (1, 3, 8200), (5, 2, 4099)]
LOSS_SHAPES = [(1, 1), (3, 1, 5, 7), (2, 37), (5, 3, 11, 13), (3, 4, 64, 64), (2, 10001)]


@pytest.fixture(autouse=True)
def _built():
    if CUDA and _C_loader.load() is None:
        pytest.fail(
            f"dblocks_fast._C is not built, so the CUDA ops cannot be tested: {_C_loader.why_unavailable()}"
        )


# --- on any machine -----------------------------------------------------------------------------------------
def test_cpu_tensors_are_refused_with_the_way_out():
    x, v = torch.randn(2, 3, 8), torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="need CUDA tensors and a built dblocks_fast._C.*kernels='auto'"):
        cuda_ops.adaln_modulate(x, v, v)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        cuda_ops.edm_l2_loss(x, x, x, torch.ones(2))
    with pytest.raises(ValueError, match="must be float32, bfloat16 or float16"):
        cuda_ops.adaln_modulate(x.double(), v, v)
    with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
        cuda_ops.fused_adamw_(*(torch.zeros(4) for _ in range(4)), lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8,
                              weight_decay=0.0, step=1)  # fmt: skip
    with pytest.raises(ValueError, match="contiguous float32"):
        half = torch.zeros(4, dtype=torch.float16)
        cuda_ops.fused_adamw_(torch.zeros(4), half, torch.zeros(4), torch.zeros(4), lr=1e-3, beta1=0.9,
                              beta2=0.99, eps=1e-8, weight_decay=0.0, step=1)  # fmt: skip


def test_cuda_ops_are_not_available_on_the_cpu():
    assert not cuda_ops.available(torch.device("cpu"))


# --- on a GPU -----------------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("shape", ADALN_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adaln_against_float64(shape, dtype):
    inputs = adaln_tests._inputs(
        shape, dtype, hash((shape, str(dtype), "cuda")) % 2**31, ["x", "shift", "scale"]
    )
    adaln_tests._check_op(
        "cuda adaln_modulate",
        lambda **a: (cuda_ops.adaln_modulate(**a),),
        lambda **a: (adaln_tests._adaln(**a),),
        inputs,
        [torch.randn(shape, device="cuda")],
    )


@gpu
@pytest.mark.parametrize("shape", ADALN_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_against_float64_and_triton(shape, dtype):
    names = ["x", "y", "gate", "shift", "scale"]
    inputs = adaln_tests._inputs(shape, dtype, hash((shape, str(dtype), "cuda", 1)) % 2**31, names)

    def ref(x, y, gate, shift, scale):
        x_new = x + gate[:, None] * y
        return x_new, adaln_tests._adaln(x_new, shift, scale)

    upstream = [torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda")]
    adaln_tests._check_op("cuda gated_residual_adaln", cuda_ops.gated_residual_adaln, ref, inputs, upstream)
    # and next to the Triton kernel: both fp32 inside, so they differ by output rounding at most
    ours = cuda_ops.gated_residual_adaln(**inputs)
    theirs = kernels.gated_residual_adaln(**inputs)
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@gpu
def test_adaln_strided_mixed_dtypes_and_chunks_of_one_modulation():
    torch.manual_seed(0)
    n, t, d = 3, 7, 24
    x = torch.randn(t, n, d, device="cuda").transpose(0, 1).requires_grad_()
    mod = torch.randn(n, 6 * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    shift, scale, gate = mod[:, :d], mod[:, d : 2 * d], mod[:, 2 * d : 3 * d]  # row stride 6D, no copy
    y = torch.randn(n, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x_new, h = cuda_ops.gated_residual_adaln(x, y, gate, shift, scale)
    want_x, want_h = kernels.gated_residual_adaln(x, y, gate, shift, scale)
    assert x_new.dtype == h.dtype == torch.float32
    torch.testing.assert_close(x_new, want_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h, want_h, rtol=1e-5, atol=1e-5)
    w = torch.randn(n, t, d, device="cuda")
    got = torch.autograd.grad((h * w).sum() + x_new.sum(), (x, y, mod))
    want = torch.autograd.grad((want_h * w).sum() + want_x.sum(), (x, y, mod))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)  # dy, dmod are bf16


@gpu
def test_adaln_backward_is_deterministic():
    torch.manual_seed(1)
    x = torch.randn(4, 500, 384, device="cuda", requires_grad=True)
    shift, scale = (torch.randn(4, 384, device="cuda", requires_grad=True) for _ in range(2))
    runs = [torch.autograd.grad(cuda_ops.adaln_modulate(x, shift, scale).square().sum(), (x, shift, scale))
            for _ in range(2)]  # fmt: skip
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@gpu
@pytest.mark.parametrize("shape", LOSS_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_edm_loss_against_float64_and_the_rounding_bound(shape, dtype):
    seed = loss_tests._seed(shape, dtype, "cuda")
    loss_tests._check(*loss_tests._inputs(shape, (dtype,) * 3, seed), seed, fn=cuda_ops.edm_l2_loss)


@gpu
def test_edm_loss_mixed_dtypes_views_and_triton():
    seed = loss_tests._seed("cuda mixed")
    z, f, y, sigma = loss_tests._inputs((4, 3, 9, 9), (torch.float32, torch.bfloat16, torch.float16), seed)
    loss_tests._check(z, f, y, sigma.double(), seed, fn=cuda_ops.edm_l2_loss)
    big = torch.randn(6, 5000, device="cuda", requires_grad=True)
    view = big[::2, 1:]  # strided rows: copied to contiguous by the wrapper
    s = torch.rand(3, device="cuda") + 0.1
    ours = cuda_ops.edm_l2_loss(view, view * 0.5, view * 0.9, s)
    theirs = kernels.edm_l2_loss(view, view * 0.5, view * 0.9, s)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


@gpu
def test_opcheck_of_every_cuda_op():
    x, y = (torch.randn(2, 3, 16, device="cuda", requires_grad=True) for _ in range(2))
    v = [torch.randn(2, 16, device="cuda", requires_grad=True) for _ in range(3)]
    ops = torch.ops.dblocks
    torch.library.opcheck(ops.cuda_adaln_modulate.default, (x, v[0], v[1], 1e-6))
    torch.library.opcheck(ops.cuda_gated_residual_adaln.default, (x, y, *v, 1e-6))
    sigma = torch.rand(2, device="cuda") + 0.01
    torch.library.opcheck(ops.cuda_edm_l2_loss.default, (x, y, x.detach(), sigma, 0.5, True))


SANITIZED = textwrap.dedent(
    """
    import torch
    from dblocks_fast import cuda_ops, ops
    torch.manual_seed(0)
    for n, t, d in [(2, 5, 37), (3, 40, 1152), (1, 2, 8200)]:
        x, y = (torch.randn(n, t, d, device="cuda", requires_grad=True) for _ in range(2))
        g, s, c = (torch.randn(n, d, device="cuda", requires_grad=True) for _ in range(3))
        x_new, h = cuda_ops.gated_residual_adaln(x, y, g, s, c)
        (cuda_ops.adaln_modulate(x_new, s, c) * h).sum().backward()
        z = torch.randn(n, t * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        loss, per = cuda_ops.edm_l2_loss(z, z * 0.5, z.detach() * 0.9, torch.rand(n, device="cuda") + 0.01)
        (loss + per.sum()).backward()
    for n in (1, 4099, 1 << 16):
        p, gr, m, v = (torch.rand(n + 1, device="cuda")[1:] for _ in range(4))  # unaligned: scalar path
        ops.adamw_(p, gr, m, v, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=2,
                   kernels="cuda")
        p, gr, m, v = (torch.rand(n, device="cuda") for _ in range(4))
        ops.adamw_(p, gr, m, v, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=2,
                   param_bf16=torch.empty(n, device="cuda", dtype=torch.bfloat16),
                   grad_scale=torch.ones(1, device="cuda"), found_inf=torch.zeros(1, device="cuda"),
                   kernels="cuda")
    torch.cuda.synchronize()
    print("sanitized run done")
    """
)


@gpu
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_under_compute_sanitizer(tool, tmp_path):
    sanitizer = shutil.which("compute-sanitizer") or shutil.which(
        "compute-sanitizer", path=os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin")
    )
    if sanitizer is None:
        pytest.fail("compute-sanitizer is not on PATH or in $CUDA_HOME/bin: install the CUDA toolkit's copy")
    script = tmp_path / "sanitized.py"
    script.write_text(SANITIZED)
    cmd = [sanitizer, "--tool", tool, "--error-exitcode", "3", sys.executable, str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "sanitized run done" in output, output[-4000:]
    assert "ERROR SUMMARY: 0 errors" in output or "RACECHECK SUMMARY: 0 hazards" in output, output[-4000:]


@gpu
@pytest.mark.parametrize("gated", [False, True])
def test_a_float32_shift_beside_bf16_scale_gets_a_float32_gradient(gated):
    """dshift is written in the modulation dtype: it must hold shift's own float32, not bf16 cast up."""
    torch.manual_seed(1)
    n, t, d = 4, 64, 96
    x = torch.randn(n, t, d, device="cuda", dtype=torch.bfloat16)
    shift = torch.randn(n, d, device="cuda", requires_grad=True)  # float32
    scale = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dh = torch.randn(n, t, d, device="cuda", dtype=torch.bfloat16)
    if gated:
        y, gate = torch.randn_like(x), torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
        _, h = cuda_ops.gated_residual_adaln(x, y, gate, shift, scale)
    else:
        h = cuda_ops.adaln_modulate(x, shift, scale)
    (dshift,) = torch.autograd.grad(h, shift, dh)
    assert dshift.dtype == torch.float32
    # dh/dshift is 1 for every element, so dshift is the sum of dh over t, in float64 here
    want = dh.double().sum(1)
    err = (dshift.double() - want).abs().max() / want.abs().max()
    assert err < 1e-5, err  # a bf16 dshift would be off by about 4e-3
