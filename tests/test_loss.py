"""The training loss and the ELBO, checked on a factorised toy with a known exact score."""

from __future__ import annotations

import pytest
import torch
from toy import F64, P0, L, N, exact_log_score_model

from sedd_ray.diffusion import (
    Graph,
    elbo_nll,
    get_graph,
    get_noise,
    sample_times,
    score_entropy_loss,
)


def zero_model(graph: Graph):
    return lambda x, sigma_bar: torch.zeros(*x.shape, graph.dim)


def time_biased_model(graph: Graph):
    """Exact log-score plus a bounded, time-dependent error: its loss depends on t."""
    exact = exact_log_score_model(graph)

    def model(x: torch.Tensor, sigma_bar: torch.Tensor) -> torch.Tensor:
        return exact(x, sigma_bar) - 2.0 * torch.expm1(-sigma_bar)[:, None, None]

    return model


def draw_x0(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(P0, batch, replacement=True, generator=g).T.contiguous()  # (B, L)


def true_nll(x0: torch.Tensor) -> torch.Tensor:
    """-log p0(x0) per token, per sequence. (B,)."""
    return -P0.gather(1, x0.T).log().T.mean(-1)


class TestSampleTimes:
    def test_range_and_marginal_mean(self):
        g = torch.Generator().manual_seed(0)
        for antithetic in (False, True):
            t = torch.cat([sample_times(64, 1e-3, antithetic, g) for _ in range(200)])
            assert t.shape == (12800,) and (t >= 1e-3).all() and (t < 1).all()
            assert abs(t.mean().item() - (1 + 1e-3) / 2) < 0.01

    def test_antithetic_is_one_draw_per_stratum(self):
        t = sample_times(16, 1e-3, True, torch.Generator().manual_seed(1))
        strata = torch.floor((t.double() - 1e-3) / (1 - 1e-3) * 16).long()
        assert sorted(strata.tolist()) == list(range(16))

    def test_reproducible_and_validated(self):
        a = sample_times(8, generator=torch.Generator().manual_seed(2))
        b = sample_times(8, generator=torch.Generator().manual_seed(2))
        assert torch.equal(a, b)
        with pytest.raises(ValueError, match="eps_t"):
            sample_times(8, eps_t=1.5)


@pytest.mark.parametrize("graph_name,noise_name", [("absorb", "loglinear"), ("uniform", "geometric")])
class TestScoreEntropyLoss:
    def test_nonnegative_finite_and_differentiable(self, graph_name, noise_name):
        graph, noise = get_graph(graph_name, vocab_size=N), get_noise(noise_name)
        g = torch.Generator().manual_seed(3)
        weight = torch.randn(graph.dim, generator=g).requires_grad_()

        def model(x, sigma_bar):
            return weight + torch.randn(*x.shape, graph.dim, generator=g)

        x0 = draw_x0(64, seed=4)
        loss = score_entropy_loss(model, graph, noise, x0, generator=g)
        assert loss.shape == (64,) and torch.isfinite(loss).all() and (loss >= 0).all()
        loss.mean().backward()
        assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0

    def test_antithetic_keeps_the_mean(self, graph_name, noise_name):
        """Same expectation with i.i.d. and stratified t, for a loss that depends on t."""
        graph, noise = get_graph(graph_name, vocab_size=N), get_noise(noise_name)
        model = time_biased_model(graph)
        x0 = draw_x0(256, seed=5)
        g = torch.Generator().manual_seed(6)
        means = {}
        for antithetic in (False, True):
            vals = torch.stack([
                score_entropy_loss(model, graph, noise, x0, antithetic=antithetic, generator=g)
                for _ in range(40)
            ])  # (40, B); each row is one batch
            batch_means = vals.mean(-1).double()
            means[antithetic] = (batch_means.mean(), batch_means.std() / 40 ** 0.5)
        (m0, s0), (m1, s1) = means[False], means[True]
        assert abs(m0 - m1) < 4 * (s0**2 + s1**2) ** 0.5, means


def test_loss_matches_conditional_entropy_identity():
    """Absorbing + loglinear, exact score: E_{x_t}[sigma(t) SE] = (1 - eps) (-log p0(x0)) for every t.

    At a masked position the exact score is p0(y)/E, so SE = -log p0(x0)/E; the mask
    probability is 1 - e^{-sigma_bar} and sigma (1 - e^{-sigma_bar}) / E = (1 - eps).
    """
    graph, noise = get_graph("absorb", vocab_size=N), get_noise("loglinear", eps=1e-3)
    model = exact_log_score_model(graph)
    x0 = draw_x0(1, seed=7).expand(20000, L)
    g = torch.Generator().manual_seed(8)
    expected = (1 - 1e-3) * true_nll(x0[:1]).item() * L
    for t in (0.05, 0.5, 0.95):
        loss = score_entropy_loss(model, graph, noise, x0, t=torch.full((20000,), t), generator=g)
        se = loss.double().std() / 20000**0.5
        assert abs(loss.double().mean() - expected) < 4 * se + 1e-6, (t, loss.mean(), expected)


def test_loss_is_zero_for_an_unmasked_absorbing_batch():
    graph, noise = get_graph("absorb", vocab_size=N), get_noise("loglinear")
    x0 = draw_x0(8, seed=9)
    t = torch.full((8,), 1e-9)  # practically no masking
    loss = score_entropy_loss(zero_model(graph), graph, noise, x0, t=t)
    assert (loss == 0).all()


@pytest.mark.parametrize("graph_name,noise_name,tol", [
    ("absorb", "loglinear", 0.02),
    ("uniform", "geometric", 0.03),
])
def test_elbo_with_exact_score_is_the_nll(graph_name, noise_name, tol):
    """With the exact score the bound is tight up to O(eps): within a few % of the NLL.

    For absorbing + loglinear the integral runs under the process conditioned on all-mask
    at t = 1 (the eps = 0 loglinear process), so with the exact score of *that* process it
    is (t_max - eps_t) NLL - log(1 - eps) in expectation: a true bound, above the NLL by
    about eps = 1e-3 nats/token (the unconditioned version landed ~0.2 % below it).
    """
    graph, noise = get_graph(graph_name, vocab_size=N), get_noise(noise_name)
    model = exact_log_score_model(graph)
    x0 = draw_x0(2000, seed=10)
    nll = elbo_nll(model, graph, noise, x0, draws=16, generator=torch.Generator().manual_seed(11))
    assert nll.shape == (2000,) and nll.dtype == torch.float32 and torch.isfinite(nll).all()
    gap = (nll.double() - true_nll(x0))
    se = gap.std() / len(gap) ** 0.5
    truth = true_nll(x0).mean()
    assert abs(gap.mean()) < tol * truth, (gap.mean(), se, truth)
    assert se < 0.01 * truth
    if graph_name == "absorb":
        expected = (1 - 1e-6 - 1e-5) * truth - torch.log1p(torch.tensor(-1e-3, dtype=F64))
        assert abs(nll.double().mean() - expected) < 4 * se
        assert expected > truth  # a bound, not an approximation


def test_elbo_bounds_the_entropy_for_a_wrong_model():
    """Any model's bound is >= the data entropy on average; a bad one is far above it."""
    graph, noise = get_graph("absorb", vocab_size=N), get_noise("loglinear")
    x0 = draw_x0(500, seed=12)
    nll = elbo_nll(zero_model(graph), graph, noise, x0, draws=4,
                   generator=torch.Generator().manual_seed(13))
    assert nll.mean() > 1.1 * true_nll(x0).mean()


def test_elbo_validates_draws():
    graph, noise = get_graph("absorb", vocab_size=N), get_noise("loglinear")
    with pytest.raises(ValueError, match="draws"):
        elbo_nll(zero_model(graph), graph, noise, draw_x0(2, seed=0), draws=0)
