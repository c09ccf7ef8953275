"""Noise schedules: total noise sigma_bar(t) and its rate sigma(t) on t in [0, 1].

Register a new schedule with ``@NOISES.register("name")`` (from anywhere: see
``docs/extending.md``); the shared property suite in ``tests/suites.py`` checks it
(derivative, monotonicity). Its constructor's typed keywords are its configurable
parameters (``diffusion.noise_params`` in the run config).
"""

from __future__ import annotations

import abc
import math

import torch

from sedd_ray.diffusion.params import Param, check_param_names, declared_params
from sedd_ray.registry import Registry

NOISES: Registry[type[Noise]] = Registry("noise")


def get_noise(name: str, **kwargs: float | int | bool | str) -> Noise:
    """The schedule registered as ``name``, built with its keyword arguments.

    ``get_noise("loglinear", eps=1e-3)``, ``get_noise("geometric", sigma_min=1e-4,
    sigma_max=20.0)``. Unknown names raise ``ValueError`` listing the valid ones; an
    argument the schedule does not take raises ``TypeError`` naming the ones it does.
    """
    cls = NOISES.get(name)
    check_param_names("noise", name, sorted(kwargs), cls.params())
    return cls(**kwargs)


class Noise(abc.ABC):
    r"""A noise schedule on ``t in [0, 1]`` (``t = 1`` is the noisy end).

    - ``sigma_bar(t) = int_0^t sigma(s) ds (+ sigma_bar(0))`` is the total noise: the
      forward marginal is ``exp(sigma_bar(t) Q)`` (:class:`~sedd_ray.diffusion.Graph`).
    - ``sigma(t) = d sigma_bar / dt > 0`` is the rate; the training loss weights the score
      entropy by it, and the ELBO is ``int sigma(t) E[SE] dt``.

    ``noise(t)`` takes ``t`` (*) (float) and returns ``(sigma_bar, sigma)``, both (*) in
    ``t``'s dtype and device. Constructor keywords (typed, with defaults, validated in
    ``__init__`` with a fix-it ``ValueError``) are the schedule's parameters.
    """

    @classmethod
    def params(cls) -> dict[str, Param]:
        """The schedule's declared parameters: its constructor's keywords."""
        return declared_params(cls)

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(t)
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
        return self.total_noise(t), self.rate_noise(t)

    @abc.abstractmethod
    def total_noise(self, t: torch.Tensor) -> torch.Tensor:
        """``sigma_bar(t)``. (*) -> (*)."""
        raise NotImplementedError

    @abc.abstractmethod
    def rate_noise(self, t: torch.Tensor) -> torch.Tensor:
        """``sigma(t) = d sigma_bar / dt``. (*) -> (*)."""
        raise NotImplementedError


@NOISES.register("geometric")
class Geometric(Noise):
    r"""``sigma_bar = smin^{1-t} smax^t``, ``sigma = sigma_bar ln(smax / smin)``.

    Log-linear interpolation of the total noise; the SEDD paper uses it with the uniform
    graph over roughly 1e-5..20 (the default here, 1e-4..20, matches the config).
    """

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, "
                f"sigma_max={sigma_max}; the SEDD paper uses 1e-4 and 20"
            )
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self._log_min = math.log(sigma_min)
        self._log_ratio = math.log(sigma_max / sigma_min)

    def __repr__(self) -> str:
        return f"Geometric(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"

    def total_noise(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self._log_min + t * self._log_ratio)

    def rate_noise(self, t: torch.Tensor) -> torch.Tensor:
        return self.total_noise(t) * self._log_ratio


@NOISES.register("loglinear")
class LogLinear(Noise):
    r"""``sigma_bar = -log1p(-(1 - eps) t)``, ``sigma = (1 - eps) / (1 - (1 - eps) t)``.

    Built for the absorbing graph: the mask probability ``1 - e^{-sigma_bar}`` is exactly
    ``(1 - eps) t``; ``eps`` keeps ``sigma_bar(1) = -log(eps)`` finite.
    """

    def __init__(self, eps: float = 1e-3) -> None:
        if not 0 < eps < 1:
            raise ValueError(f"loglinear eps must be in (0, 1), got {eps}; the SEDD default is 1e-3")
        self.eps = float(eps)

    def __repr__(self) -> str:
        return f"LogLinear(eps={self.eps})"

    def total_noise(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.log1p(-(1 - self.eps) * t)

    def rate_noise(self, t: torch.Tensor) -> torch.Tensor:
        return (1 - self.eps) / (1 - (1 - self.eps) * t)


class MaskConditioned(Noise):
    r"""The absorbing forward process conditioned on every position being masked at t = 1.

    With mask probability ``m(t) = 1 - e^{-sigma_bar(t)}`` of the base schedule, the
    conditioned process masks with ``m_A(t) = m(t) / m(1)`` (each position's masking time,
    conditioned to fall in [0, 1]), i.e.

        sigma_bar_A(t) = -log(1 - m_A(t)) = log m(1) - log(e^{-sigma_bar(t)} - e^{-sigma_bar(1)})
        sigma_A(t)     = sigma(t) e^{-sigma_bar(t)} / (e^{-sigma_bar(t)} - e^{-sigma_bar(1)})

    It reaches the all-mask limit exactly at ``t = 1``, so the variational bound over its
    paths plus ``-log m(1)`` per position (the probability of the conditioning event) is a
    true bound for a reverse chain that starts from all-mask (for loglinear, this is the
    ``eps = 0`` loglinear process). Computed in float64. Not registered: it wraps a
    schedule (see :meth:`sedd_ray.diffusion.Absorbing.path_noise`).
    """

    def __init__(self, base: Noise) -> None:
        self.base = base
        one = torch.ones((), dtype=torch.float64)
        self._end = float(base.total_noise(one))  # sigma_bar(1)

    @classmethod
    def params(cls) -> dict[str, Param]:
        return {}

    def __repr__(self) -> str:
        return f"MaskConditioned({self.base!r})"

    def _parts(self, t: torch.Tensor):
        t64 = t.to(torch.float64)
        sb, rate = self.base.total_noise(t64), self.base.rate_noise(t64)
        stay, stay_end = torch.exp(-sb), math.exp(-self._end)
        gap = (stay - stay_end).clamp_min(1e-300)
        return sb, rate, stay, gap

    def total_noise(self, t: torch.Tensor) -> torch.Tensor:
        sb, _, _, gap = self._parts(t)
        log_m1 = math.log(-math.expm1(-self._end))
        return (log_m1 - torch.log(gap)).to(t.dtype)

    def rate_noise(self, t: torch.Tensor) -> torch.Tensor:
        _, rate, stay, gap = self._parts(t)
        return (rate * stay / gap).to(t.dtype)
