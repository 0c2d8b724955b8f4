import math

import pytest
import torch

import dblocks_fast as dbf
from dblocks_fast import EDM
from dblocks_fast.model import BlockModel
from dblocks_fast.sample import guided, sample_euler, sample_heun


@pytest.mark.parametrize("sampler", [sample_euler, sample_heun])
def test_a_perfect_denoiser_returns_the_target(sampler):
    """Data that is one point y: the ideal denoiser is D = y at every sigma, and the ODE ends exactly at y."""
    y = torch.randn(3, 1, 4, 4)
    sigmas = EDM(3).grid(12)
    x = torch.randn(3, 1, 4, 4) * 80.0
    out = sampler(lambda x, sigma, **_: y.clone(), x, sigmas)
    assert torch.equal(out, y)


def _gaussian_ode_error(sampler, steps, s=0.7, smax=80.0, callback=None):
    """Gaussian data N(0, s^2): D = s^2 z / (s^2 + sigma^2) exactly, and the ODE maps z at sigma_max to
    z * sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2). Returns the relative error of the sampler's output."""
    sigmas = EDM(3, sigma_max=smax).grid(steps)
    z0 = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * smax
    out = sampler(lambda x, sigma: s**2 * x / (s**2 + sigma**2), z0, sigmas, callback=callback)
    last = float(sigmas[-2])
    exact_at_last = z0 * math.sqrt(s**2 + last**2) / math.sqrt(s**2 + smax**2)
    exact = s**2 * exact_at_last / (s**2 + last**2)  # the final output is D at the last sigma
    return ((out - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("sampler,steps,tol", [(sample_euler, 300, 1e-2), (sample_heun, 60, 2e-3)])
def test_samplers_solve_the_probability_flow_ode(sampler, steps, tol):
    """A sign error in the step (the paper's misprint) or a wrong block of sigma' would not converge."""
    seen = []
    assert _gaussian_ode_error(sampler, steps, callback=lambda info: seen.append(float(info["sigma"]))) < tol
    assert seen == EDM(3).grid(steps)[:-1].tolist()


def test_euler_is_first_order_and_heun_second_order():
    e30, e60 = _gaussian_ode_error(sample_euler, 30), _gaussian_ode_error(sample_euler, 60)
    h30, h60 = _gaussian_ode_error(sample_heun, 30), _gaussian_ode_error(sample_heun, 60)
    assert 1.6 < e30 / e60 < 2.4 and h30 / h60 > 3.0
    assert h30 < e30 / 10  # at equal steps, and even at equal network calls (Heun takes two a step):
    assert h30 < _gaussian_ode_error(sample_euler, 60) / 5


def _model(task, b=3):
    return BlockModel.create(task, EDM(b), [1] * b, seed=0)


@pytest.mark.parametrize("name,calls_per_block", [("euler", [2, 2, 2]), ("heun", [3, 4, 4])])
def test_sampling_runs_one_block_per_step_and_uses_each_block(tiny_task, name, calls_per_block):
    model = _model(tiny_task)
    calls = []
    for b, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda m, inp, out, b=b: calls.append((b, inp[0].shape[0])))
    out = dbf.sample(model, [0, 1, 2], num_steps=6, sampler=name)
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()
    assert [b for b, _ in calls] == sorted(b for b, _ in calls)  # block 0 first, then 1, then 2
    assert [sum(1 for b, _ in calls if b == i) for i in range(3)] == calls_per_block
    assert all(n == 3 for _, n in calls)  # cfg_scale 1: one conditional batch per call, nothing doubled


def test_heun_correction_is_evaluated_by_the_block_of_sigma_next(tiny_task):
    model = _model(tiny_task)
    sched = model.schedule
    sigmas = sched.grid(6)
    evaluated = []
    real = model.denoise

    def spy(z, sigma, cond, block=None):
        evaluated.append((float(sigma[0]), sched.block_of(float(sigma[0]))))
        return real(z, sigma, cond, block)

    model.denoise = spy
    sample_heun(guided(model, 1.0), torch.randn(2, 1, 8, 8) * 80, sigmas, {"cond": torch.tensor([1, 2])})
    # step i evaluates sigma_i, then (unless sigma_{i+1} = 0) sigma_{i+1} with the block that owns it
    want = []
    for i in range(6):
        want.append(float(sigmas[i]))
        if sigmas[i + 1] > 0:
            want.append(float(sigmas[i + 1]))
    assert [s for s, _ in evaluated] == want
    assert [b for _, b in evaluated] == [sched.block_of(s) for s in want]
    assert sched.block_of(float(sigmas[2])) == 1  # sigma_2 is block 1's top boundary, evaluated as its own


def test_classifier_free_guidance(tiny_task):
    model = _model(tiny_task, 1)
    torch.manual_seed(0)
    for p in model.parameters():  # make the network's output depend on the label
        p.data.normal_(0, 0.1)
    z, sigma, lab = torch.randn(2, 1, 8, 8), torch.full((2,), 1.0, dtype=torch.float64), torch.tensor([3, 4])
    d_c = model.denoise(z, sigma, lab)
    d_u = model.denoise(z, sigma, tiny_task.null_cond(lab))
    torch.testing.assert_close(
        guided(model, 2.0)(z, sigma, lab), d_u + 2.0 * (d_c - d_u), atol=1e-5, rtol=1e-5
    )
    assert torch.equal(guided(model, 1.0)(z, sigma, lab), d_c)


def test_sample_checks_its_arguments(tiny_task):
    model = _model(tiny_task)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        dbf.sample(model, [1], num_steps=7)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        dbf.sample(model, [10], num_steps=3)
    with pytest.raises(ValueError, match="sampler must be one of"):
        dbf.sample(model, [1], num_steps=3, sampler="dpm")
    with pytest.raises(ValueError, match="non-empty 1-D"):
        dbf.sample(model, [], num_steps=3)


def test_a_saved_run_samples_like_the_model_in_memory(tiny_task, digits, tiny_config, tmp_path):
    model = dbf.train(tiny_task, digits, tiny_config(out_dir=str(tmp_path / "run")))
    loaded = dbf.load(tmp_path / "run", device="cpu")
    a = dbf.sample(model, [0, 5, 9], num_steps=6, sampler="heun", cfg_scale=1.5, seed=3)
    b = dbf.sample(
        tmp_path / "run", [0, 5, 9], num_steps=6, sampler="heun", cfg_scale=1.5, seed=3, device="cpu"
    )
    assert torch.equal(a, b)
    assert loaded.layers == [1, 1, 1] and loaded.schedule.boundaries == model.schedule.boundaries
    assert not torch.equal(a, dbf.sample(model, [0, 5, 9], num_steps=6, seed=4))
