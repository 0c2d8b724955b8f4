import math

import numpy as np
import pytest
import scipy.stats
import torch

from dblocks_fast import EDM

REFERENCE = {  # DESIGN.md section 2
    2: [80.0, 0.3012, 0.002],
    3: [80.0, 0.5050, 0.1796, 0.002],
    4: [80.0, 0.6766, 0.3012, 0.1341, 0.002],
}


@pytest.mark.parametrize("b", sorted(REFERENCE))
def test_boundaries_match_reference(b):
    s = EDM(b)
    assert len(s.boundaries) == b + 1
    np.testing.assert_allclose(s.boundaries, REFERENCE[b], atol=1e-4, rtol=0)


@pytest.mark.parametrize("b", [1, 2, 3, 4, 6, 7])
def test_equiprob_blocks_hold_equal_mass(b):
    s = EDM(b, gamma=0.0)
    mass = [(s.cdf(s.interval(i)[1]) - s.cdf(s.interval(i)[0])) / (s.q_max - s.q_min) for i in range(b)]
    np.testing.assert_allclose(mass, [1 / b] * b, atol=1e-9, rtol=0)
    assert all(x > y for x, y in zip(s.boundaries, s.boundaries[1:]))  # descending: block 0 = highest noise


def test_uniform_partition_has_equal_log_widths():
    s = EDM(5, partition="uniform", gamma=0.0)
    widths = np.diff(np.log(s.boundaries))
    np.testing.assert_allclose(widths, widths[0], rtol=1e-12)
    assert s.boundaries[0] == 80.0 and s.boundaries[-1] == 0.002


def test_overlap_widens_in_log_space_and_clips():
    s0, s = EDM(3, gamma=0.0), EDM(3, gamma=0.1)
    lo0, hi0 = s0.interval(1)
    w = math.log(hi0) - math.log(lo0)
    lo, hi = s.interval(1)
    assert math.isclose(math.log(lo), math.log(lo0) - 0.1 * w, rel_tol=1e-12)
    assert math.isclose(math.log(hi), math.log(hi0) + 0.1 * w, rel_tol=1e-12)
    assert s.interval(0)[1] == 80.0 and s.interval(2)[0] == 0.002  # clipped at the ends


@pytest.mark.parametrize(
    "b,gamma,partition", [(1, 0.05, "equiprob"), (3, 0.05, "equiprob"), (4, 0.1, "uniform")]
)
def test_sampled_sigmas_follow_the_truncated_lognormal_of_the_block(b, gamma, partition):
    s = EDM(b, partition=partition, gamma=gamma)
    g = torch.Generator().manual_seed(1)
    for blk in range(b):
        lo, hi = s.interval(blk)
        sig = s.sample(blk, 20000, g)
        assert sig.dtype == torch.float64 and sig.shape == (20000,)
        assert float(sig.min()) >= lo and float(sig.max()) <= hi
        # the distribution: the log-normal restricted to [lo, hi]
        q_lo, q_hi = s.cdf(lo), s.cdf(hi)

        def cdf(x, q_lo=q_lo, q_hi=q_hi):
            return (scipy.stats.norm.cdf((np.log(x) - s.p_mean) / s.p_std) - q_lo) / (q_hi - q_lo)

        assert scipy.stats.kstest(sig.numpy(), cdf).pvalue > 1e-3


@pytest.mark.parametrize("b", [1, 2, 3, 5])
def test_block_of_inverts_the_partition(b):
    s = EDM(b)
    g = torch.Generator().manual_seed(0)
    for blk in range(b):
        lo, hi = s.boundaries[blk + 1], s.boundaries[blk]
        inside = torch.exp(
            math.log(lo) + torch.rand(1000, generator=g, dtype=torch.float64) * math.log(hi / lo)
        )
        assert (s.block_of(inside) == blk).all()
        assert s.block_of(hi) == blk  # a boundary is the top of the lower-noise block
    assert s.block_of(80.0) == 0 and s.block_of(0.002) == b - 1
    assert s.block_of(1e4) == 0 and s.block_of(1e-5) == b - 1  # outside the range: clamp to the ends


@pytest.mark.parametrize(
    "b,steps,partition", [(1, 7, "equiprob"), (3, 12, "equiprob"), (4, 8, "uniform"), (3, 3, "equiprob")]
)
def test_the_grid_gives_every_block_the_same_steps(b, steps, partition):
    s = EDM(b, partition=partition)
    sig = s.grid(steps)
    assert sig.shape == (steps + 1,) and sig[0] == 80.0 and sig[-1] == 0.0
    assert (sig[1:] < sig[:-1]).all()
    owners = s.block_of(sig[:-1])
    assert owners.tolist() == sorted(owners.tolist())
    assert torch.bincount(owners, minlength=b).tolist() == [steps // b] * b
    if partition == "equiprob":  # the whole sequence is uniform in the truncated CDF
        q = s.cdf(sig[:-1])
        np.testing.assert_allclose(np.diff(q.numpy()), -(s.q_max - s.q_min) / steps, rtol=1e-9)


def test_the_grid_rejects_steps_that_do_not_split_evenly():
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        EDM(3).grid(10)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_blocks=0), "num_blocks"),
        (dict(num_blocks=2, partition="log"), "partition"),
        (dict(num_blocks=2, sigma_min=1.0, sigma_max=0.5), "sigma_min"),
        (dict(num_blocks=2, gamma=-0.1), "gamma"),
    ],
)
def test_bad_arguments_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        EDM(**kw)
