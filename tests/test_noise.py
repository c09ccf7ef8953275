"""Noise schedules: the shared property suite (tests/suites.py) over every registered one."""

from __future__ import annotations

import math

import pytest
import torch
from suites import NoiseSuite

from sedd_ray.diffusion import NOISES, Noise, get_noise


@pytest.fixture(params=NOISES.names())
def noise(request) -> Noise:
    return get_noise(request.param)


class TestNoiseProperties(NoiseSuite):
    """The shared suite (tests/suites.py) over every registered schedule."""


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
