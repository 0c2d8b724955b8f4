"""dblocks_fast.optim: the flat-buffer AdamW is torch.optim.AdamW's update, bit for bit on the CPU.

The GPU tests compare the fused CUDA kernel (and torch's fused kernel on the flat buffer) with
torch.optim.AdamW to float32 rounding; they run with `pytest -m gpu` on a machine with CUDA.
"""

import math

import pytest
import torch

from dblocks_fast import _C_loader, ops, optim

SHAPES = [(7, 3), (33,), (1,), (5, 13, 2), (1001,)]  # odd sizes: vector bodies and scalar tails both run


def make_params(seed, device="cpu", shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device).requires_grad_() for s in shapes]


def clone(params):
    return [p.detach().clone().requires_grad_() for p in params]


def grads_for(step, params, seed=0):
    g = torch.Generator().manual_seed(1000 * seed + step)
    # magnitudes from 1e-3 to 1e2, so the moments and the bias corrections cover a wide range
    return [torch.randn(p.shape, generator=g).to(p.device) * 10.0 ** (step % 6 - 3) for p in params]


def run(opt, params, steps, lr0=1e-3, clip=None, seed=0):
    for step in range(1, steps + 1):
        for p, g in zip(params, grads_for(step, params, seed)):
            p.grad = g
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.param_groups[0]["lr"] = lr0 * (1 + math.cos(step)) + 1e-5  # changes every step
        opt.step()
        opt.zero_grad(set_to_none=True)


def assert_same_state(ours, params, ref_opt, ref_params, exact=True, rtol=0.0, atol=0.0):
    for p, q in zip(params, ref_params):
        a, b = ours.state[p], ref_opt.state[q]
        for x, y in ((p, q), (a["exp_avg"], b["exp_avg"]), (a["exp_avg_sq"], b["exp_avg_sq"])):
            if exact:
                assert torch.equal(x.detach(), y.detach())
            else:
                torch.testing.assert_close(x.detach(), y.detach(), rtol=rtol, atol=atol)
        assert float(a["step"]) == float(b["step"])


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.95)])
def test_bit_exact_with_torch_adamw_over_100_steps(weight_decay, betas):
    params = make_params(1)
    ref_params = clone(params)
    ours = optim.AdamW(params, lr=1e-3, betas=betas, weight_decay=weight_decay)
    ref = torch.optim.AdamW(ref_params, lr=1e-3, betas=betas, weight_decay=weight_decay, foreach=False)
    run(ours, params, 100, clip=1.0)
    run(ref, ref_params, 100, clip=1.0)
    assert_same_state(ours, params, ref, ref_params)


def test_packing_lays_the_block_out_flat_and_keeps_values():
    params = make_params(2)
    before = [p.detach().clone() for p in params]
    opt = optim.AdamW(params)
    param, exp_avg, exp_avg_sq = opt.flat()
    n = sum(p.numel() for p in params)
    assert param.numel() == exp_avg.numel() == exp_avg_sq.numel() == n
    # one buffer [param | exp_avg | exp_avg_sq], the layout paging uses; each part 16-byte aligned, so the
    # fused kernel's vector path runs whatever n is (n here is odd: the parts are 4 * ceil(n / 4) apart)
    stride = -(-n // 4) * 4
    assert n % 4 != 0 and optim.part_stride(n) == stride == opt.stride
    assert (
        exp_avg.data_ptr() == param.data_ptr() + 4 * stride
        and exp_avg_sq.data_ptr() == param.data_ptr() + 8 * stride
    )
    assert all(t.data_ptr() % 16 == 0 for t in (param, exp_avg, exp_avg_sq))
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    assert torch.equal(param, torch.cat([b.reshape(-1) for b in before]))
    assert not exp_avg.any() and not exp_avg_sq.any()


def test_rebound_to_another_buffer_steps_there():
    """Paging re-points the parameters and moments at its own buffer: the step must update that buffer."""
    params = make_params(3)
    ref_params = clone(params)
    ours = optim.AdamW(params, weight_decay=0.01)
    ref = torch.optim.AdamW(ref_params, weight_decay=0.01, foreach=False)
    run(ours, params, 3)
    run(ref, ref_params, 3)
    n = ours.numel
    other = torch.cat([t.reshape(-1) for t in ours.flat()]).clone()  # a copy, unpadded: any flat layout works
    offset = 0
    for p in params:
        k = p.numel()
        p.data = other[offset : offset + k].view(p.shape)
        ours.state[p]["exp_avg"] = other[n + offset : n + offset + k].view(p.shape)
        ours.state[p]["exp_avg_sq"] = other[2 * n + offset : 2 * n + offset + k].view(p.shape)
        offset += k
    assert ours.flat()[0].data_ptr() == other.data_ptr()
    run(ours, params, 4)
    run(ref, ref_params, 4)
    assert_same_state(ours, params, ref, ref_params)


def test_not_flat_or_partial_gradients_fall_back_to_the_same_update():
    params = make_params(4)
    ref_params = clone(params)
    ours = optim.AdamW(params, pack=False)
    ref = torch.optim.AdamW(ref_params, foreach=False)
    assert ours.flat() is None  # separate tensors
    run(ours, params, 5)
    run(ref, ref_params, 5)
    assert_same_state(ours, params, ref, ref_params)
    # a parameter without a gradient is left alone, its step not counted, as torch.optim.AdamW does
    packed = optim.AdamW(make_params(4))
    packed_ref = torch.optim.AdamW(clone(list(packed.params)), foreach=False)
    for opt in (packed, packed_ref):
        ps = opt.param_groups[0]["params"]
        for p, g in zip(ps, grads_for(1, ps)):
            p.grad = g
        ps[1].grad = None
        opt.step()
    packed_ref.state[packed_ref.param_groups[0]["params"][1]].update(
        step=torch.tensor(0.0),
        exp_avg=torch.zeros(SHAPES[1]),
        exp_avg_sq=torch.zeros(SHAPES[1]),
    )  # torch keeps no state for a parameter never stepped; ours holds zeros
    assert_same_state(packed, packed.params, packed_ref, packed_ref.param_groups[0]["params"])


def test_state_dict_round_trip_keeps_the_flat_layout():
    params = make_params(5)
    opt = optim.AdamW(params, weight_decay=0.05)
    run(opt, params, 4)
    saved = opt.state_dict()
    params2 = clone(params)
    opt2 = optim.AdamW(params2, weight_decay=0.05)
    opt2.load_state_dict(saved)
    assert opt2.flat() is not None
    run(opt, params, 3, seed=1)
    run(opt2, params2, 3, seed=1)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)


def test_grad_scale_found_inf_and_bf16_copy():
    params = make_params(6)
    ref_params = clone(params)
    ours = optim.AdamW(params, bf16_copy=True)
    ref = torch.optim.AdamW(ref_params, foreach=False)
    scale = torch.tensor(1024.0)
    for step in range(1, 4):
        gs = grads_for(step, params)
        for p, q, g in zip(params, ref_params, gs):
            p.grad, q.grad = g * 1024.0, g
        ours.step(grad_scale=scale)
        ref.step()
    # division by a power of two is exact: the same bits as the unscaled gradients
    assert_same_state(ours, params, ref, ref_params)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    ours.step(found_inf=torch.tensor(1.0))
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    assert float(ours.state[params[0]]["step"]) == 3  # the skipped step does not count
    torch.testing.assert_close(ours.param_bf16, ours.flat()[0].to(torch.bfloat16), rtol=0, atol=0)


def test_reference_function_matches_torch_on_one_tensor():
    p = torch.randn(257)
    q = p.clone().requires_grad_()
    m, v = torch.zeros(257), torch.zeros(257)
    ref = torch.optim.AdamW([q], lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.2, foreach=False)
    for step in range(1, 20):
        g = torch.randn(257)
        q.grad = g.clone()
        ref.step()
        ops.adamw_ref_(p, g, m, v, lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.2, step=step)
    assert torch.equal(p, q.detach()) and torch.equal(m, ref.state[q]["exp_avg"])


def test_backend_choice_and_bad_input():
    cpu = torch.device("cpu")
    # on the CPU "auto" and "torch" both run the reference, never torch's fused kernel (last bit differs)
    assert ops.select("adamw_", "auto", cpu) is ops.select("adamw_", "torch", cpu)
    p, g = torch.randn(37), torch.randn(37)
    want = [p.clone(), torch.zeros(37), torch.zeros(37)]
    got = [p.clone(), torch.zeros(37), torch.zeros(37)]
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=1)
    ops.adamw_ref_(want[0], g, want[1], want[2], **hp)
    ops.adamw_(got[0], g, got[1], got[2], **hp, kernels="auto")
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        ops.select("adamw_", "cuda", cpu)
    with pytest.raises(RuntimeError, match="no triton implementation"):
        ops.select("adamw_", "triton", cpu)
    with pytest.raises(ValueError, match="kernels must be one of"):
        optim.AdamW(make_params(0), kernels="fast")
    with pytest.warns(DeprecationWarning, match="kernels='torch'"):
        assert optim.AdamW(make_params(0), backend="reference").kernels == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        optim.AdamW(make_params(0), backend="fast")
    with pytest.raises(ValueError, match="float32 parameters on one device"):
        optim.AdamW([torch.zeros(3, dtype=torch.float64, requires_grad=True)])
    with pytest.raises(ValueError, match="betas"):
        optim.AdamW(make_params(0), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.AdamW([])
    with pytest.raises(ValueError, match="one parameter group"):
        optim.AdamW([{"params": make_params(0)}, {"params": make_params(1)}])


def test_trainer_gives_the_bits_of_torch_adamw(tiny_task, digits, tiny_config, monkeypatch):
    """Swapping torch.optim.AdamW for the flat AdamW in the trainer changes no bit of a run."""
    from dblocks_fast import checkpoint
    from dblocks_fast.train import Trainer

    def fit():
        trainer = Trainer(tiny_task, digits, tiny_config(weight_decay=0.01))
        trainer.fit()
        return trainer, {
            f"{b}/{k}": v
            for b, (blk, opt) in enumerate(zip(trainer.model.blocks, trainer.optimizers))
            for k, v in checkpoint.block_state(blk, opt).items()
        }

    ours, flat_state = fit()
    assert all(isinstance(o, optim.AdamW) and o.flat() is not None for o in ours.optimizers)
    cfg = ours.config
    monkeypatch.setattr(
        Trainer,
        "_optimizer",
        lambda self, block: torch.optim.AdamW(
            block.parameters(),
            lr=cfg.optimizer.lr,
            betas=(cfg.optimizer.beta1, cfg.optimizer.beta2),
            weight_decay=cfg.optimizer.weight_decay,
        ),
    )
    _, torch_state = fit()
    assert flat_state.keys() == torch_state.keys()
    for k in flat_state:
        assert torch.equal(flat_state[k], torch_state[k]), k


# --- GPU ----------------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_fused_matches_torch_adamw_on_gpu_over_100_steps(backend):
    if backend == "cuda" and _C_loader.load() is None:
        pytest.fail(f"dblocks_fast._C is not built: {_C_loader.why_unavailable()}")
    params = make_params(7, "cuda")
    ref_params = clone(params)
    ours = optim.AdamW(params, weight_decay=0.1, kernels=backend)
    ref = torch.optim.AdamW(ref_params, weight_decay=0.1, foreach=False)
    run(ours, params, 100, clip=1.0)
    run(ref, ref_params, 100, clip=1.0)
    # fp32 rounding per step (FMA contraction), compounded over 100 steps of lr ~1e-3 updates
    assert_same_state(ours, params, ref, ref_params, exact=False, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
def test_cuda_kernel_grad_scale_found_inf_bf16_copy_and_alignment():
    if _C_loader.load() is None:
        pytest.fail(f"dblocks_fast._C is not built: {_C_loader.why_unavailable()}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, offset in [(1, 0), (4099, 0), (4099, 1), (1 << 20, 3)]:  # offset: unaligned views, scalar path
        buf = [torch.rand(n + offset, device="cuda", generator=gen)[offset:] for _ in range(4)]
        p, g, m, v = buf[0], buf[1] * 8.0, buf[2] * 0.1, buf[3] * 0.01
        want = [t.double().clone() for t in (p, g, m, v)]
        copy = torch.empty(n, dtype=torch.bfloat16, device="cuda")
        scale = torch.tensor([8.0], device="cuda")
        ops.adamw_(p, g, m, v, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=3,
                   grad_scale=scale, param_bf16=copy, kernels="cuda")  # fmt: skip
        wp, wg, wm, wv = want
        wg = wg / 8.0
        wp *= 1 - 1e-2 * 0.1
        wm += 0.1 * (wg - wm)
        wv = 0.99 * wv + 0.01 * wg * wg
        wp -= 1e-2 / (1 - 0.9**3) * wm / (wv.sqrt() / math.sqrt(1 - 0.99**3) + 1e-8)
        torch.testing.assert_close(p.double(), wp, rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(m.double(), wm, rtol=2e-6, atol=1e-9)
        torch.testing.assert_close(v.double(), wv, rtol=2e-6, atol=1e-12)
        assert torch.equal(copy, p.to(torch.bfloat16))
        before = [t.clone() for t in (p, m, v)]
        ops.adamw_(p, g, m, v, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=4,
                   found_inf=torch.ones(1, device="cuda"), kernels="cuda")  # fmt: skip
        for a, b in zip((p, m, v), before):
            assert torch.equal(a, b)
