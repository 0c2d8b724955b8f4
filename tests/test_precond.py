import torch

from dblocks_fast import precond


def test_coefficients_match_the_edm_formulas():
    sigma = torch.logspace(-2.7, 1.9, 50, dtype=torch.float64)
    sd = 0.5
    c_skip, c_out, c_in, c_noise, w = precond.coefficients(sigma, sd)
    torch.testing.assert_close(c_skip, sd**2 / (sigma**2 + sd**2))
    torch.testing.assert_close(c_out, sigma * sd / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    torch.testing.assert_close(w, 1 / c_out**2)
    # unit variance of the network's input and of its training target (EDM's design rule)
    torch.testing.assert_close(c_in**2 * (sigma**2 + sd**2), torch.ones_like(sigma))
    assert abs(precond.loss_weight(torch.tensor(0.002, dtype=torch.float64)).item() - 250004.0) < 1.0


def test_optimal_network_output_makes_d_exact():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(5, 3, 7, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.1, 0.5, 3.0, 80.0], dtype=torch.float64)
    z = y + sigma.view(-1, 1, 1) * torch.randn(y.shape, generator=g, dtype=torch.float64)
    f_star = (y - precond.c_skip(sigma).view(-1, 1, 1) * z) / precond.c_out(sigma).view(-1, 1, 1)
    torch.testing.assert_close(precond.denoise(z, f_star, sigma), y)
    torch.testing.assert_close(
        precond.denoise(z, torch.zeros_like(z), sigma), precond.c_skip(sigma).view(-1, 1, 1) * z
    )
