"""Fused linear + weighted cross-entropy: loss, dh and dweight vs float64, calibrated against eager torch."""

import zlib

import pytest
import torch
import torch.nn.functional as F

from dblocks_fast.kernels import _utils
from dblocks_fast.kernels import linear_cross_entropy as lce
from dblocks_fast.kernels.linear_cross_entropy import weighted_linear_cross_entropy
from dblocks_fast.ops import weighted_linear_cross_entropy_ref
from tests.kerneltest import DTYPES, FLOOR, assert_calibrated, device

pytestmark = pytest.mark.kernel  # on the GPU, gpu_session.py runs these (its stage "triton")

# (leading shape of h, D, V, chunk, row weights): R = 1; D = 37; V not a power of two; chunk < R and not
# dividing it; a (3, 5, D) input; row weights with zeros, and None; a vocabulary of several blocks.
CASES = [
    ((1,), 37, 113, None, "rand"),
    ((13,), 37, 113, 5, "zeros"),
    ((3, 5), 16, 1000, 4, None),
    ((7,), 24, 1000, None, "rand"),
    ((6,), 16, 5000, 4, "rand"),  # V > 4096: two vocabulary blocks per row, the last one partial
]


def _floor(dtype):
    # Triton's interpreter (3.9) converts fp32 -> bf16 by truncation, ignoring the rounding mode, where GPUs
    # round to nearest even: one bf16 ulp (2^-7 relative to the largest element) more for the stored dlogits.
    if dtype == torch.bfloat16 and _utils.interpreting():
        return 2.0**-7
    return FLOOR[dtype]


def _inputs(lead, D, V, dtype, row_weight, seed, transposed_h=False, target_dtype=torch.long):
    g = torch.Generator().manual_seed(seed)
    if transposed_h:  # a (D, R) tensor seen as (R, D): rows are strided, not contiguous
        (R,) = lead
        h = torch.randn(D, R, generator=g).t()
    else:
        h = torch.randn(*lead, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D**0.5 * 2  # logits of std ~2: a peaked, realistic softmax
    target = torch.randint(0, V, lead, generator=g).reshape(-1)
    target[0], target[-1] = 0, V - 1  # both ends of the vocabulary
    target = target.reshape(lead).to(target_dtype)
    rw = None
    if row_weight is not None:
        rw = torch.rand(lead, generator=g) * 2
        if row_weight == "zeros":
            rw.view(-1)[::3] = 0
    dev = device()
    h = h.to(dev, dtype).requires_grad_()
    weight = weight.to(dev, dtype).requires_grad_()
    return h, weight, target.to(dev), None if rw is None else rw.to(dev)


def _ref64(h, weight, target, rw):
    """The torch reference (dblocks_fast.ops) on inputs upcast to float64."""
    return weighted_linear_cross_entropy_ref(
        h.double(), weight.double(), target, None if rw is None else rw.double()
    )


def _check(h, weight, target, rw, chunk, upstream=1.0):
    """Kernel vs float64 reference vs eager torch in the input dtype: loss, dh and dweight."""
    dtype = h.dtype
    loss = weighted_linear_cross_entropy(h, weight, target, rw, chunk)
    assert loss.dtype == torch.float32 and loss.shape == ()
    dh, dw = torch.autograd.grad(loss * upstream, (h, weight))

    h64, w64 = (t.detach().double().requires_grad_() for t in (h, weight))
    ref = _ref64(h64, w64, target, rw)
    dh64, dw64 = torch.autograd.grad(ref * upstream, (h64, w64))

    # Eager for the gradients: the same expression in the input dtype (logits, dlogits, dh and dweight all
    # rounded to it; cross_entropy upcasts half logits internally for its log-softmax).
    he, we = (t.detach().clone().requires_grad_() for t in (h, weight))
    eager = weighted_linear_cross_entropy_ref(he, we, target, rw)
    dhe, dwe = torch.autograd.grad(eager * upstream, (he, we))
    # Eager for the loss: torch's cross_entropy in fp32 on the input-dtype logits, which is what the op
    # promises. Eager's own half-precision loss ends in one more rounding that now and then lands next to the
    # reference by chance, which would leave no tolerance for the rounding of the logits both share.
    logits = (h.detach().reshape(-1, h.shape[-1]) @ weight.detach().t()).float()
    ce = F.cross_entropy(logits, target.reshape(-1).long(), reduction="none")
    eager_loss = (ce if rw is None else ce * rw.reshape(-1)).mean()

    assert_calibrated("loss", loss, ref.detach(), eager_loss)
    assert dh.dtype == dw.dtype == dtype
    assert_calibrated("dh", dh, dh64, dhe, floor=_floor(dtype))
    assert_calibrated("dweight", dw, dw64, dwe, floor=_floor(dtype))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-D{c[1]}-V{c[2]}-chunk{c[3]}-{c[4]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_float64_reference(case, dtype, poison_outputs):
    lead, D, V, chunk, rw = case
    h, weight, target, rw = _inputs(lead, D, V, dtype, rw, seed=zlib.crc32(repr((case, dtype)).encode()))
    _check(h, weight, target, rw, chunk)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_h_int32_target_and_upstream_grad(dtype, poison_outputs):
    h, weight, target, rw = _inputs(
        (11,), 20, 113, dtype, "rand", seed=zlib.crc32(str(dtype).encode()), transposed_h=True
    )
    assert not h.is_contiguous()
    _check(h, weight, target.int(), rw, chunk=4, upstream=-2.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_online_logsumexp_over_many_vocabulary_blocks(dtype, poison_outputs, monkeypatch):
    monkeypatch.setattr(lce, "_MAX_BLOCK_V", 128)  # V = 1000: 8 blocks, the last one holding 104
    h, weight, target, rw = _inputs((5,), 16, 1000, dtype, "rand", seed=zlib.crc32(str(dtype).encode()) + 1)
    _check(h, weight, target, rw, chunk=2)


def test_gradients_only_where_required(poison_outputs):
    h, weight, target, rw = _inputs((9,), 16, 113, torch.float32, "rand", seed=1)
    ref = _ref64(h.detach(), weight.detach(), target, rw)
    with torch.no_grad():
        loss = weighted_linear_cross_entropy(h, weight, target, rw, chunk=4)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)

    h_const = h.detach()
    weighted_linear_cross_entropy(h_const, weight, target, rw, chunk=4).backward()
    h64, w64 = h_const.double(), weight.detach().double().requires_grad_()
    weighted_linear_cross_entropy_ref(h64, w64, target, rw).backward()
    assert h_const.grad is None
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def _record_allocations(monkeypatch):
    """Wraps _utils.empty (poisoned or not) to record the shape of every tensor the launcher allocates."""
    shapes = []
    inner = _utils.empty

    def recording(shape, dtype, device):
        shapes.append(tuple(shape))
        return inner(shape, dtype, device)

    monkeypatch.setattr(_utils, "empty", recording)
    return shapes


def test_chunking_bounds_the_logits(poison_outputs, monkeypatch):
    R, D, V, chunk = 40, 8, 113, 6  # D < R so that dweight (V, D) and dh (R, D) are smaller than R x V too
    h, weight, target, rw = _inputs((R,), D, V, torch.float32, "rand", seed=2)
    shapes = _record_allocations(monkeypatch)
    _check(h, weight, target, rw, chunk)
    numels = [int(torch.Size(s).numel()) for s in shapes]
    assert (chunk, 128) in shapes, shapes  # V = 113 rows padded to 128 elements
    assert max(numels) < R * V, f"an allocation of {max(numels)} >= R * V = {R * V} elements: {shapes}"

    # The default chunk (here in multiples of 3 rows, at most 12): the largest that keeps the working memory
    # within PEAK_FRACTION of the (R, V) logits, and the launcher allocates that one buffer, rows padded
    monkeypatch.setattr(lce, "CHUNK_ROWS", 12)
    monkeypatch.setattr(lce, "CHUNK_MULTIPLE", 3)
    monkeypatch.setattr(lce, "PEAK_FRACTION", 0.25)
    want = lce.default_chunk(R, V, D, 4)
    bound = 0.25 * R * V * 4
    assert want == 6 and lce.working_bytes(6, R, V, D, 4) <= bound < lce.working_bytes(9, R, V, D, 4)
    shapes.clear()
    weighted_linear_cross_entropy(h, weight, target, rw).backward()
    assert (want, lce.padded(V)) in shapes and max(int(torch.Size(s).numel()) for s in shapes) < R * V, shapes

    shapes.clear()
    with torch.no_grad():  # no gradient buffers without grad mode
        weighted_linear_cross_entropy(h, weight, target, rw, chunk)
    assert (R, D) not in shapes and (V, D) not in shapes, shapes


def test_torch_compile_fullgraph_forward_and_backward(poison_outputs):
    h, weight, target, rw = _inputs((2, 5), 12, 113, torch.float32, "rand", seed=3)

    def fn(h, weight, target, rw):
        return 3.0 * weighted_linear_cross_entropy(h, weight, target, rw, chunk=4) + 1.0

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(h, weight, target, rw)
    dh, dw = torch.autograd.grad(out, (h, weight))
    want = fn(h, weight, target, rw)
    dh_want, dw_want = torch.autograd.grad(want, (h, weight))
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(dh, dh_want)
    torch.testing.assert_close(dw, dw_want)


def test_opcheck_fake_and_autograd_registration():
    h, weight, target, rw = _inputs((6,), 8, 113, torch.float32, "rand", seed=4)
    args = (h.reshape(-1, 8), weight, target, rw, 4, True, True, True)
    torch.library.opcheck(
        torch.ops.dblocks.weighted_linear_cross_entropy.default,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_out_of_range_target_without_check_gives_nan_not_a_crash(poison_outputs):
    h, weight, target, rw = _inputs((5,), 8, 113, torch.float32, None, seed=5)
    target[2] = 113
    loss = weighted_linear_cross_entropy(h, weight, target, check_targets=False)
    assert torch.isnan(loss)


def _bad_calls():
    h, w, t, rw = _inputs((4,), 8, 20, torch.float32, "rand", seed=6)
    return [
        ((h, w[:, :5], t), r"weight must have shape \(V, D\) with D = h.shape\[-1\] = 8"),
        ((h, w[0], t), r"weight must have shape \(V, D\)"),
        ((h, w.detach().half(), t), "h and weight must have one dtype"),
        ((h.detach().long(), w.detach().long(), t), "h must be float32, bfloat16 or float16"),
        ((h, w, t.float()), "target must hold integer class indices"),
        ((h, w, t[:3]), r"target must have h's leading shape \(4,\)"),
        ((h, w, t, rw[:3]), r"row_weight must have h's leading shape \(4,\)"),
        ((h, w, t, (rw > 0).long()), "row_weight must be a float tensor"),
        ((h[:0], w, t[:0]), "h has no rows"),
        ((h, w, t, None, 0), "chunk must be >= 1"),
        ((h, w, t.clone().fill_(20)), r"must lie in \[0, V\) = \[0, 20\), got min 20 and max 20"),
        ((h, w, torch.full_like(t, -1)), r"target values must lie in \[0, V\).*check_targets=False"),
        ((h.detach().to("meta"), w, t), "all inputs must be on one device"),
    ]


@pytest.mark.parametrize("i", range(13))
def test_input_errors_name_the_op_and_the_fix(i):
    args, match = _bad_calls()[i]
    with pytest.raises(ValueError, match=match) as info:
        weighted_linear_cross_entropy(*args)
    assert str(info.value).startswith("weighted_linear_cross_entropy: ")


@pytest.mark.parametrize("R, V, D", [(65536, 32000, 768), (65536, 50257, 768), (65536, 32000, 1152)])
def test_default_chunk_is_whole_gemm_tiles_within_an_eighth_of_the_logits(R, V, D):
    """At the benchmark's LM head and beside it: 2048-4096 rows, a multiple of 256, and the working memory
    (logits buffer, row losses, fp32 accumulator) at most 1/8 of the unfused head's bf16 logits."""
    chunk = lce.default_chunk(R, V, D, 2)
    assert 2048 <= chunk <= 4096 and chunk % 256 == 0, chunk
    assert lce.working_bytes(chunk, R, V, D, 2) <= R * V * 2 / 8
    assert lce.default_chunk(65536, 32000, 768, 2) == 4096
    # half the rows at D = 1152: the fp32 accumulator (147 MB) leaves room for 1536 rows within 262 MB
    assert lce.default_chunk(32768, 32000, 1152, 2) == 1536
    # few rows: the bound yields at 256 rows (the accumulator alone passes it), and never more than R rows
    assert lce.default_chunk(4096, 32000, 768, 2) == 256 and lce.default_chunk(100, 32000, 768, 2) == 100


def test_logits_rows_are_padded_to_64_elements_and_the_kernel_reads_them_at_that_stride(poison_outputs):
    # V = 1000: rows 1024 apart; a NaN-poisoned pad (the poison fixture) must never be read
    h, weight, target, rw = _inputs((7,), 16, 1000, torch.float32, "rand", seed=11)
    assert lce.padded(1000) == 1024 and lce.padded(50257) == 50304 and lce.padded(64) == 64
    _check(h, weight, target, rw, chunk=3)


def test_dweight_accumulates_in_fp32_from_the_gemm_where_torch_can(monkeypatch, poison_outputs):
    """Half inputs over several chunks: the fp32-output addmm where the device has it (probed once, never on
    the CPU), else each chunk's product rounded once and added in fp32; both match float64."""
    assert lce.fp32_addmm_available(torch.device("cpu")) is False
    calls = []
    real = torch.addmm

    def fp32_addmm(acc, a, b, *, beta, alpha, out_dtype, out):  # what CUDA's out_dtype addmm computes
        calls.append(out_dtype)
        out.copy_(real(acc, a.float(), b.float(), beta=beta, alpha=alpha))
        return out

    h, weight, target, rw = _inputs((10,), 16, 200, torch.bfloat16, "rand", seed=12)
    _check(h, weight, target, rw, chunk=3)
    monkeypatch.setitem(lce._FP32_ADDMM, h.device, True)
    monkeypatch.setattr(torch, "addmm", fp32_addmm)
    _check(h, weight, target, rw, chunk=3)
    assert calls == [torch.float32] * 4  # one a chunk: rows 0-2, 3-5, 6-8, 9


def test_target_check_on_cuda_needs_no_host_sync(monkeypatch):
    """The device-side check: no .tolist()/.item() (each a host sync, and not capturable in a CUDA graph)."""
    target = torch.tensor([0, 5, 19])

    class Cuda:
        type = "cuda"

    class T(torch.Tensor):
        pass

    t = target.as_subclass(T)
    monkeypatch.setattr(T, "device", property(lambda self: Cuda()))

    def no_sync(*a, **k):
        raise AssertionError("a host sync")

    monkeypatch.setattr(torch.Tensor, "tolist", no_sync)
    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    lce._check_targets(t, 20)
    with pytest.raises(RuntimeError, match=r"target values must lie in \[0, V\) = \[0, 19\)"):
        lce._check_targets(t, 19)  # on the CPU _assert_async raises at once; on CUDA at the next sync


@pytest.mark.gpu
def test_gpu_vocabulary_32k_within_the_memory_bound():
    """bf16 at V = 32k against eager; the op's peak extra memory stays far below the R x V logits."""
    R, D, V, chunk = 8192, 256, 32768, 256
    h, weight, target, rw = _inputs((R,), D, V, torch.bfloat16, "rand", seed=7)
    weighted_linear_cross_entropy(
        h, weight, target, rw, chunk
    ).backward()  # warm-up: compile, cuBLAS workspace
    h.grad = weight.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = weighted_linear_cross_entropy(h, weight, target, rw, chunk)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # Expected: the (chunk, V) logits, dh, dweight and its fp32 accumulator (~68 MiB); all logits: 512 MiB.
    logits_bytes = R * V * 2
    assert extra < logits_bytes / 4, (
        f"peak extra {extra / 2**20:.0f} MiB, all logits {logits_bytes / 2**20:.0f} MiB"
    )
    del loss
    _check(h, weight, target, rw, chunk)
