"""Flow matching (rectified flow) as a DiffusionBlocks noise process: the partition of its training density,
the widening, the sampling grid, the parametrisations, and the masking process's levels."""

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.special
import scipy.stats
import torch

from dblocks_fast import FlowMatching, Masking
from dblocks_fast.config import NoiseConfig
from dblocks_fast.schedule import create, from_dict


def _logit_normal_pdf(t, m=0.0, s=1.0):
    """The density of t = sigmoid(m + s n), n ~ N(0, 1), written out (independent of the package)."""
    x = scipy.special.logit(t)
    return scipy.stats.norm.pdf(x, m, s) / (t * (1 - t))


def test_logit_normal_boundaries_are_the_normal_quantiles():
    # B = 4 of logit-normal(0, 1): the inner boundaries are sigmoid of the normal's quartiles
    q = scipy.stats.norm.ppf(0.75)  # 0.6745
    want = [1.0, scipy.special.expit(q), 0.5, scipy.special.expit(-q), 0.0]
    np.testing.assert_allclose(FlowMatching(4).boundaries, want, atol=1e-12, rtol=0)
    np.testing.assert_allclose(FlowMatching(2).boundaries, [1.0, 0.5, 0.0], atol=1e-15, rtol=0)


@pytest.mark.parametrize("b, m, s", [(2, 0.0, 1.0), (3, 0.5, 0.8), (5, -0.3, 1.3)])
def test_equiprob_blocks_hold_equal_mass_of_the_density(b, m, s):
    proc = FlowMatching(b, gamma=0.0, mean=m, std=s)
    bounds = proc.boundaries
    assert all(x > y for x, y in zip(bounds, bounds[1:]))  # block 0 owns the noisiest end, t near 1
    mass = [
        scipy.integrate.quad(_logit_normal_pdf, bounds[i + 1], bounds[i], args=(m, s))[0] for i in range(b)
    ]
    np.testing.assert_allclose(mass, [1 / b] * b, atol=1e-8, rtol=0)


def test_the_shift_moves_mass_to_the_noisy_end_and_keeps_it_equal():
    b, k = 3, 3.0
    proc = FlowMatching(b, shift=k)
    plain = FlowMatching(b)
    assert all(x > y for x, y in zip(proc.boundaries[1:-1], plain.boundaries[1:-1]))  # noisier boundaries
    # an independent draw of the shifted density: t = k u / (1 + (k - 1) u), u logit-normal(0, 1)
    u = scipy.special.expit(np.random.default_rng(0).standard_normal(400_000))
    t = k * u / (1 + (k - 1) * u)
    counts = np.histogram(t, bins=list(reversed(proc.boundaries)))[0] / len(t)
    np.testing.assert_allclose(counts, [1 / b] * b, atol=3e-3)


def test_uniform_density_and_uniform_partition():
    proc = FlowMatching(4, density="uniform")
    np.testing.assert_allclose(proc.boundaries, [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-15)
    assert FlowMatching(4, partition="uniform").boundaries == (1.0, 0.75, 0.5, 0.25, 0.0)


@pytest.mark.parametrize("b", [1, 3, 4])
def test_gamma_widens_in_logit_t_and_keeps_the_ends(b):
    gamma = 0.1
    proc, bare = FlowMatching(b, gamma=gamma), FlowMatching(b, gamma=0.0)
    assert proc.interval(0)[1] == 1.0 and proc.interval(b - 1)[0] == 0.0
    logit = scipy.special.logit
    for i in range(1, b - 1):  # an inner block: both sides widened by gamma x its logit width
        lo, hi = bare.interval(i)
        wlo, whi = proc.interval(i)
        width = logit(hi) - logit(lo)
        assert logit(whi) - logit(hi) == pytest.approx(gamma * width, rel=1e-9)
        assert logit(lo) - logit(wlo) == pytest.approx(gamma * width, rel=1e-9)
    for i in range(b):
        g = torch.Generator().manual_seed(i)
        lo, hi = proc.interval(i)
        t = proc.sample(i, 5000, g)
        assert t.dtype == torch.float64 and float(t.min()) >= lo and float(t.max()) <= hi
        t0 = bare.sample(i, 2000, g)
        assert (bare.block_of(t0) == i).all()  # unwidened samples belong to their block


@pytest.mark.parametrize("b, steps", [(1, 5), (3, 9), (4, 8)])
def test_the_grid_gives_every_block_the_same_number_of_steps(b, steps):
    proc = FlowMatching(b)
    grid = proc.grid(steps)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and len(grid) == steps + 1
    assert bool((grid[1:] < grid[:-1]).all())
    assert torch.bincount(proc.block_of(grid[:-1]), minlength=b).tolist() == [steps // b] * b
    # uniform in the training CDF: the CDF of the evaluation levels steps down by 1 / steps
    q = torch.as_tensor([proc.cdf(float(t)) for t in grid[:-1]])
    np.testing.assert_allclose(q.numpy(), 1 - np.arange(steps) / steps, atol=1e-9)


@pytest.mark.parametrize("prediction", ["velocity", "epsilon", "x0"])
def test_a_perfect_prediction_denoises_exactly_and_the_loss_is_zero(prediction):
    proc = FlowMatching(3, prediction=prediction)
    g = torch.Generator().manual_seed(0)
    y, eps = torch.randn(5, 2, 3, generator=g), torch.randn(5, 2, 3, generator=g)
    t = torch.tensor([0.9, 0.7, 0.5, 0.2, 0.05], dtype=torch.float64)
    z = proc.noisy(y, eps, t)
    torch.testing.assert_close(z, (1 - t.float().view(-1, 1, 1)) * y + t.float().view(-1, 1, 1) * eps)
    out = proc.target(y, eps)
    torch.testing.assert_close(proc.denoised(z, out, t), y, atol=1e-5, rtol=1e-5)
    loss, per_sample = proc.loss(z, out, y, eps, t)
    assert float(loss) == 0 and per_sample.shape == (5,)
    net_in, c_noise = proc.inputs(z, t)
    assert net_in is z and torch.equal(c_noise, 4 * t.float())


def test_euler_on_the_flow_ode_with_the_true_denoiser_lands_on_the_data():
    """One data point y0: the true D is y0 everywhere, and the ODE x' = (x - D) / t carries any x_1 to it."""
    from dblocks_fast.sample import sample_euler, sample_heun

    proc = FlowMatching(2)
    y0 = torch.tensor([[0.3, -1.2, 2.0]])
    x1 = proc.prior((1, 3), torch.Generator().manual_seed(1))
    for sampler in (sample_euler, sample_heun):
        out = sampler(lambda x, t: y0.expand_as(x), x1.clone(), proc.grid(6))
        torch.testing.assert_close(out, y0)


def test_processes_rebuild_from_their_dicts_and_the_config():
    for proc in (FlowMatching(3, gamma=0.1, shift=2.0, prediction="x0"), Masking(4, 0.05, 1e-3)):
        again = from_dict(proc.to_dict())
        assert type(again) is type(proc) and again.to_dict() == proc.to_dict()
    old = {"num_blocks": 2, "partition": "equiprob", "gamma": 0.05, "sigma_min": 0.002, "sigma_max": 80.0,
           "p_mean": -1.2, "p_std": 1.2}  # fmt: skip
    assert from_dict(old).kind == "edm"  # a run folder from before flow matching
    flow = create("flow", 3, NoiseConfig(process="flow", shift=3.0, flow_std=0.5))
    assert (flow.shift, flow.std, flow.gamma) == (3.0, 0.5, 0.05)
    with pytest.raises(ValueError, match="unknown noise process 'diffusion'"):
        from_dict({"kind": "diffusion"})
    for bad, match in [
        (dict(shift=0.0), "shift must be positive"),
        (dict(std=-1.0), "std > 0"),
        (dict(density="beta"), "density must be one of"),
        (dict(prediction="score"), "prediction must be one of"),
        (dict(gamma=1.0), "gamma"),
    ]:
        with pytest.raises(ValueError, match=match):
            FlowMatching(2, **bad)


def test_masking_levels_tile_the_unit_interval_and_its_grid_is_uniform():
    proc = Masking(3, gamma=0.0, t_min=0.0)
    assert proc.boundaries == (1.0, 2 / 3, 1 / 3, 0.0)
    grid = proc.grid(6)
    # the masked-diffusion sampler's t_k = 1 - k / num_steps, each block's first level exactly its boundary
    np.testing.assert_allclose(grid.numpy(), [1 - k / 6 for k in range(6)] + [0.0], atol=1e-15, rtol=0)
    assert proc.block_of(grid[:-1]).tolist() == [0, 0, 1, 1, 2, 2]
    assert math.isclose(Masking(3, 0.1, 1e-3).interval(2)[0], 1e-3)
