"""The score-entropy training loss and the ELBO bound on the NLL.

For one sequence ``x_0`` of length ``L`` (Lou et al. 2024, SEDD, Theorem 3.6):

    -log p_theta(x_0) <= int_0^1 sigma(t) E_{x_t ~ p_t(.|x_0)} [sum_l SE_l] dt
                         + KL(p_1(. | x_0) || p_limit)

The training loss is the Monte Carlo estimate of the integral's integrand at one
``t ~ U(eps_t, 1)``; :func:`elbo_nll` averages it over several stratified times and adds the
prior term, per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sedd_ray.diffusion.graphs import Graph, _rand
from sedd_ray.diffusion.noise import MaskConditioned, Noise

__all__ = ["MaskConditioned", "elbo_nll", "sample_times", "score_entropy_loss"]

# model(x_t (B, L) long, sigma_bar (B,) float) -> log-scores (B, L, dim)
LogScoreModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_times(batch: int, eps_t: float = 1e-3, antithetic: bool = False,
                 generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Draw ``t`` (batch,) in ``[eps_t, 1)``, each marginally ``U(eps_t, 1)``.

    ``antithetic=True`` stratifies across the batch with one shared ``u ~ U(0, 1)``:
    ``t_i = eps_t + (1 - eps_t) ((u + i / batch) mod 1)`` (one draw per stratum), which
    keeps the mean of any function of ``t`` and lowers its variance.
    """
    if not 0 <= eps_t < 1:
        raise ValueError(f"eps_t must be in [0, 1), got {eps_t}; the SEDD default is 1e-3")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if antithetic:
        u = _rand((1,), generator, device)
        frac = torch.remainder(u + torch.arange(batch, device=device, dtype=torch.float64) / batch, 1.0)
    else:
        frac = _rand((batch,), generator, device)
    return (eps_t + (1 - eps_t) * frac).to(torch.get_default_dtype())


def score_entropy_loss(model: LogScoreModel, graph: Graph, noise: Noise, x0: torch.Tensor,
                       t: torch.Tensor | None = None, eps_t: float = 1e-3,
                       antithetic: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Denoising score-entropy loss, nats per sequence: ``sum_l sigma(t) SE_l``. (B,).

    ``x0`` (B, L) long clean tokens; ``t`` (B,) times in ``(0, 1]`` or ``None`` to draw
    them (:func:`sample_times`); ``model(x_t (B, L), sigma_bar (B,)) -> log_score
    (B, L, dim)``. Divided by ``L`` its expectation over ``t ~ U(eps_t, 1)`` is the ELBO's
    integral over ``[eps_t, 1]`` divided by ``1 - eps_t`` (see :func:`elbo_nll`).
    """
    if t is None:
        t = sample_times(x0.shape[0], eps_t, antithetic, generator, x0.device)
    t = t.to(x0.device)
    sigma_bar, dsigma = noise(t)
    x_t = graph.sample_transition(x0, sigma_bar[:, None], generator)
    log_score = model(x_t, sigma_bar)
    se = graph.score_entropy(log_score, sigma_bar[:, None], x_t, x0)  # (B, L)
    return (dsigma[:, None] * se).sum(dim=-1)


@torch.no_grad()
def elbo_nll(model: LogScoreModel, graph: Graph, noise: Noise, x0: torch.Tensor,
             draws: int = 4, eps_t: float = 1e-5, t_max: float = 1 - 1e-6,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sequence upper bound on the NLL, nats per token. ``x0`` (B, L) -> (B,).

        nll = (t_max - eps_t) mean_k [sum_l sigma(t_k) SE_l(t_k)] / L + sum_l prior_l / L

    with ``draws`` stratified times per sequence in ``[eps_t, t_max]`` (``t_k = eps_t +
    (t_max - eps_t)((u + k/K) mod 1)``, ``u ~ U(0, 1)`` per sequence).

    The integral runs under ``graph.path_noise(noise)`` and the prior term is
    ``graph.prior_kl`` at the base schedule's ``sigma_bar(1)``:

    - Uniform graph (the default path noise: ``noise`` itself): the prior term is the
      exact ``KL(p_1(.|x_0) || uniform)``.
    - Absorbing graph: the reverse chain starts from all-mask, which the base schedule
      reaches only with probability ``m(1) = 1 - e^{-sigma_bar(1)}`` per position (for
      loglinear, ``1 - eps``). The integral is therefore taken under the process
      conditioned on that event (:class:`MaskConditioned`) and the prior term is
      ``-log m(1)``: an exact bound rather than the approximation that drops the tokens
      never masked (which lands ``eps * NLL`` *below* the truth).

    The integrand is bounded, so the pieces outside ``[eps_t, t_max]`` contribute at most
    ``O(eps_t + 1 - t_max)`` of the NLL (1e-5 relative by default). Average over sequences
    for the bound; their spread gives a standard error. Runs under ``torch.no_grad``.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if not 0 < eps_t < t_max <= 1:
        raise ValueError(f"need 0 < eps_t < t_max <= 1, got eps_t={eps_t}, t_max={t_max}")
    b, length = x0.shape
    path_noise = graph.path_noise(noise)
    u = _rand((b,), generator, x0.device)
    total = torch.zeros(b, dtype=torch.float64, device=x0.device)
    for k in range(draws):
        frac = torch.remainder(u + k / draws, 1.0).double()
        t = (eps_t + (t_max - eps_t) * frac).to(torch.get_default_dtype())
        total += score_entropy_loss(model, graph, path_noise, x0, t=t, generator=generator).double()
    integral = (t_max - eps_t) * total / draws
    t_end = torch.ones(b, device=x0.device)
    sigma_end, _ = noise(t_end)
    prior = graph.prior_kl(x0, sigma_end[:, None]).double().sum(dim=-1)
    return ((integral + prior) / length).float()
