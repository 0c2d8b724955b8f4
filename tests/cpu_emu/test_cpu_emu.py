"""Every entry point of csrc/include/dblocks/ops.h, run by the CPU emulator, against float64 references.

The library is the one DBLOCKS_EMU_LIB names (`python -m tests.cpu_emu` builds the variants: plain, small
grid caps, ASan+UBSan, race check, and runs this file on each). Shapes sit at the kernels' boundaries: odd
sizes (the scalar path), every vector width, the edges of the row caches (kFwdMaxVecs, kBwdMaxVecs), the
backward's shared-memory opt-in, the loss's 4096-element chunks, misaligned pointers. Tensors are torch CPU
tensors: the emulator's "device memory" is host memory. Tolerances: the rounding of the output dtype plus
float32 arithmetic on the magnitudes involved (each check says which).
"""

import os

import pytest
import torch

from tests.cpu_emu import emu

LIB_PATH = os.environ.get("DBLOCKS_EMU_LIB", "")
QUICK = os.environ.get("DBLOCKS_EMU_QUICK") == "1"
CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ULP = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # half an ulp, relative
TINY = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}  # subnormal spacing
FP32 = 2.0**-24
DTYPES = list(CODES)


@pytest.fixture(scope="module")
def lib():
    if not LIB_PATH:
        pytest.fail("set DBLOCKS_EMU_LIB to an emulated build (python -m tests.cpu_emu does)")
    return emu.load(LIB_PATH)


@pytest.fixture(autouse=True)
def _forward_schedule(lib):
    schedule = {"forward": 0, "reverse": 1, "random": 2}[os.environ.get("DBLOCKS_EMU_SCHEDULE", "forward")]
    lib.dblocks_emu_set_schedule(schedule, 0)


def ptr(t):
    return None if t is None else t.data_ptr()


def rand(*shape, dtype=torch.float32, scale=1.0, offset=0.0, gen=None):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)


def misaligned(t):
    """A copy of t whose data starts 2 bytes (one half element) or 4 bytes past a 16-byte boundary."""
    step = 1
    buf = torch.empty(t.numel() + step, dtype=t.dtype)
    out = buf[step:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


def close(name, out, ref, bound, dtype, factor=8.0):
    """|out - ref| <= ulp(dtype) |ref| + factor * eps32 * bound, elementwise (bound: float64 magnitudes of the
    terms summed in float32)."""
    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape, (name, out.shape, ref.shape)
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    tol = 2 * ULP[dtype] * ref.abs() + factor * FP32 * bound + TINY[dtype]
    err = (out - ref).abs()
    worst = (err / tol).argmax()
    assert (err <= tol).all(), (
        f"{name}: error {err.flatten()[worst]:.3g} > tolerance {tol.flatten()[worst]:.3g} at {int(worst)}"
    )


# ---------------------------------------------------------------------------------------------------------
# Version, status texts


def test_version_and_status_texts(lib):
    assert lib.dblocks_version() == 100
    assert lib.dblocks_cuda_runtime_version() >= 13000
    assert lib.dblocks_error_string(0) == b"no error"
    assert lib.dblocks_error_string(1) == b"invalid argument"
    assert lib.dblocks_error_string(2) == b"CUDA error"
    assert lib.dblocks_error_string(7) == b"unknown error code"


# ---------------------------------------------------------------------------------------------------------
# EDM coefficients


def coefficients64(sigma, sd):
    s = sigma.double()
    total = s * s + sd * sd
    return [sd * sd / total, s * sd / total.sqrt(), 1 / total.sqrt(), 0.25 * s.log(), total / (s * sd) ** 2]


@pytest.mark.parametrize("n", [1, 7, 257, 1029])
def test_edm_coefficients(lib, n):
    sigma = torch.exp(rand(n, scale=1.5, offset=-1.0))
    sd = 0.5
    outs = [torch.full((n,), float("nan")) for _ in range(5)]
    assert lib.dblocks_edm_coefficients_f32(ptr(sigma), n, sd, *map(ptr, outs), None) == 0
    refs = coefficients64(sigma, torch.tensor(sd, dtype=torch.float64).float().double())
    for name, out, ref in zip(["c_skip", "c_out", "c_in", "c_noise", "weight"], outs, refs):
        close(name, out, ref, ref.abs(), torch.float32, factor=2)
    # in place over sigma, one output skipped
    expected = refs[1].float()
    c_in = torch.empty(n)
    assert (
        lib.dblocks_edm_coefficients_f32(ptr(sigma), n, sd, None, ptr(sigma), ptr(c_in), None, None, None)
        == 0
    )
    assert torch.equal(sigma, expected)
    assert lib.dblocks_edm_coefficients_f32(ptr(sigma), -1, sd, None, None, None, None, None, None) == 1


# ---------------------------------------------------------------------------------------------------------
# AdaLN

# (N, T, D): D odd (scalar path); D at and beyond each forward row-cache bucket of fp32 (V=4: 128 columns a
# vector column) and of half types (V=8); D beyond the backward's cached 8 vectors; D whose gated backward
# needs more than 48 KiB of shared memory (the opt-in); T = 1, T giving ragged backward chunks.
ADALN_SHAPES = [
    (1, 1, 37),
    (3, 5, 113),
    (2, 9, 128),
    (2, 3, 264),
    (1, 6, 1024),
    (1, 3, 1032),
    (2, 2, 2048),
    (1, 2, 3080),
    (1, 2, 4104),
]
if not QUICK:
    ADALN_SHAPES += [(4, 33, 8), (1, 41, 64), (1, 2, 8200), (1, 1, 4100)]


def adaln_inputs(N, T, D, dtype, mod_dtype, gated, gen):
    x = rand(N, T, D, dtype=dtype, scale=1.5, offset=0.3, gen=gen)
    y = rand(N, T, D, dtype=dtype, gen=gen) if gated else None
    mods = rand(N, 3 * D + 5, dtype=mod_dtype, scale=0.5, gen=gen)  # chunks of one modulation vector
    gate, shift, scale = mods[:, :D], mods[:, D : 2 * D], mods[:, 2 * D : 3 * D]
    return x, y, gate, shift, scale, mods.stride(0)


def adaln_forward(lib, x, y, gate, shift, scale, mod_stride, dtype, mod_dtype, eps=1e-6):
    N, T, D = x.shape
    h = torch.full_like(x, float("nan"))
    x_new = torch.full_like(x, float("nan")) if y is not None else None
    mean, rstd = torch.full((N * T,), float("nan")), torch.full((N * T,), float("nan"))
    rc = lib.dblocks_adaln_forward(
        ptr(x), ptr(y), ptr(gate), ptr(shift), ptr(scale), ptr(x_new), ptr(h), ptr(mean), ptr(rstd),
        N, T, D, mod_stride, CODES[dtype], CODES[mod_dtype], eps, None,
    )  # fmt: skip
    assert rc == 0, lib.dblocks_last_cuda_error()
    return x_new, h, mean, rstd


def adaln_backward(lib, dh, dx_new, x, y, gate, scale, mean, rstd, mod_stride, dtype, mod_dtype):
    N, T, D = x.shape
    gated = y is not None
    nan = float("nan")
    dx = torch.full_like(x, nan)
    dy = torch.full_like(x, nan) if gated else None
    dshift, dscale = torch.full((N, D), nan, dtype=mod_dtype), torch.full((N, D), nan, dtype=mod_dtype)
    dgate = torch.full((N, D), nan, dtype=mod_dtype) if gated else None
    ws = lib.dblocks_adaln_backward_workspace(N, T, D, int(gated))
    assert ws > 0
    workspace = torch.full((ws,), nan)
    rc = lib.dblocks_adaln_backward(
        ptr(dh), ptr(dx_new), ptr(x), ptr(y), ptr(gate), ptr(scale), ptr(mean), ptr(rstd), ptr(dx), ptr(dy),
        ptr(dshift), ptr(dscale), ptr(dgate), ptr(workspace), N, T, D, mod_stride, CODES[dtype],
        CODES[mod_dtype], None,
    )  # fmt: skip
    assert rc == 0, lib.dblocks_last_cuda_error()
    return dx, dy, dshift, dscale, dgate


def mod_dtypes(dtype):
    return [dtype] if dtype == torch.float32 else [dtype, torch.float32]


@pytest.mark.parametrize("shape", ADALN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_adaln_forward_backward(lib, shape, dtype, gated):
    N, T, D = shape
    gen = torch.Generator().manual_seed(hash((shape, str(dtype), gated)) % 2**31)
    for mod_dtype in mod_dtypes(dtype)[: 1 if QUICK else 2]:
        x, y, gate, shift, scale, ms = adaln_inputs(N, T, D, dtype, mod_dtype, gated, gen)
        x_new, h, mean, rstd = adaln_forward(lib, x, y, gate, shift, scale, ms, dtype, mod_dtype)
        g64, sh64, sc64 = (m.double()[:, None] for m in (gate, shift, scale))
        if gated:  # x + gate * y in float32, rounded once to dtype
            ref_xn = (x.float() + gate.float()[:, None] * y.float()).to(dtype)
            bound = (x.double().abs() + (g64 * y.double()).abs()) * 4
            close("x_new", x_new, x.double() + g64 * y.double(), bound, dtype)
            assert (x_new.double() - ref_xn.double()).abs().max() <= 2 * ULP[
                dtype
            ] * ref_xn.double().abs().max()
        xs = (x_new if gated else x).double()  # statistics of the stored row, as the backward sees it
        mu = xs.mean(-1, keepdim=True)
        var = ((xs - mu) ** 2).mean(-1, keepdim=True)
        r = 1 / (var + 1e-6).sqrt()
        xhat = (xs - mu) * r
        ref_h = xhat * (1 + sc64) + sh64
        bound_h = (xs.abs() + mu.abs()) * r * (1 + sc64.abs()) * 4 + sh64.abs()
        close("mean", mean, mu.flatten(), xs.abs().mean(-1).flatten() * D**0.5, torch.float32)
        close("rstd", rstd, r.flatten(), r.flatten() * 8, torch.float32)
        close("h", h, ref_h, bound_h * 4, dtype)

        # backward from the forward's own outputs
        dh = rand(N, T, D, dtype=dtype, gen=gen)
        dx_new = rand(N, T, D, dtype=dtype, gen=gen) if gated else None
        dx, dy, dshift, dscale, dgate = adaln_backward(
            lib, dh, dx_new, x_new if gated else x, y, gate, scale, mean, rstd, ms, dtype, mod_dtype
        )
        d = dh.double()
        mu_k, r_k = mean.double().view(N, T, 1), rstd.double().view(N, T, 1)
        xhat = (xs - mu_k) * r_k
        g = d * (1 + sc64)
        mg, mgx = g.mean(-1, keepdim=True), (g * xhat).mean(-1, keepdim=True)
        ref_dx = r_k * (g - mg - xhat * mgx)
        bound_dx = r_k * (
            g.abs() + g.abs().mean(-1, keepdim=True) + xhat.abs() * (g * xhat).abs().mean(-1, keepdim=True)
        )
        if gated:
            ref_dx = ref_dx + dx_new.double()
            bound_dx = bound_dx + dx_new.double().abs()
        close("dx", dx, ref_dx, bound_dx * 16, dtype)
        close("dshift", dshift, d.sum(1), d.abs().sum(1) * 4, mod_dtype)
        close(
            "dscale", dscale, (d * xhat).sum(1), (d * xhat).abs().sum(1) * 16 + d.abs().sum(1) * 4, mod_dtype
        )
        if gated:
            close("dy", dy, ref_dx * g64, bound_dx * 16 * g64.abs(), dtype)
            ref_dgate = (ref_dx * y.double()).sum(1)
            close("dgate", dgate, ref_dgate, (bound_dx * 16 * y.double().abs()).sum(1), mod_dtype)


def test_adaln_misaligned_and_invalid(lib):
    """Misaligned pointers take the scalar path; bad arguments are refused before any launch."""
    N, T, D = 2, 3, 64
    for dtype in DTYPES:
        x, y, gate, shift, scale, ms = adaln_inputs(
            N, T, D, dtype, dtype, True, torch.Generator().manual_seed(1)
        )
        _, h_aligned, *_ = adaln_forward(lib, x, y, gate, shift, scale, ms, dtype, dtype)
        _, h_mis, *_ = adaln_forward(lib, misaligned(x), misaligned(y), gate, shift, scale, ms, dtype, dtype)
        close("h misaligned", h_mis, h_aligned.double(), h_aligned.double().abs() * 64, dtype)
    h = torch.empty(N, T, D)
    args = [ptr(x.float()), None, None, ptr(shift.float()), ptr(scale.float()), None, ptr(h), None, None]
    assert lib.dblocks_adaln_forward(*args, N, T, D, D - 1, 0, 0, 1e-6, None) == 1  # mod_stride < D
    assert lib.dblocks_adaln_forward(*args, N, T, D, D, 0, 1, 1e-6, None) == 1  # fp32 x with bf16 mods
    assert lib.dblocks_adaln_forward(*args, N, T, D, D, 0, 0, 0.0, None) == 1  # eps
    assert lib.dblocks_adaln_backward_workspace(0, T, D, 0) == 0


# ---------------------------------------------------------------------------------------------------------
# EDM loss

# (N, M): odd M (scalar path), M a multiple of 4 but not 8, the 4096-element chunk edges, several samples.
LOSS_SHAPES = [(1, 1), (3, 37), (2, 64), (5, 12), (2, 4096), (3, 4097), (1, 8200)]
if not QUICK:
    LOSS_SHAPES += [(7, 100), (2, 12289)]


def loss64(z, f, y, sigma, sd):
    c_skip, c_out, _, _, w = coefficients64(sigma, sd)
    D = c_skip[:, None] * z.double() + c_out[:, None] * f.double()
    e = D - y.double()
    M = z.shape[1]
    return w * (e * e).mean(1), e, w, c_skip, c_out, M


@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_edm_loss_forward_backward(lib, shape, dtype):
    N, M = shape
    gen = torch.Generator().manual_seed(N * 100003 + M)
    sd = 0.5
    z, f, y = (rand(N, M, dtype=dtype, gen=gen) for _ in range(3))
    sigma = torch.exp(rand(N, scale=1.2, offset=-1.2, gen=gen))
    per_sample, loss = torch.full((N,), float("nan")), torch.full((1,), float("nan"))
    r = torch.full((N, M), float("nan"))
    workspace = torch.full((lib.dblocks_edm_l2_loss_workspace(N, M),), float("nan"))
    rc = lib.dblocks_edm_l2_loss_forward(
        ptr(z), ptr(f), ptr(y), ptr(sigma), ptr(per_sample), ptr(loss), ptr(r), ptr(workspace), N, M, sd,
        CODES[dtype], None,
    )  # fmt: skip
    assert rc == 0
    ref_per, e, w, c_skip, c_out, _ = loss64(z, f, y, sigma, sd)
    bound_e = (
        c_skip[:, None] * (z.double().abs() + y.double().abs())
        + c_out[:, None] * f.double().abs()
        + y.double().abs()
    )
    close("per_sample", per_sample, ref_per, w * (2 * e.abs() * bound_e).mean(1) * 8, torch.float32)
    close(
        "loss",
        loss,
        ref_per.mean().view(1),
        (w * (2 * e.abs() * bound_e).mean(1)).mean().view(1) * 8,
        torch.float32,
    )
    ref_r = 2 * w[:, None] * e / M
    close("r", r, ref_r, 2 * w[:, None] * bound_e / M * 4, torch.float32)

    g_loss = torch.tensor([0.7])
    g_per = rand(N, 2, gen=gen)[:, :1]  # a strided column
    dz, df, dyy = (torch.full((N, M), float("nan"), dtype=dtype) for _ in range(3))
    rc = lib.dblocks_edm_l2_loss_backward(
        ptr(r), ptr(sigma), ptr(g_loss), ptr(g_per), g_per.stride(0), ptr(dz), ptr(df), ptr(dyy), N, M, sd,
        CODES[dtype], None,
    )  # fmt: skip
    assert rc == 0
    coef = 0.7 / N + g_per.double().flatten()
    dD = coef[:, None] * r.double()
    bound = (0.7 / N + g_per.double().abs().flatten())[:, None] * r.double().abs() * 4
    close("dz", dz, c_skip[:, None] * dD, c_skip[:, None] * bound, dtype)
    close("df", df, c_out[:, None] * dD, c_out[:, None] * bound, dtype)
    close("dy", dyy, -dD, bound, dtype)
    # all gradients NULL: nothing to do; one of them alone
    assert (
        lib.dblocks_edm_l2_loss_backward(
            ptr(r), ptr(sigma), None, None, 0, None, None, None, N, M, sd, 0, None
        )
        == 0
    )
    dz2 = torch.full((N, M), float("nan"), dtype=dtype)
    rc = lib.dblocks_edm_l2_loss_backward(
        ptr(r),
        ptr(sigma),
        ptr(g_loss),
        ptr(g_per),
        g_per.stride(0),
        ptr(dz2),
        None,
        None,
        N,
        M,
        sd,
        CODES[dtype],
        None,
    )
    assert rc == 0 and torch.equal(dz2, dz)


# ---------------------------------------------------------------------------------------------------------
# AdamW


def adamw64(p, g, m, v, lr, b1, b2, eps, wd, step, scale):
    p, g, m, v = p.double(), g.double() / scale, m.double(), v.double()
    p = p * (1 - lr * wd)
    m = m + (1 - b1) * (g - m)
    v = b2 * v + (1 - b2) * g * g
    denom = v.sqrt() / (1 - b2**step) ** 0.5 + eps
    return p - lr / (1 - b1**step) * m / denom, m, v


@pytest.mark.parametrize("n", [1, 3, 1024, 2053, 4099])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
def test_fused_adamw(lib, n, aligned):
    gen = torch.Generator().manual_seed(n)
    p, g, m = (rand(n, gen=gen) for _ in range(3))
    v = rand(n, gen=gen).abs()
    if not aligned:
        p, g, m, v = map(misaligned, (p, g, m, v))
    lr, b1, b2, eps, wd, step = 1e-3, 0.9, 0.999, 1e-8, 0.01, 7
    scale = torch.tensor([4.0])
    ref_p, ref_m, ref_v = adamw64(p, g, m, v, lr, b1, b2, eps, wd, step, 4.0)
    p_bf16 = torch.full((n,), float("nan"), dtype=torch.bfloat16)
    found_inf = torch.zeros(1)
    before = p.clone()

    def step_once():  # one step over the buffers above, with a bf16 copy of the parameters
        args = (ptr(p), ptr(g), ptr(m), ptr(v), ptr(p_bf16), n, lr, b1, b2, eps, wd, step)
        return lib.dblocks_fused_adamw_f32(*args, ptr(scale), ptr(found_inf), None)

    rc = step_once()
    assert rc == 0
    close("exp_avg", m, ref_m, ref_m.abs() + g.double().abs() / 4, torch.float32)
    close("exp_avg_sq", v, ref_v, ref_v.abs() * 4, torch.float32)
    close(
        "param",
        p,
        ref_p,
        before.double().abs() + lr * (ref_m.abs() / (ref_v.sqrt() + eps)) * 64,
        torch.float32,
    )
    assert torch.equal(p_bf16, p.to(torch.bfloat16))
    # the mixed-precision skip changes nothing
    found_inf.fill_(1.0)
    state = [t.clone() for t in (p, m, v, p_bf16)]
    rc = step_once()
    assert rc == 0 and all(torch.equal(a, b) for a, b in zip(state, (p, m, v, p_bf16)))
    assert (
        lib.dblocks_fused_adamw_f32(
            ptr(p), ptr(g), ptr(m), ptr(v), None, n, lr, 1.0, b2, eps, wd, 1, None, None, None
        )
        == 1
    )


# ---------------------------------------------------------------------------------------------------------
# Schedules: the order of threads and blocks must not change a single bit


def run_all_ops(lib, dtype):
    """Outputs of every kernel on shapes where blocks share work (backward chunks, loss chunks), as bytes."""
    gen = torch.Generator().manual_seed(5)
    outs = []
    for (N, T, D), gated in [((2, 9, 264), True), ((1, 17, 37), False)]:
        x, y, gate, shift, scale, ms = adaln_inputs(N, T, D, dtype, dtype, gated, gen)
        x_new, h, mean, rstd = adaln_forward(lib, x, y, gate, shift, scale, ms, dtype, dtype)
        dh = rand(N, T, D, dtype=dtype, gen=gen)
        outs += [x_new, h, mean, rstd]
        outs += adaln_backward(
            lib, dh, None, x_new if gated else x, y, gate, scale, mean, rstd, ms, dtype, dtype
        )
    N, M = 3, 4100
    z, f, yy = (rand(N, M, dtype=dtype, gen=gen) for _ in range(3))
    sigma = torch.exp(rand(N, gen=gen))
    per, loss, r = torch.empty(N), torch.empty(1), torch.empty(N, M)
    ws = torch.empty(lib.dblocks_edm_l2_loss_workspace(N, M))
    assert (
        lib.dblocks_edm_l2_loss_forward(
            ptr(z),
            ptr(f),
            ptr(yy),
            ptr(sigma),
            ptr(per),
            ptr(loss),
            ptr(r),
            ptr(ws),
            N,
            M,
            0.5,
            CODES[dtype],
            None,
        )
        == 0
    )
    outs += [per, loss, r]
    p, g, m, v = (rand(2053, gen=gen) for _ in range(4))
    v = v.abs()
    assert (
        lib.dblocks_fused_adamw_f32(
            ptr(p), ptr(g), ptr(m), ptr(v), None, 2053, 1e-3, 0.9, 0.999, 1e-8, 0.0, 3, None, None, None
        )
        == 0
    )
    outs += [p, m, v]
    return [None if t is None else t.view(torch.uint8).clone() if t.dim() else t.clone() for t in outs]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_schedules_bit_identical(lib, dtype):
    results = {}
    for name, schedule, seed in [("forward", 0, 0), ("reverse", 1, 0), ("random", 2, 1), ("random2", 2, 2)]:
        lib.dblocks_emu_set_schedule(schedule, seed)
        results[name] = run_all_ops(lib, dtype)
    for name, outs in results.items():
        for i, (a, b) in enumerate(zip(results["forward"], outs)):
            assert (a is None) == (b is None)
            assert a is None or torch.equal(a, b), (
                f"output {i} differs between the forward and {name} schedules"
            )
