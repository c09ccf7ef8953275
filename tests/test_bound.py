"""The schedule-independent NLL bound (sedd_ray.diffusion.bound): exactness by quadrature
with exact scores, unbiasedness against brute force, reproducibility over any split."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from sedd_ray.config import ModelConfig
from sedd_ray.diffusion import get_graph, get_noise
from sedd_ray.diffusion.bound import (
    Proposal,
    mean_stderr,
    paired_difference,
    per_block_bound,
    plain_log_score_fn,
    sampler_log_score_fn,
    score_model_log_score_fn,
    split_bound,
    spread_block_indices,
    weighted_score_entropy,
)
from sedd_ray.model import ScoreModel

F64 = torch.float64
PAIRS = [("uniform", "geometric"), ("uniform", "loglinear"),
         ("absorb", "geometric"), ("absorb", "loglinear")]
# a small known distribution: L = 2 independent positions over N = 3 tokens. (L, N)
P0 = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], dtype=F64)
L, N = P0.shape


def exact_model(graph, p0=P0):
    """log p_s(y) / p_s(x_t) of the factorised p0 at the given sigma_bar, in float64."""
    def model(x, sigma_bar):
        pt = graph.forward_marginal(p0, sigma_bar.to(F64)[:, None])  # (B, L, dim)
        return pt.log() - pt.gather(-1, x[..., None]).log()
    return model


def gauss_legendre_panels(n: int = 24, brk: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights on [0, 1]: Gauss-Legendre on panels that shrink geometrically
    towards 0, ``brk`` and 1, where the integrands in u may have log singularities (the
    uniform graph's at sigma_bar = 0, on both sides of the proposal's break at
    ``1 - defensive``; sigma_bar_path -> S or infinity at the break and at 1)."""
    grade = [10.0**-j for j in range(16, 0, -1)]  # 1e-16 .. 0.1
    inner = [x for x in grade if x >= 1e-13]  # representable offsets from brk and 1
    edges = sorted({0.0, brk / 2, brk, (1 + brk) / 2, 1.0} | {x * brk for x in grade}
                   | {brk - x * brk for x in inner} | {brk + x * (1 - brk) for x in inner}
                   | {1 - x * (1 - brk) for x in inner} - {0.0} | {0.0})
    x, w = np.polynomial.legendre.leggauss(n)
    nodes, weights = [], []
    for a, b in itertools.pairwise(edges):
        nodes.append((b - a) / 2 * x + (a + b) / 2)
        weights.append((b - a) / 2 * w)
    return torch.tensor(np.concatenate(nodes)), torch.tensor(np.concatenate(weights))


def enumerate_x0_xt(graph):
    """Every x0 (X, L) with p0(x0) (X,), and every x_t (T, L)."""
    x0s = torch.tensor(list(itertools.product(range(N), repeat=L)))
    xts = torch.tensor(list(itertools.product(range(graph.dim), repeat=L)))
    return x0s, P0[torch.arange(L), x0s].prod(-1), xts


def expected_integral(graph, fn, s_net, s_path, w) -> torch.Tensor:
    """sum_q w_q E_{x_t ~ p(.|x0) at s_path_q}[sum_l SE_l] for every x0, exactly. (X,)."""
    x0s, _, xts = enumerate_x0_xt(graph)
    X, T, Q = len(x0s), len(xts), len(s_path)
    x0 = x0s[:, None, None].expand(X, T, Q, L).reshape(-1, L)
    xt = xts[None, :, None].expand(X, T, Q, L).reshape(-1, L)
    flat = [v[None, None].expand(X, T, Q).reshape(-1) for v in (s_net, s_path, w)]
    # p(x_t | x_0) at sigma_bar_path, a product over positions
    p_xt = graph.transition(x0, flat[1][:, None]).gather(-1, xt[..., None]).squeeze(-1).prod(-1)
    vals = weighted_score_entropy(fn, graph, x0, xt, *flat)
    return torch.where(p_xt > 0, vals * p_xt, 0.0).view(X, T, Q).sum((1, 2))


def quadrature_bound(graph, noise, fn):
    """The bound of every x0 by quadrature in the proposal's u and an exact sum over x_t.

    Returns the x0s (X, L), p0(x0) (X,) and the bound of each, nats per token (X,).
    """
    prop = Proposal(graph, noise)
    u, wq = gauss_legendre_panels(brk=1 - prop.defensive if prop.defensive else 0.5)
    s_net, s_path, w = prop(u)
    integral = expected_integral(graph, fn, s_net, s_path, w * wq)
    x0s, p_x0, _ = enumerate_x0_xt(graph)
    prior = graph.prior_kl(x0s, torch.tensor(prop.end, dtype=F64)).sum(-1)
    return x0s, p_x0, (integral + prior) / L


def uniform_marginal_kl(graph, sigma_bar: float) -> float:
    """KL(p_S || uniform) of the data's marginal at sigma_bar, summed over positions."""
    pt = graph.forward_marginal(P0, torch.tensor(sigma_bar, dtype=F64))  # (L, N)
    return float((pt * (pt * graph.dim).log()).sum())


@pytest.mark.parametrize("graph_name,noise_name", PAIRS)
def test_exact_scores_bound_is_the_entropy_plus_the_end_point_gap(graph_name, noise_name):
    """Quadrature, exact scores: never below the entropy; above it by at most the gap the
    schedule's end point implies (+1e-4), and in fact by exactly that gap (+1e-7)."""
    graph, noise = get_graph(graph_name, vocab_size=N), get_noise(noise_name)
    end = float(noise.total_noise(torch.ones((), dtype=F64)))
    entropy = float(-(P0 * P0.log()).sum()) / L  # nats per token
    fns = [sampler_log_score_fn(exact_model(graph), graph), plain_log_score_fn(exact_model(graph))]
    for fn in fns:
        x0s, p_x0, bound = quadrature_bound(graph, noise, fn)
        expected = float((p_x0 * bound).sum())
        if graph.absorb:
            # the conditioned process's end point: -log(1 - e^{-S}) per token
            # (= -log(1 - eps) for loglinear, 2e-9 for geometric's S = 20)
            gap = -math.log(-math.expm1(-end))
            exact_gap = gap
            # with the sampled chain's exact scores the bound holds for every block
            assert (bound >= -P0[torch.arange(L), x0s].log().sum(-1) / L - 1e-9).all()
        else:
            gap = float(graph.prior_kl(x0s, end).sum(-1).mul(p_x0).sum()) / L  # E KL(p_S(.|x0)||u)
            exact_gap = uniform_marginal_kl(graph, end) / L  # KL of the marginal: the true excess
        assert expected >= entropy - 1e-12, (expected, entropy)  # float64 rounding only
        assert expected <= entropy + gap + 1e-4, (expected - entropy, gap)
        assert abs(expected - entropy - exact_gap) < 1e-7, (expected - entropy, exact_gap)


def test_the_stretch_below_sigma_min_is_counted():
    """Uniform/geometric: [0, sigma_min = 1e-4] carries ~1e-3 nats/token with exact scores
    (an integral that starts at sigma_min lands below the entropy); the bound counts it."""
    graph, noise = get_graph("uniform", vocab_size=N), get_noise("geometric")
    fn = plain_log_score_fn(exact_model(graph))
    v, wq = gauss_legendre_panels()
    s = 1e-4 * v  # quadrature over [0, 1e-4] in sigma_bar itself
    _, p_x0, _ = enumerate_x0_xt(graph)
    dropped = float((p_x0 * expected_integral(graph, fn, s, s, 1e-4 * wq)).sum()) / L
    _, _, bound = quadrature_bound(graph, noise, fn)
    excess = float((p_x0 * bound).sum()) + float((P0 * P0.log()).sum()) / L
    assert dropped > 2e-4 and excess - dropped < 0, (dropped, excess)


@pytest.mark.parametrize("graph_name,noise_name", PAIRS)
def test_stratified_estimator_matches_quadrature(graph_name, noise_name):
    graph, noise = get_graph(graph_name, vocab_size=N), get_noise(noise_name)
    fn = sampler_log_score_fn(exact_model(graph), graph)
    x0s, _, bound = quadrature_bound(graph, noise, fn)
    reps = 150
    blocks = x0s.repeat_interleave(reps, dim=0)  # every x0, reps distinct block ids each
    est = per_block_bound(fn, graph, noise, blocks, torch.arange(len(blocks)), draws=8,
                          batch_size=4096).view(len(x0s), reps)
    se = est.std(-1) / reps**0.5
    z = (est.mean(-1) - bound) / se.clamp_min(1e-12)
    assert (z.abs() < 4).all(), z


# --- a real network: unbiasedness and reproducibility --------------------------------------

def random_model(graph, time_conditioning=True, seed=0) -> ScoreModel:
    """A tiny ScoreModel with every weight random (no zero-initialised layers), so its
    log-scores depend on x_t and on sigma_bar."""
    cfg = ModelConfig(hidden_size=32, n_layers=1, n_heads=2, cond_dim=16, max_seq_len=16,
                      dropout=0.0, time_conditioning=time_conditioning)
    torch.manual_seed(seed)
    model = ScoreModel(cfg, graph).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def brute_force(fn, graph, noise, blocks, draws, seed) -> torch.Tensor:
    """Plain i.i.d. uniform-in-t draws under the training schedule (conditioned process for
    absorbing) plus uniform draws on [0, sigma_bar_path(0)]. Per-block (B, draws)."""
    g = torch.Generator().manual_seed(seed)
    b, length = blocks.shape
    x0 = blocks.repeat_interleave(draws, dim=0)
    path = graph.path_noise(noise)
    t = torch.rand(b * draws, generator=g, dtype=F64)
    s_net, s_path, w = noise.total_noise(t), path.total_noise(t), path.rate_noise(t)
    start = float(path.total_noise(torch.zeros((), dtype=F64)))
    # [0, sigma_bar_path(0)]: the path's noise uniform there, the sampler's at the same time
    s0 = start * torch.rand(b * draws, generator=g, dtype=F64).clamp_min(1e-12)
    m_end = -math.expm1(-float(noise.total_noise(torch.ones((), dtype=F64))))
    s0_net = -torch.log1p(m_end * torch.expm1(-s0)) if graph.absorb else s0
    total = 0
    for sn, sp, wt in ((s_net, s_path, w), (s0_net, s0, torch.full_like(s0, start))):
        if start == 0 and wt is not w:
            continue
        x_t = graph.sample_transition(x0, sp[:, None], generator=g)
        total = total + weighted_score_entropy(fn, graph, x0, x_t, sn, sp, wt)
    prior = graph.prior_kl(blocks, float(noise.total_noise(torch.ones((), dtype=F64))))
    return (total.view(b, draws) + prior.double().sum(-1, keepdim=True)) / length


@pytest.mark.parametrize("graph_name,noise_name,time_conditioning",
                         [(*p, True) for p in PAIRS] + [("absorb", "loglinear", False)])
@torch.no_grad()
def test_importance_sampled_estimate_is_unbiased(graph_name, noise_name, time_conditioning):
    """Many stratified proposal draws vs many uniform-in-t draws: within 3 stderr."""
    graph, noise = get_graph(graph_name, vocab_size=6), get_noise(noise_name)
    model = random_model(graph, time_conditioning)
    fn = score_model_log_score_fn(model)
    blocks = torch.randint(0, 6, (6, 8), generator=torch.Generator().manual_seed(1))
    ids = torch.arange(6)
    runs = torch.stack([per_block_bound(fn, graph, noise, blocks, ids, draws=64, seed=s,
                                        batch_size=2048) for s in range(8)])  # (8, B)
    brute = brute_force(fn, graph, noise, blocks, draws=6000, seed=2)  # (B, draws)
    # one comparison, of the mean over blocks (heavy tails make 6 separate ones fragile)
    diff = float(runs.mean() - brute.mean())
    se = float((runs.mean(1).var() / runs.shape[0]
                + (brute.var(-1) / brute.shape[1]).sum() / brute.shape[0] ** 2).sqrt())
    assert abs(diff) < 3 * se, (diff, se)
    assert se < 0.05 * float(brute.mean())  # a test that can tell a 15% bias apart


@pytest.mark.parametrize("graph_name,noise_name", [("uniform", "geometric"), ("absorb", "loglinear")])
def test_same_estimate_for_any_split_over_ranks_and_batches(graph_name, noise_name):
    graph, noise = get_graph(graph_name, vocab_size=6), get_noise(noise_name)
    fn = score_model_log_score_fn(random_model(graph))
    blocks = torch.randint(0, 6, (10, 8), generator=torch.Generator().manual_seed(3))
    ids = torch.arange(100, 110)
    whole = per_block_bound(fn, graph, noise, blocks, ids, draws=4, seed=7, batch_size=12)
    # three "ranks" take strided shares, in reverse order: the same batch size gives the
    # same network shapes, so the same bits; another batch size rounds differently only
    for bs, tol in ((12, 0.0), (5, 1e-6)):
        parts = torch.empty(10, dtype=F64)
        for rank in range(3):
            rows = torch.arange(rank, 10, 3).flip(0)
            parts[rows] = per_block_bound(fn, graph, noise, blocks[rows], ids[rows], draws=4,
                                          seed=7, batch_size=bs)
        assert ((parts - whole).abs() <= tol * whole.abs()).all(), (bs, parts - whole)
    # the draws follow (seed, block id), not the position in the batch
    again = per_block_bound(fn, graph, noise, blocks[3:4], ids[3:4], draws=4, seed=7,
                            batch_size=12)
    assert again[0] == whole[3]
    other_seed = per_block_bound(fn, graph, noise, blocks, ids, draws=4, seed=8, batch_size=12)
    assert (other_seed - whole).abs().max() > 1e-3


def test_split_bound_shares_over_ranks_give_the_whole():
    graph, noise = get_graph("absorb", vocab_size=6), get_noise("geometric")
    fn = score_model_log_score_fn(random_model(graph))
    split = torch.randint(0, 6, (40, 8), generator=torch.Generator().manual_seed(6))
    ids1, whole = split_bound(fn, graph, noise, split, count=9, draws=2, seed=3, batch_size=8)
    assert ids1.tolist() == spread_block_indices(40, 9).tolist()
    shares = [split_bound(fn, graph, noise, split, count=9, rank=r, world=4, draws=2, seed=3,
                          batch_size=8) for r in range(4)]
    ids = torch.cat([i for i, _ in shares])
    vals = torch.cat([v for _, v in shares])[ids.argsort()]
    assert torch.equal(ids.sort().values, ids1) and torch.equal(vals, whole)
    with pytest.raises(ValueError, match="rank"):
        split_bound(fn, graph, noise, split, rank=4, world=4)


def test_common_random_numbers_make_paired_differences_precise():
    """Two models on the same blocks and draws: the paired difference's stderr is far below
    the stderr of either mean (the block-to-block spread cancels)."""
    graph, noise = get_graph("absorb", vocab_size=6), get_noise("loglinear")
    blocks = torch.randint(0, 6, (24, 8), generator=torch.Generator().manual_seed(4))
    ids = torch.arange(24)
    model = random_model(graph, seed=0)
    near = random_model(graph, seed=0)
    with torch.no_grad():
        near.output_layer.linear.bias.add_(0.05)
    a, b = (per_block_bound(score_model_log_score_fn(m), graph, noise, blocks, ids, draws=4)
            for m in (model, near))
    (_, se_a), (diff, se_d) = mean_stderr(a), paired_difference(a, b)
    assert se_d < 0.2 * se_a, (se_d, se_a)
    assert diff != 0.0


# --- adapters -------------------------------------------------------------------------------

@pytest.mark.parametrize("graph_name,scale,tc", [("absorb", True, True), ("absorb", False, True),
                                                 ("absorb", True, False), ("uniform", True, True)])
@torch.no_grad()
def test_score_model_adapter(graph_name, scale, tc):
    """Equal sigmas: the model's own forward. Different sigmas: the sampled chain's rate in
    the path's clock (sampler_log_score_fn of the model)."""
    graph = get_graph(graph_name, vocab_size=6)
    model = random_model(graph, time_conditioning=tc)
    model.cfg.scale_by_sigma = scale
    fn = score_model_log_score_fn(model)
    x = torch.randint(0, graph.dim, (5, 8), generator=torch.Generator().manual_seed(5))
    net = torch.tensor([1e-4, 0.1, 1.0, 3.0, 6.9], dtype=F64)
    torch.testing.assert_close(fn(x, net, net), model(x, net.float()), atol=2e-5, rtol=1e-5)
    path = net * 1.7 if graph.absorb else net
    ref = sampler_log_score_fn(model, graph)(x, net, path)
    tokens = slice(0, graph.vocab_size)  # the mask column is never used
    torch.testing.assert_close(fn(x, net, path)[..., tokens], ref[..., tokens], atol=2e-5,
                               rtol=1e-5)
    if graph.absorb:
        assert (fn(x, net, path) - fn(x, net, net)).abs().max() > 0.1


# --- proposal, blocks, statistics ----------------------------------------------------------

@pytest.mark.parametrize("graph_name,noise_name", PAIRS)
def test_proposal_weight_is_the_inverse_density(graph_name, noise_name):
    """E_u[w f(s_path)] = int_0^S f(s) ds for test functions f (S = inf for absorbing)."""
    graph, noise = get_graph(graph_name, vocab_size=4), get_noise(noise_name)
    prop = Proposal(graph, noise)
    u, wq = gauss_legendre_panels(48, brk=1 - prop.defensive if prop.defensive else 0.5)
    s_net, s_path, w = prop(u)
    end = math.inf if graph.absorb else prop.end
    for f, integral in ((lambda s: torch.exp(-s), -math.expm1(-end)),
                        (lambda s: s * torch.exp(-s), 1 - (end + 1) * math.exp(-end) if end < math.inf else 1.0),
                        (lambda s: torch.log1p(s) / (1 + s) ** 2,  # slow decay: uniform only
                         None if graph.absorb else 1 - (1 + math.log1p(end)) / (1 + end)),
                        # the log singularity at 0: int_0^inf e^{-s} log s = -gamma
                        (lambda s: torch.exp(-s) * torch.log(s),
                         -0.5772156649015329 if graph.absorb else None)):
        if integral is None:
            continue
        assert abs(float((wq * w * f(s_path)).sum()) - integral) < 1e-8, (f, integral)
    # the network's noise stays within the schedule's range, and is the sampler's
    assert (s_net >= 0).all() and (s_net <= prop.end + 1e-12).all()
    if graph.absorb:
        m_a = -torch.expm1(-s_path)
        torch.testing.assert_close(-torch.expm1(-s_net), prop.move_end * m_a)
    else:
        assert torch.equal(s_net, s_path) and w.max() <= prop.end / prop.defensive + 1e-9
    top = prop(torch.tensor([1 - 2.0**-53], dtype=F64))
    assert torch.isfinite(torch.stack(top)).all()
    with pytest.raises(ValueError, match="defensive"):
        Proposal(graph, noise, defensive=1.0)
    with pytest.raises(ValueError, match="defensive"):
        Proposal(get_graph("absorb", vocab_size=4), noise, defensive=0.5)


def test_spread_block_indices():
    idx = spread_block_indices(100, 8)
    assert idx.tolist() == [6, 18, 31, 43, 56, 68, 81, 93]
    assert spread_block_indices(5).tolist() == [0, 1, 2, 3, 4]
    assert spread_block_indices(5, 50).tolist() == [0, 1, 2, 3, 4]
    big = spread_block_indices(1001, 64)
    assert len(set(big.tolist())) == 64 and big.min() >= 0 and big.max() < 1001
    gaps = big.diff()
    assert gaps.max() - gaps.min() <= 1
    with pytest.raises(ValueError, match="count"):
        spread_block_indices(10, 0)
    with pytest.raises(ValueError, match="no blocks"):
        spread_block_indices(0, 4)


def test_mean_stderr_and_paired_difference():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mean, se = mean_stderr(a)
    assert mean == 2.5 and math.isclose(se, math.sqrt(5 / 3) / 2)
    d, se_d = paired_difference(a + 0.5, a)
    assert math.isclose(d, 0.5) and se_d < 1e-12
    with pytest.raises(ValueError, match="same blocks"):
        paired_difference(a, a[:3])
    with pytest.raises(ValueError, match="at least 2"):
        mean_stderr(a[:1])


def test_per_block_bound_validates_its_input():
    graph, noise = get_graph("absorb", vocab_size=4), get_noise("loglinear")
    fn = plain_log_score_fn(exact_model(graph, torch.full((8, 4), 0.25, dtype=F64)))
    blocks = torch.zeros(3, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="block_ids"):
        per_block_bound(fn, graph, noise, blocks, [0, 1])
    with pytest.raises(ValueError, match="draws"):
        per_block_bound(fn, graph, noise, blocks, [0, 1, 2], draws=0)


# --- a trained model: the trainer's evaluation against brute force ---------------------------

@pytest.mark.parametrize("graph_name,noise_name", [("absorb", "geometric"), ("uniform", "geometric")])
def test_trained_model_estimate_is_unbiased(tmp_path, tiny_bundle, graph_name, noise_name):
    """A tiny model trained under the geometric schedule (the heavy-tailed case for
    uniform-in-t draws): the trainer's importance-sampled evaluation of its EMA weights
    agrees with many plain uniform-in-t draws on the same blocks within 3 stderr."""
    from conftest import tiny_config

    from sedd_ray.trainer import Trainer

    cfg = tiny_config(graph=graph_name, noise=noise_name, steps=60, eval_every=60, ckpt_every=0,
                      lr=3e-3, warmup_steps=5, ema_decay=0.9, sample_count=0)
    tr = Trainer(cfg, tmp_path, bundle=tiny_bundle)
    tr.run(resume=False)
    runs, brute = _trainer_vs_brute_force(tr)
    diff = float(runs.mean() - brute.mean())
    se = float((runs.mean(1).var() / runs.shape[0]
                + (brute.var(-1) / brute.shape[1]).sum() / brute.shape[0] ** 2).sqrt())
    assert abs(diff) < 3 * se, (diff, se)
    assert se < 0.02 * float(brute.mean()), se  # precise enough to see a 6% bias


@torch.no_grad()
def _trainer_vs_brute_force(tr) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's estimator on 12 spread validation blocks, 6 evaluation seeds x 32
    draws (6, B); 1000 plain uniform-in-t draws of the same blocks (B, 1000)."""
    runs = []
    for seed in range(6):
        tr.cfg.train.eval_seed = seed
        runs.append(tr.evaluation("val", 12, 32).nll)
    ids = tr.evaluation("val", 12, 1).ids
    fn = score_model_log_score_fn(tr.ema)
    brute = [brute_force(fn, tr.graph, tr.noise, tr.data.val[ids], draws=125, seed=s)
             for s in range(8)]
    return torch.stack(runs), torch.cat(brute, dim=1)
