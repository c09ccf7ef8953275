"""Noise schedules: one property suite run over every registered schedule."""

from __future__ import annotations

import math

import pytest
import torch

from sedd_ray.diffusion import NOISES, Noise, get_noise


@pytest.fixture(params=NOISES.names())
def noise(request) -> Noise:
    return get_noise(request.param)


class TestNoiseProperties:
    """Every registered noise must satisfy these (parametrised over NOISES.names())."""

    def test_rate_is_autograd_derivative(self, noise):
        t = torch.linspace(0.0, 1.0, 101, dtype=torch.float64).requires_grad_()
        sigma_bar, dsigma = noise(t)
        (grad,) = torch.autograd.grad(sigma_bar.sum(), t)
        torch.testing.assert_close(dsigma.detach(), grad, rtol=1e-10, atol=1e-12)

    def test_positive_increasing_and_shaped(self, noise):
        t = torch.linspace(0.0, 1.0, 257).reshape(257, 1)
        sigma_bar, dsigma = noise(t)
        assert sigma_bar.shape == dsigma.shape == (257, 1)
        assert sigma_bar.dtype == dsigma.dtype == torch.float32
        assert (sigma_bar >= 0).all() and (dsigma > 0).all()
        assert (sigma_bar[1:] > sigma_bar[:-1]).all()
        assert torch.isfinite(sigma_bar).all() and torch.isfinite(dsigma).all()

    def test_noisy_end_is_nearly_the_limit(self, noise):
        sigma_bar, _ = noise(torch.tensor([1.0]))
        assert sigma_bar.item() > 5.0  # e^{-sigma_bar} < 1%: the limit is almost reached

    def test_keeps_dtype_and_device(self, noise):
        sigma_bar, dsigma = noise(torch.tensor([0.3], dtype=torch.float64))
        assert sigma_bar.dtype == dsigma.dtype == torch.float64


def test_loglinear_mask_probability_is_linear():
    noise = get_noise("loglinear", eps=1e-3)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    sigma_bar, dsigma = noise(t)
    torch.testing.assert_close(-torch.expm1(-sigma_bar), (1 - 1e-3) * t)
    torch.testing.assert_close(dsigma, (1 - 1e-3) / (1 - (1 - 1e-3) * t))


def test_geometric_endpoints():
    noise = get_noise("geometric", sigma_min=1e-4, sigma_max=20.0)
    sigma_bar, dsigma = noise(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(sigma_bar, torch.tensor([1e-4, 20.0], dtype=torch.float64))
    torch.testing.assert_close(dsigma, sigma_bar * math.log(20.0 / 1e-4))


def test_unknown_noise_lists_valid_names():
    with pytest.raises(ValueError, match="geometric, loglinear"):
        get_noise("cosine")


def test_wrong_argument_names_the_valid_ones():
    with pytest.raises(TypeError, match="valid arguments: eps"):
        get_noise("loglinear", sigma_min=1e-4)


@pytest.mark.parametrize("name,kwargs", [
    ("geometric", {"sigma_min": 2.0, "sigma_max": 1.0}),
    ("geometric", {"sigma_min": 0.0}),
    ("loglinear", {"eps": 0.0}),
])
def test_invalid_parameters_raise(name, kwargs):
    with pytest.raises(ValueError):
        get_noise(name, **kwargs)
