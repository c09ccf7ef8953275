"""Graphs: the shared property suite (tests/suites.py) run over every registered graph,
plus closed-form parity of the built-in ones with DESIGN.md."""

from __future__ import annotations

import math

import pytest
import torch
from suites import F64, SIGMAS, GraphSuite, N, chi2_pvalue

from sedd_ray.diffusion import GRAPHS, Graph, get_graph, sample_categorical


@pytest.fixture(params=GRAPHS.names())
def graph(request) -> Graph:
    return get_graph(request.param, vocab_size=N)


class TestGraphProperties(GraphSuite):
    """The shared suite (tests/suites.py) over every registered graph."""


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
