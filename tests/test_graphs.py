"""Graphs: one property suite run over every registered graph, plus closed-form parity.

The references are dense: ``Q = graph.rate_matrix()`` and ``torch.linalg.matrix_exp`` in
float64 for a small vocabulary, so a new graph gets checked without new reference code.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sedd_ray.diffusion import GRAPHS, Graph, get_graph, sample_categorical

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


@pytest.fixture(params=GRAPHS.names())
def graph(request) -> Graph:
    return get_graph(request.param, vocab_size=N)


class TestGraphProperties:
    """Every registered graph must satisfy these (parametrised over GRAPHS.names())."""

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


# --- closed forms of DESIGN.md, written out literally in float64 ----------------------------


def design_uniform_se(ls: torch.Tensor, sigma: float, x: torch.Tensor, x0: torch.Tensor,
                      n: int, naive: bool = False) -> torch.Tensor:
    """DESIGN.md's uniform formula, literally, in l's dtype (``naive``: rho = 1 - N/(E+N))."""
    s = torch.tensor(sigma, dtype=ls.dtype)
    e = torch.expm1(s)
    rho = 1 - n / (e + n) if naive else e / (e + n)

    def k(a):
        return a * (torch.log(a) - 1)

    own = torch.nn.functional.one_hot(x, n).bool()
    sum_exp = torch.where(own, 0.0, ls.exp()).sum(-1)
    sum_l = torch.where(own, 0.0, ls).sum(-1)
    l_x0 = ls.gather(-1, x0[..., None]).squeeze(-1)
    same = sum_exp / n - rho / n * sum_l + (n - 1) / n * k(rho)
    diff = sum_exp / n - sum_l / n - l_x0 / e + (k(1 + n / e) - (n - 2)) / n
    return torch.where(x == x0, same, diff)


def design_absorb_se(ls: torch.Tensor, sigma: float, x: torch.Tensor, x0: torch.Tensor,
                     n: int) -> torch.Tensor:
    e = torch.expm1(torch.tensor(sigma, dtype=ls.dtype))
    inv = 1 / e
    val = ls[..., :n].exp().sum(-1) - ls.gather(-1, x0[..., None]).squeeze(-1) / e
    val = val + inv * (torch.log(inv) - 1)
    return torch.where(x == n, val, 0.0)


@pytest.mark.parametrize("sigma", SIGMAS + [1e-4, 7.0])
@pytest.mark.parametrize("name", ["uniform", "absorb"])
def test_score_entropy_matches_design_closed_form(name, sigma):
    """float32 implementation vs DESIGN.md's formula in float64, down to sigma_bar = 1e-5."""
    graph = get_graph(name, vocab_size=N)
    g = torch.Generator().manual_seed(13)
    x0 = torch.randint(0, N, (64, 4), generator=g)
    x = graph.sample_transition(x0, torch.tensor(max(sigma, 0.7)), generator=g)
    l64 = torch.randn(64, 4, graph.dim, generator=g, dtype=F64)
    ref_fn = design_uniform_se if name == "uniform" else design_absorb_se
    ref = ref_fn(l64, sigma, x, x0, N)
    got = graph.score_entropy(l64.float(), torch.full((64, 1), sigma), x, x0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("sigma", [1e-5, 1e-4, 1e-3, 0.1, 20.0])
def test_uniform_score_entropy_exact_at_gpt2_vocab(sigma):
    """With N = 50257 the float32 result still matches DESIGN.md's formula in float64."""
    n = 50257
    graph = get_graph("uniform", vocab_size=n)
    g = torch.Generator().manual_seed(14)
    x0 = torch.randint(0, n, (4, 2), generator=g)
    x = torch.where(torch.tensor([[True], [False], [True], [False]]), x0, (x0 + 7) % n)
    l64 = torch.randn(4, 2, n, generator=g, dtype=F64)
    ref = design_uniform_se(l64, sigma, x, x0, n)
    got = graph.score_entropy(l64.float(), torch.full((4, 1), sigma), x, x0)
    torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["uniform", "absorb"])
def test_score_entropy_zero_at_true_ratios_gpt2_vocab(name):
    """float32, N = 50257, sigma_bar from 1e-5 to 20: zero at the true conditional ratios."""
    n = 50257
    graph = get_graph(name, vocab_size=n)
    sigmas = torch.tensor([1e-5, 1e-4, 1e-3, 0.1, 1.0, 20.0], dtype=F64)
    x0 = torch.tensor([[0, 7], [3, 3], [n - 1, 5], [1, 2], [9, 9], [4, 0]])
    x = torch.tensor([[0, 8], [2, 3], [n - 1, 5], [1, 0], [9, 10], [4, 1]])
    if name == "absorb":
        x = torch.where(x == x0, graph.mask_id, x0)
    cond = graph.transition(x0, sigmas[:, None])  # (6, 2, dim): p(. | x0), float64
    log_r = cond.log() - cond.gather(-1, x[..., None]).log()
    log_score = torch.nan_to_num(log_r, neginf=-1e4).float()
    se = graph.score_entropy(log_score, sigmas[:, None].float(), x, x0)
    torch.testing.assert_close(se, torch.zeros_like(se), atol=1e-5, rtol=0)


def test_naive_rho_breaks_in_float32():
    """Why rho = E/(E+N): the naive 1 - N/(E+N) is garbage in float32 at N = 50257.

    E + N rounds to N, so the naive rho is exactly 0 where division is correctly rounded
    (then K(rho) = 0 * log 0 is NaN) or one rounding error (~6e-8, 300x too big) where it
    is computed through a reciprocal. The expm1 form keeps full relative precision.
    """
    n, sigma = 50257, 1e-5
    exact = math.expm1(sigma) / (math.expm1(sigma) + n)
    e = torch.expm1(torch.tensor(sigma))
    naive = (1 - n / (e + n)).item()
    assert naive == 0.0 or abs(naive / exact - 1) > 10
    rho = (e / (e + n)).item()
    assert abs(rho / exact - 1) < 1e-6
    k = torch.tensor(0.0) * (torch.log(torch.tensor(0.0)) - 1)
    assert torch.isnan(k)  # what the naive constant becomes when rho rounds to 0


@pytest.mark.parametrize("sigma", [1e-5, 0.1, 2.0, 8.0])
def test_uniform_prior_kl_is_exact(sigma):
    graph = get_graph("uniform", vocab_size=N)
    p = torch.linalg.matrix_exp(sigma * graph.rate_matrix())[:, 0]  # p(. | x0 = 0)
    expected = (p * torch.log(p * N)).sum()
    got = graph.prior_kl(torch.tensor([0]), torch.tensor(sigma, dtype=F64))
    torch.testing.assert_close(got, expected[None], rtol=1e-9, atol=1e-13)


def test_uniform_prior_kl_far_tail():
    """At sigma_bar = 20 the KL is (N - 1) e^{-2 sigma_bar} / 2 to second order (~1e-17)."""
    graph = get_graph("uniform", vocab_size=N)
    got = graph.prior_kl(torch.tensor([0]), torch.tensor(20.0, dtype=F64))
    torch.testing.assert_close(got, torch.tensor([(N - 1) * math.exp(-40.0) / 2], dtype=F64),
                               rtol=1e-3, atol=0)


def test_absorb_prior_kl_is_all_mask_cost():
    graph = get_graph("absorb", vocab_size=N)
    sigma = -math.log(1e-3)  # loglinear sigma_bar(1)
    got = graph.prior_kl(torch.tensor([[0, 3]]), torch.tensor([[sigma]]))
    torch.testing.assert_close(got, torch.full((1, 2), -math.log(1 - 1e-3)))


def test_unknown_graph_lists_valid_names():
    with pytest.raises(ValueError, match="absorb, uniform"):
        get_graph("unifrom", vocab_size=N)


def test_bad_vocab_size_raises():
    with pytest.raises(ValueError, match="vocab_size"):
        get_graph("absorb", vocab_size=1)


class TestSampleCategorical:
    def test_frequencies_in_float64(self):
        probs = torch.tensor([0.5, 1e-3, 0.2, 0.299])
        x = sample_categorical(probs.expand(50000, 4), torch.Generator().manual_seed(0))
        assert chi2_pvalue(torch.bincount(x, minlength=4), probs) > 1e-3

    def test_clamps_negatives_and_renormalises(self):
        probs = torch.tensor([[-0.3, 2.0, 0.0, 2.0]]).expand(20000, 4)
        x = sample_categorical(probs, torch.Generator().manual_seed(1))
        counts = torch.bincount(x, minlength=4)
        assert counts[0] == 0 and counts[2] == 0
        assert chi2_pvalue(counts, torch.tensor([0.0, 0.5, 0.0, 0.5])) > 1e-3

    def test_zero_row_is_uniform_and_nan_raises(self):
        x = sample_categorical(torch.zeros(4000, 3), torch.Generator().manual_seed(2))
        assert chi2_pvalue(torch.bincount(x, minlength=3), torch.full((3,), 1 / 3)) > 1e-3
        with pytest.raises(ValueError, match="non-finite"):
            sample_categorical(torch.tensor([[0.5, float("nan")]]))
