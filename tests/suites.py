"""Shared property suites, run over every implementation (Optuna-style).

A test module subclasses a suite and provides the fixture it needs:

    from suites import GraphSuite

    class TestMyGraph(GraphSuite):
        @pytest.fixture
        def graph(self):
            return MyGraph(vocab_size=GraphSuite.N, rate=0.5)   # vocab_size must be N

``tests/test_graphs.py`` and ``tests/test_noise.py`` run them over every registered graph
and noise; ``tests/test_extending.py`` over components registered from outside the package.
The references are dense: ``Q = graph.rate_matrix()`` and ``torch.linalg.matrix_exp`` in
float64 for a small vocabulary, so a new graph gets checked without new reference code.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sedd_ray.diffusion import Graph

N = 5
SIGMAS = [1e-5, 1e-3, 0.3, 2.0, 20.0]
F64 = torch.float64


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square p-value of ``counts`` (K,) against ``probs`` (K,).

    Cells with zero expected probability must be empty (else p = 0).
    """
    counts = counts.to(F64)
    probs = probs.to(F64)
    n = counts.sum()
    zero = probs < 1e-12
    if counts[zero].sum() > 0:
        return 0.0
    expected = n * probs[~zero]
    stat = ((counts[~zero] - expected) ** 2 / expected).sum()
    dof = int((~zero).sum()) - 1
    if dof == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=F64), stat / 2))


def dense_dse(graph: Graph, log_score: torch.Tensor, sigma: float, x: torch.Tensor,
              x0: torch.Tensor) -> torch.Tensor:
    """Generic float64 reference: sum_{y != x} Q[x, y] (s_y - r_y l_y + K(r_y))."""
    q = graph.rate_matrix()
    p = torch.linalg.matrix_exp(sigma * q)
    out = torch.zeros(x.shape, dtype=F64)
    for idx in itertools.product(*(range(n) for n in x.shape)):
        xt, x00 = int(x[idx]), int(x0[idx])
        total = torch.zeros((), dtype=F64)
        for y in range(graph.dim):
            if y == xt or q[xt, y] == 0:
                continue
            r = p[y, x00] / p[xt, x00]
            ls = log_score[idx][y].to(F64)
            k = r * (torch.log(r) - 1) if r > 0 else torch.zeros((), dtype=F64)
            total = total + q[xt, y] * (torch.exp(ls) - r * ls + k)
        out[idx] = total
    return out


def true_log_ratios(graph: Graph, sigma: float, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """log p(y | x0) / p(x_t | x0) (float64) from the dense transition; -inf where 0."""
    p = torch.linalg.matrix_exp(sigma * graph.rate_matrix())  # p[y, x0]
    cond = p[:, x0].permute(*range(1, x0.dim() + 1), 0)  # (*, dim): p(. | x0)
    return cond.log() - cond.gather(-1, x[..., None]).log()


def random_pairs(graph: Graph, sigma: float, shape: tuple[int, ...], seed: int):
    """x0 over real tokens and x_t ~ p(. | x0) with a good share of every case."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, graph.vocab_size, shape, generator=g)
    x = graph.sample_transition(x0, max(sigma, 0.5), generator=g)
    return x0, x


class GraphSuite:
    """Every graph must satisfy these. Needs a ``graph`` fixture over ``N`` real tokens."""

    N = N

    def test_attributes(self, graph):
        assert graph.vocab_size == N
        assert graph.dim in (N, N + 1)
        assert graph.absorb == (graph.mask_id is not None)
        if graph.absorb:
            assert graph.mask_id == graph.dim - 1 == N

    def test_rate_matrix_is_a_generator(self, graph):
        q = graph.rate_matrix()
        assert q.shape == (graph.dim, graph.dim)
        torch.testing.assert_close(q.sum(dim=0), torch.zeros(graph.dim, dtype=F64))
        off = q - torch.diag(torch.diag(q))
        assert (off >= 0).all()

    def test_rate_and_transp_rate_are_columns_and_rows_of_q(self, graph):
        q = graph.rate_matrix()
        i = torch.tensor([[0, 1, graph.dim - 1], [2, 2, 0]])
        torch.testing.assert_close(graph.rate(i, dtype=F64), q[:, i].permute(1, 2, 0))
        torch.testing.assert_close(graph.transp_rate(i, dtype=F64), q[i, :])

    @pytest.mark.parametrize("sigma", SIGMAS)
    def test_transition_matches_matrix_exp(self, graph, sigma):
        p = torch.linalg.matrix_exp(sigma * graph.rate_matrix())
        i = torch.arange(graph.dim)
        s = torch.tensor(sigma, dtype=F64)
        col = graph.transition(i, s)  # (dim, dim): row k is column k of exp(sigma Q)
        row = graph.transp_transition(i, s)
        torch.testing.assert_close(col, p.T, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(row, p, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(col.sum(-1), torch.ones(graph.dim, dtype=F64))

    def test_transition_broadcasts_and_sums_to_one_float32(self, graph):
        x0 = torch.randint(0, graph.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
        sigma = torch.tensor([1e-5, 0.5, 20.0])[:, None]
        for fn in (graph.transition, graph.transp_transition):
            out = fn(x0, sigma)
            assert out.shape == (3, 7, graph.dim) and out.dtype == torch.float32
        torch.testing.assert_close(graph.transition(x0, sigma).sum(-1), torch.ones(3, 7))

    def test_forward_marginal_matches_matrix_exp(self, graph):
        g = torch.Generator().manual_seed(1)
        p0 = torch.rand(4, N, generator=g, dtype=F64)
        p0 = p0 / p0.sum(-1, keepdim=True)
        sigma = torch.tensor([[1e-4], [0.7], [5.0]], dtype=F64)  # (3, 1) x (4,) -> (3, 4)
        out = graph.forward_marginal(p0, sigma)
        assert out.shape == (3, 4, graph.dim)
        p0_full = torch.zeros(4, graph.dim, dtype=F64)
        p0_full[:, :N] = p0
        for b in range(3):
            p = torch.linalg.matrix_exp(sigma[b, 0] * graph.rate_matrix())
            torch.testing.assert_close(out[b], p0_full @ p.T)

    @pytest.mark.parametrize("sigma", [0.1, 1.5])
    def test_sample_transition_frequencies(self, graph, sigma):
        g = torch.Generator().manual_seed(2)
        draws = 20000
        for x0 in range(graph.vocab_size):
            x = graph.sample_transition(torch.full((draws,), x0), torch.tensor(sigma), generator=g)
            counts = torch.bincount(x, minlength=graph.dim)
            expected = graph.transition(torch.tensor(x0), torch.tensor(sigma, dtype=F64))
            assert chi2_pvalue(counts, expected) > 1e-3, (x0, counts, expected)

    def test_sample_transition_is_reproducible(self, graph):
        x0 = torch.randint(0, N, (8, 16), generator=torch.Generator().manual_seed(0))
        sig = torch.full((8, 1), 0.8)
        a = graph.sample_transition(x0, sig, generator=torch.Generator().manual_seed(3))
        b = graph.sample_transition(x0, sig, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b) and a.dtype == torch.long and a.shape == x0.shape

    def test_sample_limit_matches_large_sigma(self, graph):
        x = graph.sample_limit(4000, 3, generator=torch.Generator().manual_seed(4))
        assert x.shape == (4000, 3) and x.dtype == torch.long
        limit = graph.transition(torch.tensor(0), torch.tensor(40.0, dtype=F64))
        assert chi2_pvalue(torch.bincount(x.flatten(), minlength=graph.dim), limit) > 1e-3

    def test_reverse_rate_matches_dense(self, graph):
        g = torch.Generator().manual_seed(5)
        q = graph.rate_matrix()
        x = torch.randint(0, graph.dim, (6,), generator=g)
        score = torch.rand(6, graph.dim, generator=g, dtype=F64) + 0.1
        rate = graph.reverse_rate(x, score)
        for k in range(6):
            expected = q[x[k], :] * score[k]
            expected[x[k]] = 0.0
            expected[x[k]] = -expected.sum()
            torch.testing.assert_close(rate[k], expected)
        torch.testing.assert_close(rate.sum(-1), torch.zeros(6, dtype=F64))

    def test_staggered_score_matches_dense(self, graph):
        g = torch.Generator().manual_seed(6)
        score = torch.rand(3, graph.dim, generator=g, dtype=F64)
        for d in (1e-3, 0.4, 3.0):
            expected = score @ torch.linalg.matrix_exp(-d * graph.rate_matrix()).T
            torch.testing.assert_close(graph.staggered_score(score, torch.tensor(d, dtype=F64)),
                                       expected)

    @pytest.mark.parametrize("sigma,d", [(0.05, 0.01), (1.0, 0.3), (6.0, 2.0)])
    def test_tweedie_step_with_exact_score_is_the_posterior(self, graph, sigma, d):
        """staggered_score(s, d) * transp_transition(x, d) = p(x_{sigma-d} = y | x_sigma = x)."""
        p0 = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=F64)
        p_now = graph.forward_marginal(p0, torch.tensor(sigma, dtype=F64))
        p_prev = graph.forward_marginal(p0, torch.tensor(sigma - d, dtype=F64))
        step = torch.linalg.matrix_exp(d * graph.rate_matrix())  # step[x, y] = p(x | y)
        x = torch.arange(graph.dim)
        score = p_now[None, :] / p_now[x, None]
        dd = torch.tensor(d, dtype=F64)
        probs = graph.staggered_score(score, dd) * graph.transp_transition(x, dd)
        posterior = p_prev[None, :] * step[x, :] / p_now[x, None]
        torch.testing.assert_close(probs, posterior)
        torch.testing.assert_close(probs.sum(-1), torch.ones(graph.dim, dtype=F64))

    @pytest.mark.parametrize("sigma", [1e-3, 0.5, 4.0])
    def test_score_entropy_matches_dense_reference(self, graph, sigma):
        x0, x = random_pairs(graph, sigma, (4, 6), seed=7)
        log_score = torch.randn(4, 6, graph.dim, generator=torch.Generator().manual_seed(8),
                                dtype=F64)
        se = graph.score_entropy(log_score, torch.tensor([[sigma]] * 4, dtype=F64), x, x0)
        torch.testing.assert_close(se, dense_dse(graph, log_score, sigma, x, x0))

    def test_score_entropy_gradient_matches_dense_reference(self, graph):
        x0, x = random_pairs(graph, 0.3, (3, 4), seed=15)
        log_score = torch.randn(3, 4, graph.dim, generator=torch.Generator().manual_seed(16),
                                dtype=F64).requires_grad_()
        sig = torch.full((3, 1), 0.3, dtype=F64)
        (ours,) = torch.autograd.grad(graph.score_entropy(log_score, sig, x, x0).sum(), log_score)
        (ref,) = torch.autograd.grad(dense_dse(graph, log_score, 0.3, x, x0).sum(), log_score)
        torch.testing.assert_close(ours, ref)

    @pytest.mark.parametrize("sigma", SIGMAS)
    def test_score_entropy_zero_at_true_conditional_ratios(self, graph, sigma):
        x0, x = random_pairs(graph, sigma, (16, 8), seed=9)
        log_r = true_log_ratios(graph, sigma, x, x0)
        # entries with r = 0 (only for absorbing) must carry s = 0 too
        log_score = torch.nan_to_num(log_r, neginf=-1e4).float()
        se = graph.score_entropy(log_score, torch.full((16, 1), sigma), x, x0)
        assert se.dtype == torch.float32
        torch.testing.assert_close(se, torch.zeros_like(se), atol=1e-5, rtol=0)

    def test_score_entropy_nonnegative_and_finite_float32(self, graph):
        g = torch.Generator().manual_seed(10)
        sigmas = torch.logspace(-5, math.log10(20.0), 24)  # (24,)
        x0 = torch.randint(0, N, (24, 32), generator=g)
        x = graph.sample_transition(x0, sigmas[:, None].clamp_min(0.3), generator=g)
        for scale in (0.1, 3.0, 15.0):
            log_score = scale * torch.randn(24, 32, graph.dim, generator=g)
            se = graph.score_entropy(log_score, sigmas[:, None], x, x0)
            assert se.shape == (24, 32)
            assert torch.isfinite(se).all()
            assert (se >= 0).all()

    def test_score_entropy_gradient_is_finite(self, graph):
        g = torch.Generator().manual_seed(11)
        x0 = torch.randint(0, N, (4, 16), generator=g)
        x = graph.sample_transition(x0, torch.tensor(1.0), generator=g)
        log_score = (5 * torch.randn(4, 16, graph.dim, generator=g)).requires_grad_()
        # huge values at x_t's own entry (ignored) must not poison the gradient
        with torch.no_grad():
            log_score.scatter_(-1, x[..., None], 1e4)
        graph.score_entropy(log_score, torch.full((4, 1), 1e-4), x, x0).sum().backward()
        assert torch.isfinite(log_score.grad).all()
        own = log_score.grad.gather(-1, x[..., None])
        assert (own == 0).all()

    def test_score_entropy_keeps_float64(self, graph):
        x0, x = random_pairs(graph, 1.0, (2, 3), seed=12)
        se = graph.score_entropy(torch.zeros(2, 3, graph.dim, dtype=F64),
                                 torch.tensor([[1.0]] * 2, dtype=F64), x, x0)
        assert se.dtype == F64

    def test_score_entropy_upcasts_bfloat16(self, graph):
        x0, x = random_pairs(graph, 1.0, (2, 3), seed=12)
        se = graph.score_entropy(torch.zeros(2, 3, graph.dim, dtype=torch.bfloat16),
                                 torch.ones(2, 1), x, x0)
        assert se.dtype == torch.float32

    def test_prior_kl_nonnegative_and_vanishes(self, graph):
        x0 = torch.arange(N)[None, :].expand(3, N)
        kl = graph.prior_kl(x0, torch.tensor([[0.5], [5.0], [40.0]]))
        assert kl.shape == (3, N) and (kl >= 0).all()
        assert (kl[0] > kl[1]).all() and (kl[2] < 1e-8).all()


    # --- the contract's defaults and capabilities ---------------------------------------

    def test_params_are_declared_and_typed(self, graph):
        for name, p in type(graph).params().items():
            assert p.type in (bool, int, float, str), name
        assert isinstance(graph.fused_score_entropy, bool)
        assert isinstance(graph.time_independent_ok, bool)

    def test_generic_score_entropy_agrees(self, graph):
        """The base class's dense score entropy equals the graph's (fused or not)."""
        x0, x = random_pairs(graph, 0.7, (3, 5), seed=17)
        ls = torch.randn(3, 5, graph.dim, generator=torch.Generator().manual_seed(18), dtype=F64)
        sig = torch.tensor([[1e-3], [0.7], [6.0]], dtype=F64)
        torch.testing.assert_close(graph.score_entropy(ls, sig, x, x0),
                                   Graph.score_entropy(graph, ls, sig, x, x0))

    def test_output_log_score_keeps_the_current_token_at_zero(self, graph):
        g = torch.Generator().manual_seed(19)
        x = torch.randint(0, graph.dim, (2, 6), generator=g)
        raw = torch.randn(2, 6, graph.output_dim(), generator=g)
        out = graph.output_log_score(raw.clone(), x, torch.tensor([0.1, 3.0]))
        assert out.shape == (2, 6, graph.dim) and out.dtype == torch.float32
        assert (out.gather(-1, x[..., None]) == 0).all() and torch.isfinite(out).all()
        if graph.time_independent_ok:
            raw = torch.randn(2, 6, graph.output_dim(time_independent=True), generator=g)
            out = graph.output_log_score(raw, x, torch.tensor([0.1, 3.0]), time_independent=True)
            assert out.shape == (2, 6, graph.dim) and torch.isfinite(out).all()
        else:
            with pytest.raises(ValueError, match="time-independent"):
                graph.denoiser_log_score(raw.log_softmax(-1), x, torch.tensor([0.1, 3.0]))

    def test_path_noise_is_a_schedule(self, graph):
        from sedd_ray.diffusion import get_noise

        path = graph.path_noise(get_noise("loglinear"))
        sigma_bar, dsigma = path(torch.linspace(0.01, 0.99, 9, dtype=F64))
        assert (dsigma > 0).all() and (sigma_bar[1:] > sigma_bar[:-1]).all()

    def test_denoised_samples_hold_real_tokens_only(self, graph):
        from sedd_ray.diffusion import get_noise, sample

        def score_fn(x, sigma_bar):  # tiny scores: little moves before the last step
            return torch.full((*x.shape, graph.dim), 1e-6).scatter(-1, x[..., None], 1.0)

        for predictor in ("euler", "analytic"):
            x = sample(score_fn, graph, get_noise("loglinear"), batch=32, length=4, steps=3,
                       predictor=predictor, generator=torch.Generator().manual_seed(20))
            assert x.dtype == torch.long and ((x >= 0) & (x < graph.vocab_size)).all()


class NoiseSuite:
    """Every noise schedule must satisfy these. Needs a ``noise`` fixture."""

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
